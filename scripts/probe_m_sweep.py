"""Every 2:4 kernel against dense cuBLAS across token counts that are not powers of two.

For each layer shape and M: F.linear, each CUTLASS configuration, cuSPARSELt (layout 1, the
library's search at that exact M, and the plan searched at the power-of-two bucket above it
applied at M), and SparseLinear as dispatched, with the configuration its bucket's CUTLASS plan
runs at M, the plan's estimate and that configuration's time measured here. With --pad, each
CUTLASS configuration is also timed with x padded to a whole number of its token tiles (does a
part-filled last tile cost more than a full one?). Times are the dispatcher's own (CUDA-graph
replay, L2 scrubbed). Prints one line per (shape, M) and writes JSON to --out.

    python scripts/probe_m_sweep.py --out /tmp/probe
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tree's benchmarks/ and sparseflow/
import sparseflow as sf
from benchmarks.bench_dense_vs_sparse import LLAMA3_8B, QWEN25_7B
from sparseflow._ext import _C
from sparseflow.kernels import cutlass
from sparseflow.kernels.dispatch import DISPATCHER, Variant, _median_ms, cutlass_steps, estimate_ms, m_bucket

# the layer widths the layer benchmark measures (benchmarks/bench_dense_vs_sparse.py), by name
SHAPES = {f"llama_{name}": shape for name, shape in LLAMA3_8B.items()} | QWEN25_7B
MS = [200, 256, 300, 333, 384, 448, 512, 700, 1024, 1337, 2048, 3000, 5000]


def _row(a, name, n, k, m, dtype, w, cw, packed, layer, ncfg) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    r = {"shape": name, "N": n, "K": k, "M": m}
    r["dense"] = _median_ms(lambda: F.linear(x, w))
    r["cutlass"] = [_median_ms(lambda i=i: cutlass.cutlass_mm(x, cw, i)) for i in range(ncfg)]
    if a.pad:
        r["cutlass_padded"] = [
            _median_ms(lambda i=i: cutlass.PaddedRun(cutlass.token_tile(dtype, i))(x, cw, i, None)) for i in range(ncfg)
        ]
    try:
        if not a.cslt:
            raise LookupError("skipped")
        cfg = [int(v) for v in _C.cslt_search(x, packed, n, 1, 256)[:4]]
        r["cslt_own"] = _median_ms(lambda: _C.cslt_mm(x, packed, n, cfg, 1))
        xb = torch.randn(m_bucket(m), k, device="cuda", dtype=dtype)
        cfgb = [int(v) for v in _C.cslt_search(xb, packed, n, 1, 256)[:4]]
        r["cslt_bucketcfg"] = _median_ms(lambda: _C.cslt_mm(x, packed, n, cfgb, 1))
        r["cslt_cfgs"] = [cfg, cfgb]
    except (RuntimeError, LookupError) as exc:
        r["cslt_err"] = str(exc)[:200]
    if a.dispatch:
        try:
            t1 = time.time()
            layer(x)
            r["measure_s"] = time.time() - t1
            r["sparselinear"] = _median_ms(lambda: layer(x))
            d = DISPATCHER.lookup(w.device, dtype, n, k, m)
            r["choice"] = d.choice if d else None
            r["choice_cfg"] = d.cutlass_cfg if d else None
            r["pad"] = bool(d and d.cutlass_pad)
            r["resident"] = layer.resident
            _plan(r, DISPATCHER.lookup(w.device, dtype, n, k, m, only="cutlass") or d, m, dtype)
        except Exception:  # noqa: BLE001 -- a probe: report and go on with the kernels
            traceback.print_exc()
            a.dispatch = 0
    return _print(r, name, m)


def _plan(r: dict, d, m: int, dtype: torch.dtype) -> None:
    """What the bucket's CUTLASS plan runs at this M, the time it estimated for it, and that
    configuration's time measured here (is ``cutlass_plan``'s interpolation by tile count right?)."""
    if d is None or d.cutlass_ms is None:
        return
    step = cutlass.step_at(cutlass_steps(d, m_bucket(m), dtype), m)
    r["plan"] = [step.cfg, step.tile > 0]
    v = next((Variant(*v) for v in d.cutlass_variants if (v[0], v[1]) == (step.cfg, step.tile > 0)), None)
    if v is not None:
        r["plan_estimate"] = estimate_ms(v, m, d.m_lo, m_bucket(m), cutlass.token_tile(dtype, step.cfg))
    measured = r.get("cutlass_padded" if step.tile else "cutlass")
    if measured:
        r["plan_measured"] = measured[step.cfg]


def _print(r: dict, name: str, m: int) -> dict:
    best_cut = min(r["cutlass"])
    pad = r.get("cutlass_padded")
    print(
        f"{name:14s} M={m:5d} dense={r['dense'] * 1e3:8.1f}us "
        f"cutlass=[{' '.join(f'{t * 1e3:.1f}' for t in r['cutlass'])}] best={r['dense'] / best_cut:.2f}x "
        + (f"padded=[{' '.join(f'{t * 1e3:.1f}' for t in pad)}] best={r['dense'] / min(pad):.2f}x " if pad else "")
        + f"cslt_own={r.get('cslt_own', 0) * 1e3:.1f} cslt_bkt={r.get('cslt_bucketcfg', 0) * 1e3:.1f} "
        f"SL={r.get('sparselinear', 0) * 1e3:.1f} ({r['dense'] / r.get('sparselinear', r['dense']):.2f}x "
        f"{r.get('choice')}/{r.get('choice_cfg')}{'/pad' if r.get('pad') else ''} runs {r.get('resident')} "
        f"{r.get('measure_s', 0):.1f}s)"
        + (
            f" plan={r['plan']} est={r.get('plan_estimate', 0) * 1e3:.1f} meas={r.get('plan_measured', 0) * 1e3:.1f}"
            if "plan" in r
            else ""
        ),
        flush=True,
    )
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="probe_out")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--dispatch", type=int, default=1)
    ap.add_argument("--cslt", type=int, default=1, help="0: skip cuSPARSELt's searches")
    ap.add_argument("--memory", default="compact", choices=["compact", "fast"], help="the SparseLinear's mode")
    ap.add_argument("--pad", type=int, default=0, help="1: also time each CUTLASS configuration on padded x")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    rows = []
    t0 = time.time()
    for name in a.shapes.split(","):
        n, k = SHAPES[name]
        w = sf.prune_2_4(torch.randn(n, k, device="cuda", dtype=dtype))
        c = sf.compress_2_4(w)
        cw = c.layout("cutlass")
        packed = c.layout("cusparselt", 1).packed if a.cslt else None
        layer = sf.SparseLinear.from_compressed(c, memory=a.memory)
        ncfg = len(cutlass.configs(dtype))
        for m in [int(v) for v in a.ms.split(",")]:
            r = _row(a, name, n, k, m, dtype, w, cw, packed, layer, ncfg)
            rows.append(r)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    found = re.search(r"\b([A-Z]\d{2,4})\b", torch.cuda.get_device_name())  # "NVIDIA H100 80GB HBM3" -> h100
    gpu = found.group(1).lower() if found else "gpu"
    (out / f"probe_m_{gpu}_{a.dtype}.json").write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows}))
    print(f"probe done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
