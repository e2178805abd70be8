"""Which way of posing y = x W^T to cuSPARSELt runs and is fastest on this GPU, per algorithm id?

cuSPARSELt 0.8.0 on an H200 hits an illegal instruction (which poisons the CUDA context) for some
algorithm ids of layouts 0 and 2, so every id is timed in a child process that is restarted after
the id that killed it. Prints, per layout and shape: dense time, default, fastest id, crashing ids.
    python benchmarks/probe_cusparselt_layouts.py [--budget-s 150]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

SHAPES = [(16, 28672, 4096), (4096, 4096, 4096), (4096, 28672, 4096), (1024, 4096, 14336)]

CHILD = r"""
import statistics, sys, torch, torch.nn.functional as F, sparseflow as sf
from sparseflow._ext import _C, CSLT_LAYOUT_OVERRIDE
L = int(CSLT_LAYOUT_OVERRIDE)
m, n, k, start = (int(v) for v in sys.argv[1:5])

def ms(fn, n=3, batch=4):
    fn()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(batch): fn()
        b.record(); b.synchronize(); ts.append(a.elapsed_time(b) / batch)
    return statistics.median(ts)

w = sf.prune_2_4(torch.randn(n, k, device="cuda", dtype=torch.float16))
x = torch.randn(m, k, device="cuda", dtype=torch.float16)
packed = _C.cslt_compress(w, L)
if start == 0:
    print("DENSE", ms(lambda: F.linear(x, w)), flush=True)
    print("DEFAULT", ms(lambda: _C.cslt_mm(x, packed, n, [-1, 1, 0, 0], L)), flush=True)
for alg in range(start, int(_C.cslt_alg_count(x, packed, n, L))):
    print("TRY", alg, flush=True)
    try:
        print("ALG", alg, ms(lambda: _C.cslt_mm(x, packed, n, [alg, 1, 0, 0], L)), flush=True)
    except RuntimeError as e:
        print("ERR", alg, str(e)[:60], flush=True)
print("DONE", flush=True)
cfg = [int(v) for v in _C.cslt_search(x, packed, n, L)[:4]]  # may crash: printed after DONE
print("SEARCH", ms(lambda: _C.cslt_mm(x, packed, n, cfg, L)), cfg[0], flush=True)
"""


def probe(layout: int, shape, deadline: float) -> str:
    env = {**os.environ, "SPARSEFLOW_CSLT_LAYOUT": str(layout)}
    start, times, crashed, dense, default, searched = 0, {}, [], None, None, None
    while time.time() < deadline:
        try:
            r = subprocess.run(
                [sys.executable, "-c", CHILD, *map(str, shape), str(start)],
                check=False,
                env=env,
                capture_output=True,
                text=True,
                timeout=max(5.0, deadline - time.time()),
            )
            out = r.stdout
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        last = None
        for line in out.splitlines():
            f = line.split()
            if f[0] == "DENSE":
                dense = float(f[1])
            elif f[0] == "DEFAULT":
                default = float(f[1])
            elif f[0] == "TRY":
                last = int(f[1])
            elif f[0] == "ALG":
                times[int(f[1])] = float(f[2])
            elif f[0] == "SEARCH":
                searched = float(f[1])
        if "DONE" in out or last is None:
            break
        crashed.append(last)
        start = last + 1
    best = min(times.items(), key=lambda kv: kv[1]) if times else None
    m, n, k = shape
    us = lambda v: f"{v * 1e3:8.1f}us" if v else "     n/a"
    line = f"layout {layout} M={m:5d} N={n:5d} K={k:5d} dense={us(dense)} default={us(default)}"
    if best and dense:
        line += f" best alg {best[0]}={us(best[1])} ({dense / best[1]:.2f}x)"
    line += f" search={us(searched)}" if searched else " search=failed"
    return line + f" ids timed={len(times)} crashing ids={crashed}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=150.0)
    ap.add_argument("--layouts", default="1,3,4,0,2")
    ap.add_argument("--shapes", default="", help="indices into SHAPES, e.g. 1,2 (default: all)")
    ap.add_argument("--ms", default="", help="replace each shape's M by these, e.g. 8,128,2048 (M-buckets)")
    args = ap.parse_args()
    layouts = [int(v) for v in args.layouts.split(",")]
    shapes = [SHAPES[int(i)] for i in args.shapes.split(",")] if args.shapes else SHAPES
    if args.ms:  # e.g. to find, per M-bucket, the algorithm ids that never crash
        shapes = [(int(m), n, k) for _, n, k in shapes for m in args.ms.split(",")]
    per = max(40.0, args.budget_s / (len(layouts) * len(shapes)))  # a child needs ~10 s to import torch + sparseflow
    for layout in layouts:
        for shape in shapes:
            print(probe(layout, shape, time.time() + per), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
