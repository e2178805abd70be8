"""Time every variant of the decode kernel the dispatcher chooses between, the way it times them
(L2 scrubbed, CUDA-graph replays): packed layout vs the portable form read in place, register vs
ring pipeline, at the dispatcher's split candidates. Also says whether a layer made by
``sf.sparsify`` can be read in place (``portable_ok``). Diagnostic, one GPU call:
    python scripts/probe_decode_variants.py --ms 1,16
"""

import argparse

import torch

import sparseflow as sf
from sparseflow.decode import decode_mm, decode_mm_portable, portable_ok, split_candidates
from sparseflow.dispatch import _median_ms

SHAPES = {"o": (4096, 4096), "kv": (1024, 4096), "gate": (14336, 4096), "down": (4096, 14336)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,16")
    args = ap.parse_args()
    for name, (n, k) in SHAPES.items():
        c = sf.compress_2_4(sf.prune_2_4(torch.randn(n, k, device="cuda", dtype=torch.float16)))
        p = c.decode_packed()
        splits = split_candidates(p)
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            res = {}
            for ring in (False, True):
                for s in splits:
                    res[("packed", ring, s)] = _median_ms(lambda x=x, p=p, s=s, r=ring: decode_mm(x, p, None, s, r))
                    res[("inplace", ring, s)] = _median_ms(
                        lambda x=x, c=c, s=s, r=ring: decode_mm_portable(x, c, None, s, ring=r)
                    )
            best = {kind: min((t, key) for key, t in res.items() if key[0] == kind) for kind in ("packed", "inplace")}
            line = " ".join(
                f"{kind} {t * 1e3:6.1f}us ({'ring' if key[1] else 'regs'}, split {key[2]})"
                for kind, (t, key) in best.items()
            )
            print(
                f"{name:>5} N={n:5d} K={k:5d} M={m:2d}: {line}  in-place/packed {best['inplace'][0] / best['packed'][0]:.3f}"
            )

    try:
        model = torch.nn.Sequential(torch.nn.Linear(4096, 1024), torch.nn.Linear(1024, 4096)).half().cuda()
        sf.sparsify(model)
        w = model[0].weight_2_4
        print(
            f"sparsify'd layer: portable_ok={portable_ok(w)} values {w.values.dtype} {tuple(w.values.shape)} "
            f"contiguous={w.values.is_contiguous()} ptr%16={w.values.data_ptr() % 16} meta {w.meta.dtype} "
            f"{tuple(w.meta.shape)} contiguous={w.meta.is_contiguous()} ptr%16={w.meta.data_ptr() % 16}"
        )
    except Exception as e:  # noqa: BLE001 -- a diagnostic: report and go on
        print("sparsify check failed:", repr(e))


if __name__ == "__main__":
    main()
