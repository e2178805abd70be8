"""Which way of posing y = x W^T to cuSPARSELt runs, searches and is fastest on this GPU?

Each layout runs in its own process: a crash inside cuSPARSELt poisons the CUDA context.
    python benchmarks/probe_cusparselt_layouts.py
"""

from __future__ import annotations

import os
import subprocess
import sys

SHAPES = [(16, 4096, 4096), (16, 28672, 4096), (256, 6144, 4096), (4096, 4096, 4096), (1, 4096, 14336)]

CHILD = r"""
import statistics, torch, torch.nn.functional as F, sparseflow as sf
from sparseflow._ext import _C, CSLT_LAYOUT as L

def ms(fn, n=20):
    for _ in range(3): fn()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts)

for m, n, k in SHAPES:
    w = sf.prune_2_4(torch.randn(n, k, device="cuda", dtype=torch.float16))
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    packed = _C.cslt_compress(w, L)
    ref = F.linear(x.double(), w.double())
    y = _C.cslt_mm(x, packed, n, [-1, 1, 0, 0], L)
    err = float((y.double() - ref).norm() / ref.norm())
    t_dense, t_def = ms(lambda: F.linear(x, w)), ms(lambda: _C.cslt_mm(x, packed, n, [-1, 1, 0, 0], L))
    line = f"layout {L} M={m:5d} N={n:5d} K={k:5d} err={err:.1e} dense={t_dense*1e3:7.1f}us default={t_def*1e3:7.1f}us ({t_dense/t_def:.2f}x)"
    try:
        cfg = [int(v) for v in _C.cslt_search(x, packed, n, L)[:4]]
        torch.cuda.synchronize()
        t_s = ms(lambda: _C.cslt_mm(x, packed, n, cfg, L))
        y = _C.cslt_mm(x, packed, n, cfg, L)
        err2 = float((y.double() - ref).norm() / ref.norm())
        line += f" searched={t_s*1e3:7.1f}us ({t_dense/t_s:.2f}x) cfg={cfg} err={err2:.1e}"
    except Exception as e:
        line += f" search FAILED: {str(e)[:80]}"
    print(line, flush=True)
"""


def main() -> int:
    for layout in (0, 1, 2):
        env = {**os.environ, "SPARSEFLOW_CSLT_LAYOUT": str(layout)}
        code = f"SHAPES = {SHAPES!r}\n" + CHILD
        try:
            r = subprocess.run(
                [sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=150
            )
            print(r.stdout, end="")
            if r.returncode:
                print(f"layout {layout}: exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}")
        except subprocess.TimeoutExpired:
            print(f"layout {layout}: timed out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
