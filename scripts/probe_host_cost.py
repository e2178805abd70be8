"""Host time per call at each level of the call stack, where the GPU is not the bottleneck (a
256 x 256 layer at M = 16: every kernel runs in a few microseconds, so a loop without a sync per
call is bound by the CPU). Tells where the time over ``F.linear`` goes (the target: <= 10 us).
Diagnostic, one GPU call:
    python scripts/probe_host_cost.py [--calls 3000] [--reps 5]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import sparseflow as sf
from sparseflow import ops
from sparseflow._ext import _C, _CUTLASS
from sparseflow.kernels import KERNELS, cutlass
from sparseflow.kernels.dispatch import m_bucket


def per_call_us(fn, calls: int, reps: int) -> float:
    for _ in range(200):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--m", type=int, default=16)
    args = ap.parse_args()
    dt, dev, n, k, m = torch.float16, "cuda", 256, 256, args.m
    x = torch.randn(m, k, device=dev, dtype=dt)
    w = sf.prune_2_4(torch.randn(n, k, device=dev, dtype=dt))
    c = sf.compress_2_4(w)
    ref = F.linear(x.float(), w.float())
    cases = {
        "F.linear": lambda: F.linear(x, w),  # first: the baseline of every line
        "torch.empty (M x N)": lambda: torch.empty((m, n), device=dev, dtype=dt),
    }
    if cutlass.available(torch.device(dev)):
        cw = c.layout("cutlass")  # configuration 5 (128 x 16 tile) is one of those for M <= 16
        y = torch.empty(m, n, device=dev, dtype=dt)
        cases |= {
            "cutlass: _cutlass.mm (y given)": lambda: _CUTLASS.mm(x, cw.A, cw.E, y, None, 5),
            "cutlass: _cutlass.linear (y made in C++)": lambda: _CUTLASS.linear(x, cw.A, cw.E, n, 0, 5),
            "cutlass: mm_unchecked": lambda: cutlass.mm_unchecked(x, cw, 5),
            "cutlass: cutlass_mm (checked)": lambda: cutlass.cutlass_mm(x, cw, 5),
        }
    layers = {}
    for backend in ("cutlass", "decode", "cusparselt", "auto"):
        try:
            lin = sf.SparseLinear.from_compressed(c, None, backend=backend)
            got = lin(x)
        except (ValueError, RuntimeError) as e:
            print(f"  {backend}: not run ({e})")
            continue
        err = (got.float() - ref).abs().max().item() / ref.abs().max().item()
        assert err < 1e-2, f"{backend}: relative error {err}"
        cases[f"sparse_mm backend={backend}"] = lambda b=backend: sf.sparse_mm(x, c, backend=b)
        cases[f"SparseLinear backend={backend}"] = lambda lin=lin: lin(x)
        layers[backend] = lin
    # the raw extension calls behind the routes the layers took (ops._routes: kernel's run, layout, config)
    for backend in ("cusparselt", "decode"):
        lin = layers.get(backend)  # its own Sparse24Weight: the route is under that weight's handle
        r = ops._routes.get((lin._route[4], m_bucket(m), ops.BACKENDS[backend])) if lin is not None else None
        if r is not None and r[1] == KERNELS["cusparselt"].run:
            (cfg, layout) = r[3]
            cases[f"cusparselt: _C.cslt_mm (layout {layout}, cfg {cfg})"] = lambda r=r, cfg=cfg, v=layout: _C.cslt_mm(
                x, r[2].packed, n, cfg, v
            )
            p1 = c.layout("cusparselt", 1).packed  # layout 1 (y^T, then our transpose), the library's default
            cases["cusparselt: _C.cslt_mm (layout 1, default)"] = lambda p1=p1: _C.cslt_mm(x, p1, n, [-1, 1, 0, 0], 1)
        elif r is not None and r[1] == KERNELS["decode"].run and not r[2].portable:
            cases["decode: _C.decode24_mm"] = lambda r=r: _C.decode24_mm(x, r[2].A, r[2].E, None, n, False, *r[3])
    print(f"host time per call, {n} x {k} fp16 weight, M = {m} (median of {args.reps} x {args.calls} calls):")
    res = {}
    for label, fn in cases.items():  # printed as measured: a crash still leaves the lines before it
        res[label] = us = per_call_us(fn, args.calls, args.reps)
        base = res.get("F.linear", us)
        print(f"  {label:44s} {us:7.2f} us   ({us - base:+6.2f} vs F.linear)", flush=True)
    print("HOST " + " | ".join(f"{label}={us:.1f}" for label, us in res.items() if label.startswith("SparseLinear")))


if __name__ == "__main__":
    main()
