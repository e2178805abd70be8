"""Why a part-filled last token tile costs more than a full one (CUTLASS sm90, ``mm_padded``).

At M rows that are not a whole number of a configuration's token tiles, the same configuration
runs faster on x padded to whole tiles (a copy of x included) than on x as it is, with the same
tile count (benchmarks/NOTES.md). This separates the candidate causes, per (shape, M,
configuration), in the dispatcher's own timing (CUDA-graph replay, L2 scrubbed):

* ``plain``: x of M rows, the GEMM told M;
* ``view``: x of M rows as a view of a buffer of whole tiles, the GEMM told M (the same bytes
  around x as padding has; only the extent the kernel is given differs from ``whole``);
* ``whole``: that buffer, the GEMM told the whole-tile row count (no copy);
* ``padded``: ``mm_padded`` (the copy into a fresh whole-tile buffer, then ``whole``).

If ``view`` is as slow as ``plain`` and ``whole`` as fast as ``padded`` less its copy, the cost is
in how the kernel handles an extent that ends inside a tile (its TMA boxes cross the end of the
tensor), not in memory placement or L2 state.

    python scripts/probe_tail_tile.py --out /tmp/probe
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sparseflow as sf
from benchmarks.bench_dense_vs_sparse import LLAMA3_8B, QWEN25_7B, gpu_tag
from sparseflow.kernels import cutlass
from sparseflow.kernels.dispatch import _median_ms

SHAPES = {f"llama_{name}": shape for name, shape in LLAMA3_8B.items()} | QWEN25_7B
# (shape, M, configuration): points where padding measured much faster (gate/up at 333 with 128 x
# 128 stream-K; down at 333 with 128 x 64) and one where it did not (o at 700, 128 x 192 stream-K)
POINTS = [("llama_gate_up", 333, 7), ("llama_down", 333, 2), ("llama_o", 700, 9), ("llama_gate_up", 700, 9)]


def _point(name: str, m: int, cfg: int, dtype: torch.dtype) -> dict:
    n, k = SHAPES[name]
    w = sf.compress_2_4(sf.prune_2_4(torch.randn(n, k, device="cuda", dtype=dtype)))
    cw = w.layout("cutlass")
    rows_whole = cutlass.padded_rows(m, cutlass.token_tile(dtype, cfg))
    buf = torch.randn(rows_whole, k, device="cuda", dtype=dtype)
    x, view = buf[:m].clone(), buf[:m]
    r = {"shape": name, "N": n, "K": k, "M": m, "whole_rows": rows_whole, "cfg": cutlass.configs(dtype)[cfg]}
    r["plain"] = _median_ms(lambda: cutlass.mm_unchecked(x, cw, cfg))
    r["view"] = _median_ms(lambda: cutlass.mm_unchecked(view, cw, cfg))
    r["whole"] = _median_ms(lambda: cutlass.mm_unchecked(buf, cw, cfg))
    r["padded"] = _median_ms(lambda: cutlass.mm_padded(x, cw, cfg, rows_whole))
    r["copy"] = _median_ms(lambda: buf[:m].copy_(x))
    y_view, y_whole = cutlass.mm_unchecked(view, cw, cfg), cutlass.mm_unchecked(buf, cw, cfg)[:m]
    r["same_output"] = bool(torch.equal(y_view, y_whole))
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="probe_out")
    ap.add_argument("--dtype", default="float16")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    rows = []
    for name, m, cfg in POINTS:
        r = _point(name, m, cfg, dtype)
        rows.append(r)
        print(
            f"TAIL {name} M={m} ({r['whole_rows']} whole) {r['cfg']}: plain {r['plain'] * 1e3:.1f} us, view "
            f"{r['view'] * 1e3:.1f}, whole {r['whole'] * 1e3:.1f}, padded {r['padded'] * 1e3:.1f} (copy "
            f"{r['copy'] * 1e3:.1f}); outputs equal: {r['same_output']}",
            flush=True,
        )
        torch.cuda.empty_cache()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"probe_tail_{gpu_tag(torch.cuda.get_device_name())}_{a.dtype}.json").write_text(
        json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
