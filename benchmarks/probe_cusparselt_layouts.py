"""Which way of posing y = x W^T to cuSPARSELt runs, searches and is fastest on this GPU?

Each (layout, mode) runs in its own process: a crash inside cuSPARSELt poisons the CUDA context.
mode "search" uses cusparseLtMatmulSearch; "sweep" times every algorithm id, printing as it goes.
    python benchmarks/probe_cusparselt_layouts.py
"""

from __future__ import annotations

import os
import subprocess
import sys

SHAPES = [(16, 28672, 4096), (4096, 4096, 4096), (16384, 28672, 4096), (1024, 4096, 14336)]

CHILD = r"""
import statistics, torch, torch.nn.functional as F, sparseflow as sf
from sparseflow._ext import _C, CSLT_LAYOUT as L

def ms(fn, n=5, batch=8):
    for _ in range(2): fn()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(batch): fn()
        b.record(); b.synchronize(); ts.append(a.elapsed_time(b) / batch)
    return statistics.median(ts)

for m, n, k in SHAPES:
    w = sf.prune_2_4(torch.randn(n, k, device="cuda", dtype=torch.float16))
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    packed = _C.cslt_compress(w, L)
    t_dense, t_def = ms(lambda: F.linear(x, w)), ms(lambda: _C.cslt_mm(x, packed, n, [-1, 1, 0, 0], L))
    print(f"layout {L} {MODE} M={m:5d} N={n:5d} K={k:5d} dense={t_dense*1e3:8.1f}us default={t_def*1e3:8.1f}us ({t_dense/t_def:.2f}x)", flush=True)
    if MODE == "search":
        cfg = [int(v) for v in _C.cslt_search(x, packed, n, L)[:4]]
        t_s = ms(lambda: _C.cslt_mm(x, packed, n, cfg, L))
        print(f"   searched={t_s*1e3:8.1f}us ({t_dense/t_s:.2f}x) cfg={cfg}", flush=True)
    else:
        best = None
        for alg in range(int(_C.cslt_alg_count(x, packed, n, L))):
            try:
                t = ms(lambda: _C.cslt_mm(x, packed, n, [alg, 1, 0, 0], L), n=3, batch=4)
            except RuntimeError as e:
                continue
            if best is None or t < best[1]:
                best = (alg, t)
        print(f"   sweep best alg {best[0]}: {best[1]*1e3:8.1f}us ({t_dense/best[1]:.2f}x)", flush=True)
"""


def main() -> int:
    for layout, mode in ((1, "search"), (0, "sweep"), (2, "sweep")):
        env = {**os.environ, "SPARSEFLOW_CSLT_LAYOUT": str(layout)}
        code = f"SHAPES = {SHAPES!r}\nMODE = {mode!r}\n" + CHILD
        try:
            r = subprocess.run(
                [sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=100
            )
            print(r.stdout, end="")
            if r.returncode:
                print(f"layout {layout} {mode}: exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}")
        except subprocess.TimeoutExpired as e:
            print((e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""))
            print(f"layout {layout} {mode}: timed out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
