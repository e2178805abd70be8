"""Driver for Nsight Compute: one launch of each decode-kernel variant the dispatcher picks
between (the default split-K grid and twice it; registers, optionally the ring pipeline), and cuBLAS at the
same shape, each inside an NVTX range ``prof`` so ncu profiles only those (ncu flushes the caches
before each kernel). Run by scripts/gpu_check.sh with NCU=1:

    ncu --clock-control none --nvtx --nvtx-include "prof/" python scripts/profile_decode.py
"""

import argparse

import torch
import torch.nn.functional as F

import sparseflow as sf
from sparseflow.kernels.decode import decode_mm, decode_mm_portable, default_split

SHAPES = {"gate_up": (28672, 4096), "down": (4096, 14336), "o": (4096, 4096)}


def prof(label: str, fn, *args, **kwargs) -> None:
    fn(*args, **kwargs)  # warm-up outside the range (lazy init, workspaces)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("prof")
    fn(*args, **kwargs)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()
    print("profiled:", label, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--layers", default="gate_up,down")
    ap.add_argument("--in-place", action="store_true", help="also the portable form read in place")
    ap.add_argument("--ring", action="store_true", help="also the shared-memory ring pipeline")
    args = ap.parse_args()
    for name in args.layers.split(","):
        n, k = SHAPES[name]
        dense = sf.prune_2_4(torch.randn(n, k, device="cuda", dtype=torch.float16))
        c = sf.compress_2_4(dense)
        p = c.layout("decode")
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            prof(f"{name} M={m} cuBLAS", F.linear, x, dense)
            for ring in (False, True) if args.ring else (False,):
                for s in (default_split(p), 2 * default_split(p)):
                    tag = f"{name} M={m} {'ring' if ring else 'regs'} split {s}"
                    prof(f"{tag} packed", decode_mm, x, p, None, s, ring)
                    if args.in_place:
                        prof(f"{tag} in-place", decode_mm_portable, x, c, None, s, ring=ring)


if __name__ == "__main__":
    main()
