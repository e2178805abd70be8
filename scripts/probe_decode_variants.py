"""Time every variant of the decode kernel the dispatcher chooses between, the way it times them
(L2 scrubbed, CUDA-graph replays): packed layout vs the portable form read in place, register vs
ring pipeline, at the dispatcher's split candidates (``--sweep``: also every split-K from 1 to
the chunk count in steps, to see whether the candidates miss a better grid). Also says whether
a layer made by ``sf.sparsify`` can be read in place (``portable_ok``). Diagnostic, one GPU call:
    python scripts/probe_decode_variants.py --ms 1,16 [--sweep] [--layers o,down]
"""

import argparse

import torch

import sparseflow as sf
from sparseflow.kernels.decode import _effective_split, decode_mm, decode_mm_portable, portable_ok, split_candidates
from sparseflow.kernels.dispatch import _median_ms

SHAPES = {"o": (4096, 4096), "kv": (1024, 4096), "gate": (14336, 4096), "down": (4096, 14336)}
SWEEP = (1, 2, 3, 4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--layers", default=",".join(SHAPES))
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    for name in args.layers.split(","):
        n, k = SHAPES[name]
        c = sf.compress_2_4(sf.prune_2_4(torch.randn(n, k, device="cuda", dtype=torch.float16)))
        p = c.layout("decode")
        chunks = p.A.shape[1] // 4
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            res = {}
            for portable in (False, True):
                kind = "inplace" if portable else "packed"
                for ring in (False, True):
                    cands = split_candidates(p, m, ring=ring, portable=portable)
                    splits = sorted(
                        set(cands) | ({_effective_split(s, chunks) for s in SWEEP} if args.sweep else set())
                    )
                    for s in splits:
                        if portable:
                            fn = lambda x=x, c=c, s=s, r=ring: decode_mm_portable(x, c, None, s, ring=r)
                        else:
                            fn = lambda x=x, p=p, s=s, r=ring: decode_mm(x, p, None, s, r)
                        res[(kind, ring, s)] = _median_ms(fn)
                    if args.sweep:
                        row = " ".join(
                            f"{s}{'*' if s in cands else ''}:{res[(kind, ring, s)] * 1e3:.1f}" for s in splits
                        )
                        print(
                            f"  sweep {name} M={m} {kind} {'ring' if ring else 'regs'} (split:us, * = candidate): {row}"
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
