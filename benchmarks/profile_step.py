"""Where one whole-model step's GPU time goes, dense against 2:4: a kernel profile by class.

``bench_model.py`` says how much faster a 2:4 step is; this says why it is not faster still. It
builds the same model (``bench_model``'s architectures, random weights), runs one step the way
``bench_model``'s compiled mode does (``torch.compile(model.forward, fullgraph=True)`` on a static
KV cache; decode at ``--batch`` after a ``--context`` prompt, or a prefill of ``--prefill``
tokens), profiles ``--steps`` of them with ``torch.profiler`` (CUPTI sees the kernels inside
CUDA graphs too), then converts the model in place (magnitude 2:4, ``sf.autotune`` for the step's
token count) and does the same. Kernels are summed per class: 2:4 GEMMs (CUTLASS, cuSPARSELt, our
decode kernel), dense GEMMs (the ``lm_head`` and any layer left dense), attention, inductor's fused
kernels, copies, other. Per class: microseconds and kernels per step, dense and 2:4.

    python benchmarks/profile_step.py --batch 16                  # H100/H200: two compiles
    python benchmarks/profile_step.py --prefill 2048
    python benchmarks/profile_step.py --tiny --device cpu --compile-backend aot_eager   # smoke test

On the CPU it profiles operators instead of kernels (a smoke test of the script, not a finding).
Writes ``<out>/profile_<gpu>_<step>.json``; the last stdout line starts with ``PROFILE``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import sparseflow as sf

sys.path.insert(0, str(Path(__file__).parent))
import bench_model as bm  # the benchmarks are scripts side by side, not a package

# (class, pattern on the lower-cased kernel name); the first match wins. Inductor's kernels come
# first: their names list the ops they fused, and a kernel fused with our op's neighbours is called
# "triton_..._sparse_linear_8", which the 2:4 patterns below would take for a 2:4 GEMM. Those fused
# with attention's inputs (rotary, mask, GQA's repeated k/v) are a class
# of their own: dense's step pays them as much as 2:4's. CUTLASS's sparse mainloop and
# cuSPARSELt's kernels both say "sparse"; cuBLAS's own CUTLASS-built kernels do not.
CLASSES: tuple[tuple[str, str], ...] = (
    ("attention inputs (inductor)", r"^triton.*(attention|sdpa)"),
    ("inductor fused", r"^triton"),
    ("2:4 GEMM, CUTLASS", r"cutlass.*sparse|sparse.*cutlass"),
    ("2:4 GEMM, decode kernel", r"decode24"),
    ("2:4 GEMM, cuSPARSELt", r"sparse|sp_gemm|spmma"),
    ("2:4 other (decompress, pad)", r"decompress_24|transpose_rows"),
    ("dense GEMM", r"gemm|nvjet|xmma|cublas|matmul|aten::mm|aten::addmm|aten::linear"),
    ("attention", r"flash|fmha|attention|sdpa"),
    ("copy, fill", r"memcpy|memset|copy|fill|cat"),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    return next((cls for cls, pattern in CLASSES if re.search(pattern, low)), "other")


def kernels(prof: torch.profiler.profile, cuda: bool) -> list[tuple[str, float]]:
    """(name, microseconds) of every GPU kernel and memory op, or on the CPU every leaf operator."""
    out = []
    for e in prof.events():
        on_device = e.device_type == torch.autograd.DeviceType.CUDA
        leaf_op = not on_device and e.name.startswith("aten::") and not e.cpu_children
        if (on_device and cuda) or (leaf_op and not cuda):
            out.append((e.name, e.time_range.elapsed_us()))
    return out


def profile(call: Callable[[], Any], device: torch.device, steps: int) -> dict[str, Any]:
    """Per class and per kernel: microseconds and count per step, over ``steps`` profiled calls."""
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    bm.sync(device)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            call()
        bm.sync(device)
    per_kernel: dict[tuple[str, str], dict[str, float]] = {}  # by (name as stored, class of the full name)
    for name, us in kernels(prof, cuda):
        k = per_kernel.setdefault((name[:160], kernel_class(name)), {"us": 0.0, "count": 0})
        k["us"] += us / steps
        k["count"] += 1 / steps
    ranked = [{"name": n, "class": c} | v for (n, c), v in sorted(per_kernel.items(), key=lambda kv: -kv[1]["us"])]
    per_class = class_sums(ranked)
    # The step as bench_model times it (between synchronizations, no profiler): what it takes
    # beyond the kernels' sum is time the GPU sat idle (launch gaps, host work inside the step).
    wall_us = bm.median_s(call, device, 0, min_s=bm.PREFILL_MIN_S) * 1e6
    return {
        "total_us": sum(c["us"] for c in per_class.values()),
        "wall_us": wall_us,
        "classes": per_class,
        "top": ranked[:15],
        "kernels": ranked,  # every kernel: the classes can be derived again (``reclassify``)
    }


def class_sums(ranked: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Microseconds and count per step of each class, summed over its kernels."""
    per_class: dict[str, dict[str, float]] = {}
    for k in ranked:
        c = per_class.setdefault(k["class"], {"us": 0.0, "count": 0})
        c["us"] += k["us"]
        c["count"] += k["count"]
    return per_class


def reclassify(profiled: dict[str, Any]) -> dict[str, Any]:
    """``profile``'s result with its classes derived again from its kernels by today's ``CLASSES``."""
    for k in profiled["kernels"]:
        k["class"] = kernel_class(k["name"])
    return profiled | {"classes": class_sums(profiled["kernels"])}


def step_call(model, cfg, device: torch.device, args: argparse.Namespace) -> Callable[[], Any]:
    """The compiled step, compiled and warmed up (CUDA graphs recorded) before it is returned."""
    compile_fn = bm.compiler(args.compile_backend, args.compile_mode)
    if args.prefill:
        kw = bm.prefill_inputs(model, cfg, device, 1, args.prefill)
        model(**kw)  # eager first: sparseflow's layers pick their route for this M outside the trace
    else:
        kw = bm.decode_inputs(model, cfg, device, args.batch, args.context, args.steps + 4)
    call = bm.step_marked(compile_fn(model.forward), **kw)
    bm.warm_up(call, device)
    return call


def report(result: dict[str, Any]) -> str:
    dense, sparse = result["dense"], result["sparse"]
    names = sorted(
        set(dense["classes"]) | set(sparse["classes"]), key=lambda c: -dense["classes"].get(c, {}).get("us", 0)
    )
    lines = [f"{'class':32} | {'dense us':>10} {'n':>5} | {'2:4 us':>10} {'n':>5}"]
    for cls in names:
        d, s = dense["classes"].get(cls, {}), sparse["classes"].get(cls, {})
        lines.append(
            f"{cls:32} | {d.get('us', 0):10.1f} {d.get('count', 0):5.0f} | {s.get('us', 0):10.1f} {s.get('count', 0):5.0f}"
        )
    lines.append(f"{'total':32} | {dense['total_us']:10.1f} {'':5} | {sparse['total_us']:10.1f}")
    lines.append(f"{'step wall time (no profiler)':32} | {dense['wall_us']:10.1f} {'':5} | {sparse['wall_us']:10.1f}")
    for tag, r in (("dense", dense), ("2:4", sparse)):
        lines.append(f"top kernels, {tag}:")
        lines += [f"  {k['us']:9.1f} us x{k['count']:4.0f}  {k['class']:28} {k['name'][:90]}" for k in r["top"][:8]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=list(bm.ARCHS), default="llama3-8b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--tiny", action="store_true", help="tiny config of the arch, for CPU smoke tests")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=16, help="decode batch (ignored with --prefill)")
    ap.add_argument("--prefill", type=int, default=0, help="profile a 1 x N prefill instead of a decode step")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--attn", default=None, help="attention implementation for both models (sdpa, eager, ...)")
    ap.add_argument("--causal-prefill", action="store_true", help="bench_model.py's option of that name")
    ap.add_argument("--steps", type=int, default=5, help="profiled steps (per-step figures are their mean)")
    ap.add_argument("--compile-mode", default="reduce-overhead")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    cfg = bm.model_config(args.arch, args.tiny, args.layers, args.attn, args.causal_prefill)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    match = re.search(r"\b([A-Z]+\d+[A-Z]*)\b", name) if cuda else None
    tag = match.group(1).lower() if match else ("gpu" if cuda else "cpu")
    step = f"prefill{args.prefill}" if args.prefill else f"decode_b{args.batch}"
    result: dict[str, Any] = {"device": name, "arch": args.arch, "step": step, "tiny": args.tiny}
    result["settings"] = {k: getattr(args, k) for k in ("context", "steps", "compile_mode", "compile_backend")}
    model = bm.build_model(args.arch, cfg, device, dtype)
    result["settings"]["attn"] = model.config._attn_implementation
    result["settings"]["causal_prefill"] = args.causal_prefill
    with torch.no_grad():
        result["dense"] = profile(step_call(model, cfg, device, args), device, args.steps)
        bm.free(device)
        sf.sparsify(model, method="magnitude", fallback="never", progress=False, verbose=False)
        tokens = args.prefill or args.batch
        sf.autotune(model, tokens=sorted({tokens, args.context}))
        result["sparse"] = profile(step_call(model, cfg, device, args), device, args.steps)
    text = report(result)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"profile_{tag}_{step}" + ("" if args.arch == "llama3-8b" else f"_{args.arch}")
    stem += f"_attn-{args.attn}" if args.attn else ""
    stem += "-causal" if args.causal_prefill else ""
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    gemm = ("2:4 GEMM", "dense GEMM")
    share = {
        t: sum(c["us"] for k, c in result[t]["classes"].items() if k.startswith(gemm))
        / max(result[t]["total_us"], 1e-9)
        for t in ("dense", "sparse")
    }
    print(
        f"PROFILE {name} arch={args.arch} step={step} dense={result['dense']['total_us']:.1f}us "
        f"2:4={result['sparse']['total_us']:.1f}us wall dense={result['dense']['wall_us']:.1f}us "
        f"2:4={result['sparse']['wall_us']:.1f}us GEMM share dense={share['dense']:.2f} 2:4={share['sparse']:.2f} "
        f"wrote {out / stem}.json"
    )
    return result


if __name__ == "__main__":
    main()
