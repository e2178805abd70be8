"""Driver for Nsight Compute: one launch of each decode-kernel variant the dispatcher picks
between, and cuBLAS at the same shape, each inside an NVTX range ``prof`` so ncu profiles only
those (caches flushed per kernel by ncu). Run by scripts/gpu_check.sh with NCU=1:

    ncu --clock-control none --nvtx --nvtx-include "prof/" python scripts/profile_decode.py
"""

import argparse

import torch
import torch.nn.functional as F

import sparseflow as sf
from sparseflow.decode import decode_mm, decode_mm_portable, default_split

SHAPES = {"gate_up": (28672, 4096), "down": (4096, 14336)}


def prof(label: str, fn) -> None:
    fn()  # warm-up outside the range (lazy init, workspaces)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("prof")
    fn()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()
    print("profiled:", label, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--layers", default="gate_up,down")
    ap.add_argument("--in-place", action="store_true", help="also the portable form read in place")
    args = ap.parse_args()
    for name in args.layers.split(","):
        n, k = SHAPES[name]
        dense = sf.prune_2_4(torch.randn(n, k, device="cuda", dtype=torch.float16))
        c = sf.compress_2_4(dense)
        p = c.decode_packed()
        s = default_split(p)
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            prof(f"{name} M={m} cuBLAS", lambda: F.linear(x, dense))
            for ring in (False, True):
                prof(f"{name} M={m} packed {'ring' if ring else 'regs'} split {s}", lambda: decode_mm(x, p, None, s, ring))
                if args.in_place:
                    prof(f"{name} M={m} in-place {'ring' if ring else 'regs'} split {s}",
                         lambda: decode_mm_portable(x, c, None, s, ring=ring))


if __name__ == "__main__":
    main()
