"""2:4 GEMM benchmark: cuBLAS vs PyTorch's semi-structured sparsity vs sparseflow, in one run.

y = x @ W^T for square problems (M=N=K) and Llama-3-8B layers x M, fp16 and bf16. Columns:
cuBLAS (``F.linear``), PyTorch ``to_sparse_semi_structured``, cuSPARSELt through sparseflow
(searched plan), CUTLASS's sm90 kernels (Hopper, at the dispatcher's configuration), our decode
kernel (M <= 64), the fastest of these 2:4 kernels ("kern x", i.e. forced sparse) and
``SparseLinear`` as dispatched. For the decode kernel the achieved HBM bandwidth (compressed
weight + x + y bytes / time) is reported against a measured copy. Each figure is the median over
samples; a sample is one pass over a rotation of weight/input sets whose total
size exceeds the L2 cache (so weights come from HBM, as in a real model), captured in a CUDA graph
so that GPU time, not Python launch cost, is measured (host cost per call is reported apart). Writes
``benchmarks/results/linear_<gpu>.json`` and a PNG of speedup over cuBLAS vs M per layer.

    python benchmarks/bench_dense_vs_sparse.py            # full grid (~5 min on an H100/H200)
    python benchmarks/bench_dense_vs_sparse.py --quick    # a few rows
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import sparseflow as sf
from sparseflow.kernels import cutlass, timing
from sparseflow.kernels.cusparselt_tuner import TUNER
from sparseflow.kernels.decode import DECODE_MAX_M, decode_mm, decode_mm_portable, portable_ok
from sparseflow.kernels.dispatch import cutlass_steps, m_bucket
from sparseflow.nn import SparseLinear

LLAMA3_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
# Qwen2.5-7B: hidden 3584, 28 query / 4 key-value heads of 128, intermediate 18944 (its config.json)
QWEN25_7B = {
    "qwen_qkv": (4608, 3584),
    "qwen_o": (3584, 3584),
    "qwen_gate_up": (37888, 3584),
    "qwen_down": (3584, 18944),
}
MODELS = {"llama3_8b": LLAMA3_8B, "qwen2.5_7b": QWEN25_7B}
# Token counts a user runs, not only powers of two: prompt lengths and batch sizes as they come.
MS = [1, 3, 8, 12, 16, 40, 64, 100, 256, 300, 700, 1024, 1337, 3000, 4096, 5000, 16384]
FLOOR = 0.98  # a SparseLinear row below this ratio to cuBLAS is reported as a failure
SQUARE = [2048, 4096, 8192, 16384]
ROTATE_BYTES = 256 << 20  # several times the 50-60 MB L2


def gpu_tag(name: str) -> str:
    """The GPU's model for result file names: "NVIDIA H100 80GB HBM3" -> "h100"."""
    found = re.search(r"\b([A-Z]+\d+[A-Z]*)\b", name)
    return (found.group(1) if found else re.sub(r"\W+", "_", name)).lower()


def median_ms(fns, samples: int) -> float:
    """GPU time per call: one pass over fns captured in a CUDA graph, replayed between CUDA events
    (median of samples); eager launches where a call cannot be captured."""
    return timing.median_ms(fns, samples)


def torch_semi_structured(w: torch.Tensor):
    from torch.sparse import to_sparse_semi_structured

    return to_sparse_semi_structured(w)


class _Skipped(Exception):
    """The torch column was left out (--skip torch)."""


def comma_list(choices: tuple) -> callable:
    def parse(text: str) -> list[str]:
        items = [t for t in text.split(",") if t]
        bad = [t for t in items if t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(choices)}")
        return items

    return parse


SKIPPABLE = ("portable", "forced", "torch")  # columns --skip can leave out (to fit a grid in a device call)


def bench_row(name, m, n, k, dtype, samples, torch_budget_ms=2000.0, skip=()):
    dense_bytes = n * k * 2 + m * k * 2
    sets = max(2, min(32, math.ceil(ROTATE_BYTES / dense_bytes)))
    ws = [sf.prune_2_4(torch.randn(n, k, device="cuda", dtype=dtype)) for _ in range(sets)]
    xs = [torch.randn(m, k, device="cuda", dtype=dtype) for _ in range(sets)]
    row = {"name": name, "M": m, "N": n, "K": k, "dtype": str(dtype).replace("torch.", ""), "sets": sets}

    comp = [sf.compress_2_4(w) for w in ws]
    # The default (memory="compact": one layout, that of the kernel the layer keeps) and
    # memory="fast" (each M-bucket's fastest kernel, dense included, at the memory of its layouts)
    layers = [SparseLinear.from_compressed(sf.compress_2_4(w), None) for w in ws]
    fast = [SparseLinear.from_compressed(c, None, memory="fast") for c in comp]
    fast[0](xs[0])  # the dispatcher measures this shape once (not timed)
    for sl, x in zip(layers, xs):
        sl(x)  # builds each layer's one layout
    # Interleaved: SparseLinear may run the very same cuBLAS call, and must not look slower (or
    # faster) only because the GPU clocks down over the row.
    both = timing.interleaved_ms(
        {
            "cublas_ms": [lambda w=w, x=x: F.linear(x, w) for w, x in zip(ws, xs)],
            "sparseflow_ms": [lambda sl=sl, x=x: sl(x) for sl, x in zip(layers, xs)],
            "sparseflow_fast_ms": [lambda sl=sl, x=x: sl(x) for sl, x in zip(fast, xs)],
        },
        samples,
    )
    row.update(both)
    row["resident"] = layers[0].resident
    row["bytes_vs_dense"] = {  # the weight's device bytes over the dense weight's, per mode
        "compact": layers[0].memory_bytes()["total"] / (n * k * ws[0].element_size()),
        "fast": fast[0].memory_bytes()["total"] / (n * k * ws[0].element_size()),
    }
    d = sf.DISPATCHER.lookup(ws[0].device, dtype, n, k, m)
    for key, backend in (("cusparselt_ms", "cusparselt"), ("cutlass_ms", "cutlass"), ("decode_ms", "decode")):
        row[key] = None
        if "forced" in skip:
            continue
        if backend == "decode" and m > DECODE_MAX_M:
            continue
        if backend == "cutlass" and (d is None or d.cutlass_ms is None):  # not Hopper / not built / shape
            continue
        row[key] = median_ms(
            [lambda c=c, x=x, b=backend: sf.sparse_mm(x, c, backend=b) for c, x in zip(comp, xs)], samples
        )
    row["sparse_kernel_ms"] = min(
        (t for t in (row["cusparselt_ms"], row["cutlass_ms"], row["decode_ms"]) if t), default=None
    )
    if row["decode_ms"]:  # bytes moved / time: compressed weight + x + y (dense: weight + x + y)
        row["decode_gbps"] = (n * k * 1.125 + m * k * 2 + m * n * 2) / row["decode_ms"] / 1e6
        row["cublas_gbps"] = (n * k * 2 + m * k * 2 + m * n * 2) / row["cublas_ms"] / 1e6
        row["decode_vs_cublas_bandwidth"] = row["decode_gbps"] / row["cublas_gbps"]
    row["choice"], row["cusparselt_cfg"] = (d.choice, d.cfg) if d else (None, None)
    row["cusparselt_layout"] = d.layout if d and d.sparse_ms else None  # 1: searched in-process, 4: tuner
    row["cutlass_cfg"] = cutlass.configs(dtype)[d.cutlass_cfg] if d and d.cutlass_ms is not None else None
    row["cutlass_pad"] = d.cutlass_pad if d and d.cutlass_ms is not None else None  # x padded to the bucket top
    # what runs at this M: the bucket's plan picks a configuration per M by token-tile count
    step = cutlass.step_at(cutlass_steps(d, m_bucket(m), dtype), m) if row["cutlass_cfg"] else None
    row["cutlass_at_m"] = [cutlass.configs(dtype)[step.cfg], step.tile > 0] if step else None
    row["decode_split"] = d.decode_split if d else None
    row["decode_ring"] = d.decode_ring if d else None  # which weight pipeline the dispatcher timed fastest
    # What the dispatcher measured (L2 scrubbed, one weight) when it chose: beside the columns
    # above (weights rotated) it shows where the two methods disagree on a close call.
    row["dispatch_ms"] = (
        {"dense": d.dense_ms, "cusparselt": d.sparse_ms, "cutlass": d.cutlass_ms, "decode": d.decode_ms} if d else None
    )
    row["dispatch_bucket"] = (d.m_lo, m_bucket(m)) if d else None  # the M range the decision covers
    row["dispatch_lo_ms"] = d.lo_ms if d else None  # what it measured at the bottom of that range
    # The decode kernel reading the portable form in place (no packed copy) against the packed
    # layout, each at its best pipeline (registers or ring), at the dispatcher's split and the
    # default: does the second copy pay?
    row["decode_portable_ms"] = row["decode_packed_ms"] = None
    if m <= DECODE_MAX_M and portable_ok(comp[0]) and "portable" not in skip:
        packed = [c.layout("decode") for c in comp]
        variants = [(sp, ring) for sp in sorted({0, d.decode_split if d else 0}) for ring in (False, True)]

        def best_ms(run, sets):  # fastest variant; each timed over the rotated (weight, x) sets
            return min(
                median_ms([lambda w=w, x=x, sp=sp, r=r: run(x, w, split=sp, ring=r) for w, x in sets], samples)
                for sp, r in variants
            )

        row["decode_portable_ms"] = best_ms(decode_mm_portable, list(zip(comp, xs)))
        row["decode_packed_ms"] = best_ms(decode_mm, list(zip(packed, xs)))
        del packed
    del layers, fast, comp

    row["torch_ms"], row["torch_error"] = None, None
    try:
        if "torch" in skip:
            raise _Skipped
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tw = [torch_semi_structured(w) for w in ws[: min(sets, 4)]]
            t0 = time.perf_counter()
            F.linear(xs[0], tw[0])
            torch.cuda.synchronize()
            first = (time.perf_counter() - t0) * 1e3
            s = (
                samples
                if first * samples * len(tw) < torch_budget_ms
                else max(1, int(torch_budget_ms / first / len(tw)))
            )
            row["torch_ms"] = median_ms([lambda w=w, x=x: F.linear(x, w) for w, x in zip(tw, xs)], s)
    except _Skipped:
        pass
    except Exception as exc:  # noqa: BLE001 -- report any PyTorch failure as such
        row["torch_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    del ws, xs
    torch.cuda.empty_cache()
    return row


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy bandwidth (read + write bytes / time) of 1 GiB of float32, eager
    launches timed with CUDA events. (An earlier version copied uint8 inside a CUDA graph and
    reported 2.7 TB/s on the H200, below what the decode kernel and cuBLAS reach: not a valid
    ceiling; rows also carry cuBLAS's achieved bandwidth on the same shape.)"""
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = timing.median_ms([lambda: dst.copy_(src)], 10, graph=False)
    return 2 * src.numel() * 4 / ms / 1e6


def host_overhead_us() -> dict:
    """Host time per call where the GPU is not the bottleneck (tiny layer, no sync per call)."""
    x = torch.randn(16, 256, device="cuda", dtype=torch.float16)
    w = sf.prune_2_4(torch.randn(256, 256, device="cuda", dtype=torch.float16))
    sl = SparseLinear.from_compressed(sf.compress_2_4(w), None, backend="sparse")
    out = {}
    for label, f in (("F.linear", lambda: F.linear(x, w)), ("SparseLinear", lambda: sl(x))):
        for _ in range(200):
            f()
        torch.cuda.synchronize()
        n = 5000
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        out[label] = (t1 - t0) / n * 1e6
    out["overhead_vs_F.linear"] = out["SparseLinear"] - out["F.linear"]
    return out


def conversion_seconds_llama3_8b() -> dict:
    """Prune + compress on the GPU, timed on one gate_up weight, scaled to Llama-3-8B's linears."""
    n, k = LLAMA3_8B["gate_up"]
    w = torch.randn(n, k, device="cuda", dtype=torch.float16)
    sf.compress_2_4(sf.prune_2_4(w)).layout("cusparselt", 1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        sf.compress_2_4(sf.prune_2_4(w)).layout("cusparselt", 1)
    torch.cuda.synchronize()
    per_param = (time.perf_counter() - t0) / 3 / (n * k)
    params = 32 * sum(a * b for a, b in LLAMA3_8B.values())  # 32 decoder blocks
    return {"seconds_per_gparam": per_param * 1e9, "llama3_8b_linears_seconds": per_param * params}


def plot(rows, path: Path, gpu: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [
        n
        for n in [*LLAMA3_8B, *QWEN25_7B, "square"]
        if any(r["name"] == n or (n == "square" and r["name"].startswith("square")) for r in rows)
    ] or ["square"]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.6), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, name in zip(axes, names):
        for dtype, ls in (("float16", "-"), ("bfloat16", "--")):
            sel = [
                r
                for r in rows
                if (r["name"] == name or (name == "square" and r["name"].startswith("square"))) and r["dtype"] == dtype
            ]
            ms = [r["M"] for r in sel]
            for key, color, label in (
                ("cusparselt_ms", "C0", "cuSPARSELt"),
                ("cutlass_ms", "C4", "CUTLASS sm90"),
                ("decode_ms", "C1", "decode kernel"),
                ("sparseflow_ms", "C2", "SparseLinear"),
                ("sparseflow_fast_ms", "C5", "SparseLinear fast"),
                ("torch_ms", "C3", "torch semi-structured"),
            ):
                ys = [r["cublas_ms"] / r[key] if r.get(key) else float("nan") for r in sel]
                ax.plot(ms, ys, ls, color=color, marker="o", ms=3, label=f"{label} {dtype[:4]}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(2.0, color="gray", lw=0.5, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_title(name if name != "square" else "square M=N=K")
        ax.set_xlabel("M (tokens)")
    axes[0].set_ylabel("speedup over cuBLAS")
    axes[-1].legend(fontsize=6)
    fig.suptitle(f"y = x W^T, 2:4 sparse W, {gpu}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def geomean(xs):
    xs = [x for x in xs if x]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def summarize(rows: list[dict], copy_gbps: float) -> dict:
    """The summary fields computed from the rows (also used to re-summarize merged result files).
    A row may carry its own ``copy_bandwidth_gbps`` (merged from another run)."""
    llama = [r for r in rows if r["name"] in LLAMA3_8B and r.get("sparse_kernel_ms")]  # (--skip forced: none)
    fast = [r for r in rows if r.get("sparseflow_fast_ms")]  # rows from before memory modes have none
    return {
        "sparselinear_min_ratio": min(r["cublas_ms"] / r["sparseflow_ms"] for r in rows),
        "below_floor": [
            f"{r['name']} {r['dtype']} M={r['M']} {r['cublas_ms'] / r['sparseflow_ms']:.3f}x"
            for r in rows
            if r["cublas_ms"] / r["sparseflow_ms"] < FLOOR
        ],
        "sparselinear_geomean_m_ge_256": geomean([r["cublas_ms"] / r["sparseflow_ms"] for r in rows if r["M"] >= 256]),
        # memory="fast": the fastest kernel per M-bucket (dense included), every layout it wants
        "fast_min_ratio": min((r["cublas_ms"] / r["sparseflow_fast_ms"] for r in fast), default=float("nan")),
        "fast_below_floor": [
            f"{r['name']} {r['dtype']} M={r['M']} {r['cublas_ms'] / r['sparseflow_fast_ms']:.3f}x"
            for r in fast
            if r["cublas_ms"] / r["sparseflow_fast_ms"] < FLOOR
        ],
        "fast_geomean_m_ge_256": geomean([r["cublas_ms"] / r["sparseflow_fast_ms"] for r in fast if r["M"] >= 256]),
        "bytes_vs_dense_max": {
            mode: max((r["bytes_vs_dense"][mode] for r in rows if r.get("bytes_vs_dense")), default=float("nan"))
            for mode in ("compact", "fast")
        },
        "kernel_geomean_llama_m_ge_256": geomean(
            [r["cublas_ms"] / r["sparse_kernel_ms"] for r in llama if r["M"] >= 256]
        ),
        "kernel_min_gate_up_down_m_le_16": min(
            (
                r["cublas_ms"] / r["sparse_kernel_ms"]
                for r in llama
                if r["name"] in ("gate_up", "down") and r["M"] <= 16
            ),
            default=float("nan"),
        ),
        "kernel_geomean_llama_m_ge_256_fp16": geomean(
            [r["cublas_ms"] / r["sparse_kernel_ms"] for r in llama if r["M"] >= 256 and r["dtype"] == "float16"]
        ),
        "sparselinear_geomean_all": geomean([r["cublas_ms"] / r["sparseflow_ms"] for r in rows]),
        "torch_failures": sum(1 for r in rows if r["torch_error"]),
        "rows_with_torch": sum(1 for r in rows if r.get("torch_ms")),
        "sparselinear_beats_torch_rows": sum(
            1 for r in rows if r.get("torch_ms") and r["sparseflow_ms"] < r["torch_ms"]
        ),
        "copy_bandwidth_gbps": copy_gbps,
        "decode_rows_gate_up_down_m_le_16": [
            {
                "name": r["name"],
                "M": r["M"],
                "dtype": r["dtype"],
                "vs_cublas": r["cublas_ms"] / r["decode_ms"],
                "vs_cusparselt": r["cusparselt_ms"] / r["decode_ms"],
                "hbm_fraction": r["decode_gbps"] / r.get("copy_bandwidth_gbps", copy_gbps),
                "bandwidth_vs_cublas": r["decode_vs_cublas_bandwidth"],
            }
            for r in llama
            if r["name"] in ("gate_up", "down") and r["M"] <= 16 and r.get("decode_ms")
        ],
    }


def grid_of(args: argparse.Namespace) -> list[tuple]:
    """The rows a run measures: (name, M, N, K, dtype), squares first in each dtype."""
    grid = []
    layers = {name: nk for model in args.models for name, nk in MODELS[model].items()}
    for dtype in [getattr(torch, d) for d in args.dtypes]:
        for s in [] if args.no_square else SQUARE if not args.quick else [4096]:
            grid.append((f"square{s}", s, s, s, dtype))
        for name, (n, k) in layers.items():
            if args.layers and name not in args.layers:
                continue
            ms = args.ms or (MS if not args.quick else [1, 16, 4096])
            for m in args.bf16_ms if (args.bf16_ms and dtype == torch.bfloat16) else ms:
                grid.append((name, m, n, k, dtype))
    return grid


def row_key(g: tuple) -> tuple:
    """A grid entry's (name, M, dtype name), as its measured row records them."""
    return g[0], g[1], str(g[4]).replace("torch.", "")


def measured_key(r: dict) -> tuple:
    """A measured row's (name, M, dtype name): ``row_key`` of the grid entry it measured."""
    return r["name"], r["M"], r["dtype"]


def summary_line(gpu: str, rows: list[dict], summary: dict, host: dict | None, conversion: dict | None) -> str:
    """The run's one-line verdict. ``host`` and ``conversion`` are None for a run cut short before
    it measured them (``results_tool.py finish``)."""

    def ratio(v: float) -> str:  # "nan" where the run had no such rows
        return "- (no rows)" if math.isnan(v) else f"{v:.2f}x"

    def verdict(fails: list[str]) -> str:
        return f"FAIL {len(fails)} rows below {FLOOR}x: {'; '.join(fails)}" if fails else f"all rows >= {FLOOR}x"

    mem = summary["bytes_vs_dense_max"]
    host_s = f"F.linear={host['F.linear']:.1f} SparseLinear={host['SparseLinear']:.1f}" if host else "not measured"
    conv_s = f"{conversion['llama3_8b_linears_seconds']:.1f}s" if conversion else "not measured"
    return (
        f"SUMMARY device={gpu} rows={len(rows)} | default (compact, weight bytes <= {mem['compact']:.3f}x dense): "
        f"{verdict(summary['below_floor'])} | "
        f"SparseLinear/cuBLAS min={summary['sparselinear_min_ratio']:.3f}x geomean={summary['sparselinear_geomean_all']:.2f}x "
        f"geomean M>=256={ratio(summary['sparselinear_geomean_m_ge_256'])} | "
        f"memory='fast' (<= {mem['fast']:.2f}x): {verdict(summary['fast_below_floor'])} min={ratio(summary['fast_min_ratio'])} "
        f"geomean M>=256={ratio(summary['fast_geomean_m_ge_256'])} | "
        f"2:4 kernel geomean (Llama, M>=256)={ratio(summary['kernel_geomean_llama_m_ge_256'])} | "
        f"gate_up/down M<=16 min={ratio(summary['kernel_min_gate_up_down_m_le_16'])} | "
        f"host us/call {host_s} | prune+compress Llama-3-8B linears on GPU: {conv_s}"
    )


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few rows only")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--ms", type=lambda v: [int(t) for t in v.split(",")], help="comma-separated M values")
    ap.add_argument(
        "--layers", type=lambda v: v.split(","), help="comma-separated subset of the layer names (qkv, qwen_o, ...)"
    )
    ap.add_argument("--models", type=lambda v: v.split(","), default=list(MODELS), help=f"subset of {list(MODELS)}")
    ap.add_argument("--dtypes", type=lambda v: v.split(","), default=["float16", "bfloat16"])
    ap.add_argument("--no-square", action="store_true")
    ap.add_argument("--lean", action="store_true", help="skip the decode kernel's in-place vs packed comparison")
    ap.add_argument(
        "--skip",
        type=comma_list(SKIPPABLE),
        default=[],
        help="comma list of columns to leave out: portable (= --lean), forced (each 2:4 kernel forced), torch",
    )
    ap.add_argument("--bf16-ms", type=lambda v: [int(t) for t in v.split(",")], help="M values for bf16 rows")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument(
        "--resume", type=Path, help="a linear_<gpu>.json from a run cut short: keep its rows, measure the rest"
    )
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_dense_vs_sparse: needs a CUDA GPU", file=sys.stderr)
        return 2
    if not sf.extension_available():
        print("bench_dense_vs_sparse: the sparseflow CUDA extension is not built", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name()
    tag = gpu_tag(gpu)
    grid = grid_of(args)
    planned = [list(row_key(g)) for g in grid]  # what a cut run still owes
    rows = []
    if args.resume:  # rows a run cut short by its time limit already measured (same GPU model)
        done = json.loads(args.resume.read_text())
        if done.get("device") != gpu:
            print(
                f"bench_dense_vs_sparse: {args.resume} was measured on {done.get('device')}, not {gpu}", file=sys.stderr
            )
            return 2
        rows = done["rows"]
        have = {measured_key(r) for r in rows}
        grid = [g for g in grid if row_key(g) not in have]
        print(f"resuming {args.resume}: {len(rows)} rows kept, {len(grid)} to measure")
    hdr = (
        f"{'layer':>11} {'dtype':>8} {'M':>6} {'N':>6} {'K':>6} | {'cuBLAS':>8} {'torch':>8} {'cuSPLt':>8} "
        f"{'CUTLASS':>8} {'decode':>8} {'SparseLin':>9} | {'cslt x':>6} {'cutl x':>6} {'dec x':>6} {'kern x':>6} "
        f"{'SL x':>6} {'fast x':>6} {'torch x':>7} "
        f"{'dec GB/s':>8} choice"
    )
    print(hdr)
    print("-" * len(hdr))
    t_start = time.time()
    for name, m, n, k, dtype in grid:
        t_row = time.time()
        r = bench_row(name, m, n, k, dtype, args.samples, skip=set(args.skip) | ({"portable"} if args.lean else set()))
        r["seconds"] = time.time() - t_row  # the row's wall time, first-use measurements included
        rows.append(r)
        args.out.mkdir(parents=True, exist_ok=True)  # rows so far, in case the run is cut short
        (args.out / f"linear_{tag}.json").write_text(
            json.dumps({"device": gpu, "rows": rows, "partial": True, "grid": planned})
        )

        def ms(v, w=8):
            return f"{v:{w}.4f}" if v else f"{'-':>{w}}"

        def x(v, w=6, base=r["cublas_ms"]):
            return f"{base / v:{w}.2f}" if v else f"{'-':>{w}}"

        gbps = f"{r['decode_gbps']:8.0f}" if r.get("decode_gbps") else f"{'-':>8}"
        print(
            f"{name:>11} {r['dtype']:>8} {m:6d} {n:6d} {k:6d} | {r['cublas_ms']:8.4f} {ms(r['torch_ms'])} "
            f"{ms(r['cusparselt_ms'])} {ms(r['cutlass_ms'])} {ms(r['decode_ms'])} {ms(r['sparseflow_ms'], 9)} | "
            f"{x(r['cusparselt_ms'])} {x(r['cutlass_ms'])} {x(r['decode_ms'])} {x(r['sparse_kernel_ms'])} "
            f"{x(r['sparseflow_ms'])} {x(r['sparseflow_fast_ms'])} {x(r['torch_ms'], 7)} {gbps} "
            f"{r['resident']}/{r['choice']}",
            flush=True,
        )
    copy_gbps = copy_bandwidth_gbps()
    host = host_overhead_us()
    conversion = conversion_seconds_llama3_8b()
    summary = {
        **summarize(rows, copy_gbps),
        "host_us_per_call": host,
        "conversion": conversion,
        "seconds": time.time() - t_start,
        "cusparselt_tuner": {
            "children": TUNER.children,
            "crashed": [{**r, "alg": alg} for r, alg in TUNER.crashed],  # ids that killed a child
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    data = {
        "device": gpu,
        "torch": torch.__version__,
        "cusparselt": sf._ext._C.cslt_version(),
        "rows": rows,
        "grid": planned,
        "summary": summary,
    }
    (args.out / f"linear_{tag}.json").write_text(json.dumps(data, indent=1))
    try:
        plot(rows, args.out / f"linear_{tag}.png", gpu)
    except ImportError:
        print("(matplotlib missing: no plot)")
    print(f"copy bandwidth {copy_gbps:.0f} GB/s; decode kernel on gate_up/down, M <= 16:")
    for d in summary["decode_rows_gate_up_down_m_le_16"]:
        print(
            f"  {d['name']:>8} {d['dtype']:>8} M={d['M']:<3} {d['vs_cublas']:.2f}x cuBLAS, "
            f"{d['vs_cusparselt']:.2f}x cuSPARSELt, {100 * d['hbm_fraction']:.0f}% of copy bandwidth, "
            f"{100 * d['bandwidth_vs_cublas']:.0f}% of cuBLAS's bandwidth"
        )
    port = [r for r in rows if r.get("decode_portable_ms")]
    if port:
        print("decode kernel reading the portable form in place vs the packed copy (best pipeline each):")
        for r in port:
            print(
                f"  {r['name']:>11} {r['dtype']:>8} M={r['M']:<3} portable {r['decode_portable_ms']:.4f} ms, "
                f"packed {r['decode_packed_ms']:.4f} ms ({r['decode_packed_ms'] / r['decode_portable_ms']:.2f}x)"
            )
    crashes = [(r["n"], r["k"], r["m"], r["layout"], alg) for r, alg in TUNER.crashed]
    print(f"cuSPARSELt tuner: {TUNER.children} child processes; ids that crashed one (N, K, M, layout, id): {crashes}")
    errs = sorted({r["torch_error"] for r in rows if r["torch_error"]})
    for e in errs:
        print("torch semi-structured failure:", e)

    print(summary_line(gpu, rows, summary, host, conversion))
    return 0


if __name__ == "__main__":
    sys.exit(main())
