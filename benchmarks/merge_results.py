"""Merge a partial benchmark run into a result file: the new run's rows replace the base's rows
with the same (name, M, dtype) and carry a run label and that run's copy bandwidth; the
row-derived summary is recomputed over the merged rows and the plot redrawn. The base's per-run
fields stay; the new run's (host overhead, conversion time, tuner records) are added under the
label. Used when a kernel change only touches some rows (e.g. the decode kernel: M <= 64):
    python benchmarks/merge_results.py benchmarks/results/linear_h200.json run/linear_h200.json \
        --label "session 12 call 4"
"""

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_dense_vs_sparse import plot, summarize


def merge(base: dict, new: dict, label: str) -> dict:
    """The merged result (``base`` and ``new`` are left as they were)."""
    if base["device"] != new["device"]:
        raise ValueError(f"merge_results: base is from {base['device']!r}, the new run from {new['device']!r}")
    if "summary" not in new:
        raise ValueError("merge_results: the new run has no summary (cut short?)")
    base_copy = next((v for k, v in base["summary"].items() if k.startswith("copy_bandwidth_gbps")), None)
    new_copy = new["summary"]["copy_bandwidth_gbps"]
    key = lambda r: (r["name"], r["M"], r["dtype"])
    fresh = {key(r): {**r, "run": label, "copy_bandwidth_gbps": new_copy} for r in new["rows"]}
    rows = [fresh.pop(key(r), None) or {"copy_bandwidth_gbps": base_copy, **r} for r in base["rows"]]
    rows += fresh.values()  # rows the base did not have
    slug = re.sub(r"\W+", "_", label).strip("_")
    derived = summarize(rows, new_copy)
    summary = {k: v for k, v in base["summary"].items() if k not in derived} | derived
    for field in ("host_us_per_call", "conversion", "cusparselt_tuner"):
        if field in new["summary"]:
            summary[f"{field}_{slug}"] = new["summary"][field]
    note = base.get("note", "")
    note += f" Rows with run='{label}' ({len(new['rows'])}) replace the earlier rows of the same layer, M and dtype."
    return {
        **base,
        "torch": new.get("torch", base.get("torch")),
        "rows": rows,
        "summary": summary,
        "note": note.strip(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--label", required=True)
    ap.add_argument("--out", type=Path, help="default: overwrite base (and its .png)")
    args = ap.parse_args()
    merged = merge(json.loads(args.base.read_text()), json.loads(args.new.read_text()), args.label)
    out = args.out or args.base
    out.write_text(json.dumps(merged, indent=1))
    plot(merged["rows"], out.with_suffix(".png"), merged["device"])
    s = merged["summary"]
    print(
        f"{out}: {len(merged['rows'])} rows; SparseLinear/cuBLAS min={s['sparselinear_min_ratio']:.3f}x, "
        f"kernel geomean Llama M>=256={s['kernel_geomean_llama_m_ge_256']:.2f}x, "
        f"gate_up/down M<=16 min={s['kernel_min_gate_up_down_m_le_16']:.2f}x"
    )


if __name__ == "__main__":
    main()
