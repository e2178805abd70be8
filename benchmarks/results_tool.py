"""Result files of bench_dense_vs_sparse.py.

merge: a partial run into a result file. The new run's rows replace the base's rows with the same
(name, M, dtype) and carry a run label and that run's copy bandwidth; the row-derived summary is
recomputed over the merged rows and the plot redrawn. The base's per-run fields stay; the new
run's (host overhead, conversion time, tuner records) are added under the label. For a kernel
change that only touches some rows (e.g. the decode kernel: M <= 64):
    python benchmarks/results_tool.py merge benchmarks/results/linear_h200.json run/linear_h200.json \
        --label "H200 2026-12-04 call 4"
table: the README's Markdown table of a result file (older labels "session 12 ..." shortened to s12):
    python benchmarks/results_tool.py table benchmarks/results/linear_h200.json
finish: a run cut short by its time limit (rows, no summary): the row-derived summary, the rows it
did not reach (from the grid the run recorded, else the default grid), the plot and the SUMMARY
line, with host cost and conversion time marked as not measured:
    python benchmarks/results_tool.py finish run/linear_h100.json --out benchmarks/results/linear_h100.json
"""

import argparse
import json
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_dense_vs_sparse import grid_of, measured_key, parser, plot, row_key, summarize, summary_line


def merge(base: dict, new: dict, label: str) -> dict:
    """The merged result (``base`` and ``new`` are left as they were)."""
    if base["device"] != new["device"]:
        raise ValueError(f"results_tool merge: base is from {base['device']!r}, the new run from {new['device']!r}")
    if "summary" not in new:
        raise ValueError("results_tool merge: the new run has no summary (cut short?)")
    base_copy = next((v for k, v in base["summary"].items() if k.startswith("copy_bandwidth_gbps")), None)
    # a base cut short before it measured the copy bandwidth (``finish``) has none to give its rows
    kept = {} if base_copy is None or math.isnan(base_copy) else {"copy_bandwidth_gbps": base_copy}
    new_copy = new["summary"]["copy_bandwidth_gbps"]
    fresh = {measured_key(r): {**r, "run": label, "copy_bandwidth_gbps": new_copy} for r in new["rows"]}
    rows = [fresh.pop(measured_key(r), None) or {**kept, **r} for r in base["rows"]]
    rows += fresh.values()  # rows the base did not have
    slug = re.sub(r"\W+", "_", label).strip("_")
    derived = summarize(rows, new_copy)
    summary = {k: v for k, v in base["summary"].items() if k not in derived} | derived
    for field in ("host_us_per_call", "conversion", "cusparselt_tuner"):
        if field in new["summary"]:
            summary[f"{field}_{slug}"] = new["summary"][field]
    note = base.get("note", "")
    note += f" Rows with run='{label}' ({len(new['rows'])}) replace the earlier rows of the same layer, M and dtype."
    out = {**base, "torch": new.get("torch", base.get("torch")), "rows": rows, "summary": summary, "note": note.strip()}
    if "missing_rows" in base:  # a cut-short base: the rows the new run measured are no longer missing
        have = {measured_key(r) for r in rows}
        out["missing_rows"] = [g for g in base["missing_rows"] if tuple(g) not in have]
        if not out["missing_rows"]:
            del out["missing_rows"]
    return out


def finish(data: dict) -> dict:
    """A cut-short run's result with its summary (``data`` is left as it was). Rows the run did not
    reach are listed under ``missing_rows``; with no rows missing it is a whole run."""
    if "summary" in data:
        raise ValueError("results_tool finish: the run has a summary already (it was not cut short)")
    planned = data.get("grid") or [list(row_key(g)) for g in grid_of(parser().parse_args([]))]
    have = {measured_key(r) for r in data["rows"]}
    missing = [g for g in planned if tuple(g) not in have]
    out = {k: v for k, v in data.items() if k != "partial"}
    out["summary"] = summarize(data["rows"], float("nan"))  # the copy bandwidth is measured after the rows
    out["missing_rows"] = missing
    if missing:
        out["note"] = (
            f"{data.get('note', '')} Cut short by its time limit: {len(missing)} of {len(planned)} rows not "
            "measured (missing_rows); host cost, conversion time and copy bandwidth not measured."
        ).strip()
    return out


def markdown_table(data: dict) -> str:
    def ms(v):
        return f"{v:.4f}" if v else "-"

    def x(r, key):
        return f"{r['cublas_ms'] / r[key]:.2f}" if r.get(key) else "-"

    def run(label):
        found = re.match(r"session (\d+)", label or "")
        return f"s{found.group(1)}" if found else (label or "-")

    lines = [
        (
            "| layer | dtype | M | N | K | cuBLAS ms | PyTorch 2:4 ms | cuSPARSELt ms | CUTLASS ms | decode ms "
            "| SparseLinear ms | cuSPARSELt x | CUTLASS x | decode x | SparseLinear x | PyTorch x "
            "| chosen (cuSPARSELt layout) | run |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        choice = r["choice"] + (f" ({r['cusparselt_layout']})" if r["choice"] == "cusparselt" else "")
        lines.append(
            f"| {r['name']} | {r['dtype'].replace('bfloat', 'bf').replace('float', 'fp')} | {r['M']} | {r['N']} | "
            f"{r['K']} | {r['cublas_ms']:.4f} | {ms(r.get('torch_ms'))} | {ms(r.get('cusparselt_ms'))} | "
            f"{ms(r.get('cutlass_ms'))} | {ms(r.get('decode_ms'))} | {ms(r['sparseflow_ms'])} | "
            f"{x(r, 'cusparselt_ms')} | {x(r, 'cutlass_ms')} | {x(r, 'decode_ms')} | "
            f"{x(r, 'sparseflow_ms')} | {x(r, 'torch_ms')} | {choice} | {run(r.get('run'))} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge")
    m.add_argument("base", type=Path)
    m.add_argument("new", type=Path)
    m.add_argument("--label", required=True)
    m.add_argument("--out", type=Path, help="default: overwrite base (and its .png)")
    t = sub.add_parser("table")
    t.add_argument("file", type=Path)
    f = sub.add_parser("finish")
    f.add_argument("file", type=Path)
    f.add_argument("--out", type=Path, help="default: overwrite the file (and its .png)")
    args = ap.parse_args()
    if args.cmd == "table":
        print(markdown_table(json.loads(args.file.read_text())))
        return
    if args.cmd == "finish":
        done = finish(json.loads(args.file.read_text()))
        out = args.out or args.file
        out.write_text(json.dumps(done, indent=1))
        try:
            plot(done["rows"], out.with_suffix(".png"), done["device"])
        except ImportError:
            print("(matplotlib missing: no plot)")
        if done["missing_rows"]:
            print(f"{out}: not measured: " + "; ".join(f"{n} {d} M={m}" for n, m, d in done["missing_rows"]))
        print(summary_line(done["device"], done["rows"], done["summary"], None, None))
        return
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
