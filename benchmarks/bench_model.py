"""Whole-model speed: a dense Hugging Face Llama-3-8B vs the same model after ``sparseflow.sparsify``.

Per-layer GEMM speedups (bench_dense_vs_sparse.py) only matter if they survive a real model, where
attention, norms, lm_head and host overhead stay dense. This builds the Llama-3-8B architecture with
random weights directly on the GPU (fp16, no download), measures it, converts the same model in place
(magnitude 2:4, every decoder-layer linear; lm_head stays dense) and measures it again:

* prefill tokens/s at 1x2048 and 8x512 (``use_cache=False``, logits for the last token only);
* decode tokens/s at batch 1 and 16: one step on a static KV cache captured in a CUDA graph and
  replayed, so GPU time is what is timed (if capture fails: eager steps, error kept in the JSON);
* eager ``generate`` tokens/s at batch 1 (128-token prompt, 32 new tokens), what HF users see;
* bytes of the converted linears' weights, GPU memory before/after conversion, peak memory per phase.

Dense is measured first and the same model is then converted, so two 16 GB models never coexist.
Writes ``<out>/model_<gpu>.json`` and ``.png``; the last stdout line starts with ``MODEL``.

    python benchmarks/bench_model.py [--layers 32]                        # H100/H200: a few minutes
    python benchmarks/bench_model.py --tiny --device cpu --out /tmp/bm    # CPU smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import inspect
import json
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import sparseflow as sf
from sparseflow.nn import SparseGatedMLP, SparseLinear

# Prompt lengths that are not powers of two too: real prompts are 300 or 1337 tokens long.
PREFILL = {"b1x2048": (1, 2048), "b8x512": (8, 512), "b1x300": (1, 300), "b1x1337": (1, 1337), "b4x700": (4, 700)}
DECODE_BATCHES = (1, 16)
PROMPT, REPS = 128, 3  # decode/generate prompt length; timed samples per metric (median)
# speedup key -> (tokens/s key in the dense/sparse dicts, label)
SPEEDUPS = {
    "prefill_speedup": ("prefill_tok_s_b1x2048", "prefill 1x2048"),
    "prefill_speedup_b8x512": ("prefill_tok_s_b8x512", "prefill 8x512"),
    "prefill_speedup_b1x300": ("prefill_tok_s_b1x300", "prefill 1x300"),
    "prefill_speedup_b1x1337": ("prefill_tok_s_b1x1337", "prefill 1x1337"),
    "prefill_speedup_b4x700": ("prefill_tok_s_b4x700", "prefill 4x700"),
    "decode_speedup_b1": ("decode_tok_s_b1", "decode b1"),
    "decode_speedup_b16": ("decode_tok_s_b16", "decode b16"),
    "eager_generate_speedup_b1": ("generate_tok_s_b1", "generate b1 (eager)"),
}


def llama_config(tiny: bool, layers: int | None) -> LlamaConfig:
    big = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8}
    small = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}
    dims = {**(small if tiny else big), "vocab_size": 1000 if tiny else 128256}
    layers = layers or (2 if tiny else 32)
    return LlamaConfig(**dims, num_hidden_layers=layers, max_position_embeddings=8192, rope_theta=500000.0)


def no_init() -> contextlib.AbstractContextManager:
    """transformers' no_init_weights (5.x: transformers.initialization, 4.x: modeling_utils), else nothing."""
    for mod in ("transformers.initialization", "transformers.modeling_utils"):
        with contextlib.suppress(ImportError, AttributeError):
            return importlib.import_module(mod).no_init_weights()
    return contextlib.nullcontext()


def build_model(cfg: LlamaConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Construct in ``dtype`` on ``device`` without init kernels, then fill the weights in place."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), no_init():
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)  # 1-D params are RMSNorm scales
    return model.eval().requires_grad_(False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak(device: torch.device, reset: bool = False) -> int | None:
    if device.type != "cuda":
        return None
    value = torch.cuda.max_memory_allocated(device)
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return value


def median_s(fn: Callable[[], Any], device: torch.device, warmup: int = 2) -> float:
    """Median seconds per call of fn over REPS samples (perf_counter between device synchronizations)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(REPS):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fwd_params(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def prefill_tok_s(model: nn.Module, cfg: LlamaConfig, device: torch.device, b: int, t: int) -> float:
    ids = torch.randint(0, cfg.vocab_size, (b, t), device=device)
    kw = {"logits_to_keep": 1} if "logits_to_keep" in fwd_params(model) else {}
    return b * t / median_s(lambda: model(input_ids=ids, use_cache=False, **kw), device)


def static_cache(cfg: LlamaConfig, batch: int, length: int, device: torch.device, dtype: torch.dtype) -> Any:
    """transformers.StaticCache across versions (4.4x: max_batch_size/device/dtype; 5.x: config, max_cache_len)."""
    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    full = {"config": cfg, "max_batch_size": batch, "max_cache_len": length, "device": device, "dtype": dtype}
    attempts = [{k: v for k, v in full.items() if k in params}, {"config": cfg, "max_cache_len": length}]
    error: Exception | None = None
    for kw in [*attempts, {"config": cfg, "max_batch_size": batch, "max_cache_len": length}]:
        try:
            return StaticCache(**kw)
        except TypeError as e:
            error = e
    raise error  # type: ignore[misc]


def capture(step: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Warm ``step`` up 3 times on a side stream (as the PyTorch docs require), then capture it once."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


def decode_tok_s(model: nn.Module, cfg: LlamaConfig, device: torch.device, batch: int, steps: int) -> tuple:
    """(tokens/s of one decode step on a static cache, graph error or None). Replays advance the cache
    position on transformers 5.x (device-side counter, hence the cache length) and rewrite one slot on 4.x."""
    length = -(-(PROMPT + 16 + (REPS + 1) * steps) // 128) * 128
    cache = static_cache(cfg, batch, length, device, next(model.parameters()).dtype)
    names = fwd_params(model)
    kw: dict[str, Any] = {"cache" if "cache" in names else "past_key_values": cache, "use_cache": True}
    prompt = torch.randint(0, cfg.vocab_size, (batch, PROMPT), device=device)
    pos = {"cache_position": torch.arange(PROMPT, device=device)} if "cache_position" in names else {}
    model(input_ids=prompt, **kw, **pos)
    if pos:  # 4.x: an explicit position keeps the step free of host syncs
        kw["cache_position"] = torch.tensor([PROMPT], device=device)
    tok = torch.randint(0, cfg.vocab_size, (batch, 1), device=device)
    error = "no CUDA device: timed eager decode steps"
    if device.type == "cuda":
        try:
            graph, _out = capture(lambda: model(input_ids=tok, **kw))
            return batch * steps / median_s(lambda: [graph.replay() for _ in range(steps)], device, 1), None
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager timing
            error = f"{type(e).__name__}: {e}"[:800]
            print(f"  decode b{batch}: CUDA graph failed ({error.splitlines()[0][:200]}); timing eager steps")
            sync(device)
    n = min(steps, 16)
    return batch * n / median_s(lambda: [model(input_ids=tok, **kw) for _ in range(n)], device, 1), error


def generate_tok_s(model: nn.Module, cfg: LlamaConfig, device: torch.device, new: int) -> float:
    ids = torch.randint(0, cfg.vocab_size, (1, PROMPT), device=device)
    kw = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": cfg.eos_token_id}
    return new / median_s(lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw), device, 1)


def attempt(res: dict, key: str, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) (args[2] is the device), or None with the error in res["errors"]: one failure must not end the run."""
    try:
        value = fn(*args)
        print(f"  [{res['tag']}] {key}: {value[0] if isinstance(value, tuple) else value}")
        return value
    except Exception as e:  # noqa: BLE001
        res["errors"][key] = f"{type(e).__name__}: {e}"[:800]
        print(f"  [{res['tag']}] {key} FAILED: {res['errors'][key].splitlines()[0][:200]}")
        return None
    finally:
        free(args[2])


def measure(model: nn.Module, cfg: LlamaConfig, device: torch.device, args: argparse.Namespace, tag: str) -> dict:
    res: dict[str, Any] = {"tag": tag, "errors": {}, "decode_graph_error": {}}
    with torch.no_grad():
        for name, (b, t) in PREFILL.items():
            res[f"prefill_tok_s_{name}"] = attempt(res, f"prefill_{name}", prefill_tok_s, model, cfg, device, b, t)
        for b in DECODE_BATCHES:
            out = attempt(res, f"decode_b{b}", decode_tok_s, model, cfg, device, b, args.decode_steps)
            tok_s, graph_err = out if out else (None, None)
            res[f"decode_tok_s_b{b}"], res[f"decode_mode_b{b}"] = tok_s, "eager" if graph_err else "cuda_graph"
            if graph_err:
                res["decode_graph_error"][f"b{b}"] = graph_err
        res["generate_tok_s_b1"] = attempt(res, "generate_b1", generate_tok_s, model, cfg, device, args.new_tokens)
    res["errors"], res["decode_graph_error"] = res["errors"] or None, res["decode_graph_error"] or None
    del res["tag"]
    return res


def linear_bytes(model: nn.Module) -> dict[str, int]:
    """Decoder-layer linear weight bytes: nn.Linear weights, SparseLinear compressed buffers, and the device-side
    copies sparseflow built for speed (cuSPARSELt layout, decode-kernel layout incl. fused gate/up, dense
    fallback)."""
    layers = getattr(getattr(model, "model", model), "layers", model)
    out = dict.fromkeys(("dense", "sparse", "n_dense", "n_sparse", "cusparselt", "decode", "dense_fallback"), 0)
    for m in layers.modules():
        if isinstance(m, SparseGatedMLP) and m._fused is not None:
            out["decode"] += m._fused[1].nbytes
        if isinstance(m, SparseLinear):
            out["sparse"], out["n_sparse"] = out["sparse"] + m.weight_nbytes, out["n_sparse"] + 1
            extra = m.memory_bytes()
            for k in ("cusparselt", "decode", "dense_fallback"):
                out[k] += extra.get(k, 0)
        elif isinstance(m, nn.Linear):
            out["dense"], out["n_dense"] = out["dense"] + m.weight.numel() * m.weight.element_size(), out["n_dense"] + 1
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not available: no plot")
        return
    items = [(label, result[k]) for k, (_, label) in SPEEDUPS.items() if result[k] is not None]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = ["tab:green" if v >= 1 else "tab:red" for _, v in items]
    bars = ax.bar([n for n, _ in items], [v for _, v in items], color=colors)
    ax.bar_label(bars, fmt="%.2fx")
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_ylabel("2:4 tokens/s over dense")
    mem = result["linear_weight_memory_ratio"]
    arch = "Llama-3-8B" if result["config"]["hidden"] == 4096 else "tiny Llama"
    ax.set_title(
        f"{result['device']}: {arch}, {result['config']['layers']} layers, sparseflow 2:4 vs dense"
        + (f"\n(decode: {result['sparse']['decode_mode_b1']}; linear weight memory {mem:.2f}x)" if mem else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(result: dict) -> None:
    dense, sparse, mib, x = result["dense"], result["sparse"], 2**-20, lambda v: "-" if v is None else f"{v:.2f}x"
    print(f"\n{'metric':<36} | {'dense':>12} | {'2:4':>12} | 2:4 vs dense")
    for key, (tok_key, label) in SPEEDUPS.items():
        modes = {d.get(f"decode_mode_{tok_key.split('_')[-1]}") for d in (dense, sparse)} - {None}
        mode = f" ({'/'.join(sorted(modes))})" if tok_key.startswith("decode") else ""
        a, b = (f"{d[tok_key]:,.1f}" if d[tok_key] is not None else "-" for d in (dense, sparse))
        print(f"{label + mode + ' tok/s':<36} | {a:>12} | {b:>12} | {x(result[key])}")
    w, p = result["linear_weight_bytes"], result["peak_memory_bytes"]
    mem_rows = [("decoder linear weights MiB", w["dense"], w["sparse"])]
    mem_rows += [("GPU allocated MiB", result["gpu_memory_before_bytes"], result["gpu_memory_after_bytes"])]
    for label, a, b in [*mem_rows, ("peak GPU MiB while benchmarking", p["dense"], p["sparse"])]:
        sa, sb = ("-" if v is None else f"{v * mib:,.1f}" for v in (a, b))
        print(f"{label:<36} | {sa:>12} | {sb:>12} | {x(ratio(b, a))}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; 2 with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="tiny config for CPU smoke tests")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--decode-steps", type=int, default=50, help="graph replays per timed sample")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens per generate call")
    args = ap.parse_args()
    if not args.tiny and not torch.cuda.is_available():  # else Llama-3-8B is built in host memory and OOM-killed
        raise SystemExit("bench_model: needs a CUDA GPU (use --tiny for a small CPU smoke test)")
    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    match = re.search(r"\b([A-Z]+\d+[A-Z]*)\b", name) if cuda else None
    tag = match.group(1).lower() if match else ("gpu" if cuda else "cpu")
    cfg = llama_config(args.tiny, args.layers)

    t0 = time.perf_counter()
    model = build_model(cfg, device, dtype)
    sync(device)
    peaks = {"build": peak(device, reset=True)}
    print(f"built {cfg.num_hidden_layers}-layer model on {name} ({dtype}) in {time.perf_counter() - t0:.1f}s")
    dense_w = linear_bytes(model)
    dense = measure(model, cfg, device, args, "dense")
    peaks["dense"] = peak(device, reset=True)
    free(device)
    mem_before = torch.cuda.memory_allocated(device) if cuda else None

    t0 = time.perf_counter()
    sf.sparsify(model, method="magnitude", fallback="never", progress=False, verbose=False)
    sync(device)
    convert_s = time.perf_counter() - t0
    peaks["convert"] = peak(device, reset=True)
    print(f"sparsify: {convert_s:.1f}s")
    # The one-time kernel measurements (incl. the cuSPARSELt tuner) for every M the runs below
    # use, timed on their own so they are neither hidden in nor charged to the first timed call.
    t0 = time.perf_counter()
    tokens = {b * t for b, t in PREFILL.values()} | {PROMPT} | set(DECODE_BATCHES)
    tuned = sf.autotune(model, tokens=sorted(tokens))
    autotune_s = time.perf_counter() - t0
    choices: dict[str, dict[str, int]] = {}
    for r in tuned:
        per = choices.setdefault(f"m{r['m_bucket']}", {})
        kind = r["choice"] + (" (in place)" if r["choice"] == "decode" and r.get("decode_in_place") else "")
        per[kind] = per.get(kind, 0) + 1
    print(f"autotune: {autotune_s:.1f}s; kernel per M-bucket (distinct layer shapes): {choices}")
    ratios = [
        f"{r['N']}x{r['K']} m{r['m_bucket']} {r['in_place_vs_packed']:.2f}" for r in tuned if r["in_place_vs_packed"]
    ]
    if ratios:  # > 1.05: the decode kernel keeps a packed copy of those layers
        print("decode kernel, in place / packed time:", ", ".join(ratios))
    sparse = measure(model, cfg, device, args, "2:4")
    peaks["sparse"] = peak(device)
    free(device)
    mem_after = torch.cuda.memory_allocated(device) if cuda else None
    sparse_w = linear_bytes(model)
    dense["peak_memory_bytes"], sparse["peak_memory_bytes"] = peaks["dense"], peaks["sparse"]

    result: dict[str, Any] = {
        "device": name,
        "tag": tag,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__}
        | {"sparseflow": sf.__version__},
        "dtype": str(dtype).replace("torch.", ""),
        "config": {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size},
        "settings": {"prefill": PREFILL, "prompt": PROMPT, "decode_steps": args.decode_steps, "reps": REPS}
        | {"new_tokens": args.new_tokens, "attn": getattr(model.config, "_attn_implementation", None)},
        "dense": dense,
        "sparse": sparse,
        **{k: ratio(sparse[tok_key], dense[tok_key]) for k, (tok_key, _) in SPEEDUPS.items()},
        "linear_weight_bytes": {"dense": dense_w["dense"], "sparse": sparse_w["sparse"] + sparse_w["dense"]}
        | {"converted": sparse_w["n_sparse"], "left_dense": sparse_w["n_dense"]}
        | {
            "cusparselt_copies": sparse_w["cusparselt"],
            "decode_copies": sparse_w["decode"],
            "dense_fallback_copies": sparse_w["dense_fallback"],
        },
        "linear_weight_memory_ratio": ratio(sparse_w["sparse"] + sparse_w["dense"], dense_w["dense"]),
        "gpu_memory_before_bytes": mem_before,
        "gpu_memory_after_bytes": mem_after,
        "gpu_memory_after_vs_before": ratio(mem_after, mem_before),
        "peak_memory_bytes": peaks,
        "convert_seconds": convert_s,
        "autotune_seconds": autotune_s,
        "kernel_choices": tuned,  # per distinct layer shape and M: dense / decode / cusparselt, speedup
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"model_{tag}.json").write_text(json.dumps(result, indent=2, default=str))
    report(result)
    plot(result, out / f"model_{tag}.png")
    print(f"wrote {out / f'model_{tag}.json'} and .png")
    s = {k: "n/a" if v is None else f"{v:.2f}x" for k, v in result.items() if k in SPEEDUPS or "ratio" in k}
    s["gpu_mem"] = "n/a" if mem_before is None else f"{result['gpu_memory_after_vs_before']:.2f}x"
    modes = {d[f"decode_mode_b{b}"] for d in (dense, sparse) for b in DECODE_BATCHES}
    graph = "graph" if modes == {"cuda_graph"} else "eager"
    print(
        f"MODEL {name} layers={cfg.num_hidden_layers} prefill_b1x2048={s['prefill_speedup']} "
        f"prefill_b8x512={s['prefill_speedup_b8x512']} prefill_b1x300={s['prefill_speedup_b1x300']} "
        f"prefill_b1x1337={s['prefill_speedup_b1x1337']} prefill_b4x700={s['prefill_speedup_b4x700']} "
        f"decode_{graph}_b1={s['decode_speedup_b1']} "
        f"decode_{graph}_b16={s['decode_speedup_b16']} generate_b1={s['eager_generate_speedup_b1']} "
        f"linear_weight_mem={s['linear_weight_memory_ratio']} gpu_mem={s['gpu_mem']} convert={convert_s:.1f}s"
    )


if __name__ == "__main__":
    main()
