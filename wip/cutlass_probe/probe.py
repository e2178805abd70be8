"""Feasibility probe: CUTLASS sm90a 2:4 GEMM configurations vs cuBLAS and our cuSPARSELt path.

python wip/cutlass_probe/probe.py LIB.so [--ms 256,1024,4096,16384] -- Llama-3-8B layers, fp16,
weights rotated past L2, CUDA-graph timing interleaved (sparseflow.timing)."""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import sys

import torch
import torch.nn.functional as F

import sparseflow as sf
from sparseflow import timing

LAYERS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
NAMES = [
    "128x128 c1x2 coop",
    "128x256 coop",
    "128x256 c2x1 coop",
    "64x128 ping",
    "64x256 ping",
    "128x128 streamK",
    "128x256 streamK",
    "128x128 c2x1 coop",
    "64x16 ping",
    "64x32 ping",
    "64x64 ping",
    "128x16 coop",
    "128x64 coop",
    "64x16x256 ping",
    "64x64x256 ping",
    "128x32x256 coop",
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("lib")
    ap.add_argument("--ms", default="16,64,256,1024")
    ap.add_argument("--layers", default="qkv,o,gate_up,down")
    ap.add_argument("--samples", type=int, default=9)
    ap.add_argument("--json")
    a = ap.parse_args()
    lib = ctypes.CDLL(a.lib)
    vp, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    cfgs = [c for c in range(len(NAMES)) if hasattr(lib, f"sf_probe_gemm{c}")]
    for c in cfgs:
        getattr(lib, f"sf_probe_gemm{c}").argtypes = [vp, vp, vp, vp, i32, i32, i32, vp, vp]
        getattr(lib, f"sf_probe_workspace{c}").argtypes = [i32, i32, i32]
        getattr(lib, f"sf_probe_workspace{c}").restype = ctypes.c_size_t
    lib.sf_probe_sizes.argtypes = [i32, i32, ctypes.POINTER(i64), ctypes.POINTER(i64)]
    lib.sf_probe_compress.argtypes = [vp, vp, vp, i32, i32, vp, vp]
    lib.sf_probe_compress_workspace.argtypes = [i32, i32]
    lib.sf_probe_compress_workspace.restype = ctypes.c_size_t
    dt = torch.float16
    rows = []
    for name in a.layers.split(","):
        n, k = LAYERS[name]
        ae, eb = i64(), i64()
        lib.sf_probe_sizes(n, k, ctypes.byref(ae), ctypes.byref(eb))
        for m in map(int, a.ms.split(",")):
            stream = torch.cuda.current_stream().cuda_stream
            sets = max(2, min(16, math.ceil((256 << 20) / (n * k * 2 + m * k * 2))))
            ws = [sf.prune_2_4(torch.randn(n, k, device="cuda", dtype=dt)) for _ in range(sets)]
            xs = [torch.randn(m, k, device="cuda", dtype=dt) for _ in range(sets)]
            packs = []
            cws = torch.zeros(max(1, lib.sf_probe_compress_workspace(n, k)), device="cuda", dtype=torch.uint8)
            for w in ws:
                A = torch.empty(ae.value, device="cuda", dtype=dt)
                E = torch.empty(eb.value, device="cuda", dtype=torch.uint8)
                rc = lib.sf_probe_compress(w.data_ptr(), A.data_ptr(), E.data_ptr(), n, k, cws.data_ptr(), stream)
                assert rc == 0, f"compress rc={rc}"
                packs.append((A, E))
            comp = [sf.compress_2_4(w) for w in ws]
            ours = sf.extension_available()
            if ours:
                sf.sparse_mm(xs[0], comp[0])  # the dispatcher measures (cuSPARSELt searched + tuned, decode kernel)
            d = sf.DISPATCHER.lookup(ws[0].device, dt, n, k, m) if ours else None
            wsz = max(getattr(lib, f"sf_probe_workspace{c}")(n, m, k) for c in cfgs)
            work = torch.empty(max(wsz, 1), device="cuda", dtype=torch.uint8)
            ys = [torch.empty(m, n, device="cuda", dtype=dt) for _ in range(sets)]
            ref = F.linear(xs[0].float(), ws[0].float())

            def call(c, i, packs=packs, xs=xs, ys=ys, work=work, n=n, m=m, k=k):
                def f():
                    rc = getattr(lib, f"sf_probe_gemm{c}")(
                        packs[i][0].data_ptr(),
                        packs[i][1].data_ptr(),
                        xs[i].data_ptr(),
                        ys[i].data_ptr(),
                        n,
                        m,
                        k,
                        work.data_ptr(),
                        torch.cuda.current_stream().cuda_stream,
                    )
                    if rc:
                        raise RuntimeError(f"cfg {c} rc={rc}")

                return f

            cols = {"cublas": [lambda w=w, x=x: F.linear(x, w) for w, x in zip(ws, xs)]}
            if ours:
                cols["sparseflow"] = [lambda c=c, x=x: sf.sparse_mm(x, c, backend="sparse") for c, x in zip(comp, xs)]
            errs = {}
            for c in cfgs:
                ys[0].fill_(float("nan"))
                try:
                    call(c, 0)()
                    torch.cuda.synchronize()
                except RuntimeError as exc:
                    errs[c] = str(exc)
                    continue
                err = ((ys[0].float() - ref).abs().max() / ref.abs().max()).item()
                errs[c] = f"{err:.1e}"
                if not err < 1e-2:
                    continue
                cols[f"cfg{c}"] = [call(c, i) for i in range(sets)]
            t = timing.interleaved_ms(cols, a.samples)
            row = {"name": name, "M": m, "N": n, "K": k, "ms": t, "errors": errs, "ours": d.best_sparse if d else None}
            rows.append(row)
            best = min((v, kk) for kk, v in t.items() if kk.startswith("cfg")) if len(t) > 1 + ours else (math.nan, "-")
            print(
                f"{name:8s} M={m:6d} cuBLAS {t['cublas']:.4f} "
                + (f"ours({d.best_sparse}) {t['cublas'] / t['sparseflow']:.2f}x " if ours else "")
                + f"best cutlass {best[1]} {t['cublas'] / best[0]:.2f}x | "
                + " ".join(f"{kk}={t['cublas'] / v:.2f}" for kk, v in t.items() if kk.startswith("cfg"))
                + f" | err {errs}",
                flush=True,
            )
            torch.cuda.empty_cache()

    def gm(*keys):  # geomean over rows of cuBLAS / the fastest of keys
        vals = [
            r["ms"]["cublas"] / min(v for kk, v in r["ms"].items() if kk in keys)
            for r in rows
            if any(kk in keys for kk in r["ms"])
        ]
        return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else math.nan

    print(
        f"SUMMARY geomean x cuBLAS: ours {gm('sparseflow'):.3f} cutlass-best {gm(*(f'cfg{c}' for c in cfgs)):.3f} "
        f"ours-or-cutlass {gm('sparseflow', *(f'cfg{c}' for c in cfgs)):.3f} "
        + " ".join(f"cfg{c}={gm(f'cfg{c}'):.3f}" for c in cfgs)
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"names": NAMES, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
