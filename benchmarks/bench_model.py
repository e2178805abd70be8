"""Whole-model speed: a dense Hugging Face Llama-3-8B (or Qwen2.5-7B) vs the same model after ``sparseflow.sparsify``.

Per-layer GEMM speedups (bench_dense_vs_sparse.py) only matter if they survive a real model, where
attention, norms, lm_head and host overhead stay dense. This builds the architecture with random
weights directly on the GPU (fp16, no download), measures it, converts the same model in place
(magnitude 2:4, every decoder-layer linear; lm_head stays dense) and measures it again, in three
execution modes (``--modes``), each under its own keys:

* ``eager``: prefill tokens/s at 1x2048, 8x512, 1x300, 1x1337 and 4x700 (``use_cache=False``, logits
  for the last token only), and HF ``generate`` tokens/s at batch 1 (``--context`` prompt, 32 new
  tokens), what HF users see;
* ``graph``: decode tokens/s at batch 1, 16 and 64 after a ``--context`` prompt: one step on a static
  KV cache captured in a CUDA graph and replayed, so GPU time is what is timed (if capture fails:
  eager steps, error kept in the JSON; skipped without CUDA);
* ``compiled``: the recipe transformers documents for fast generation, ``torch.compile(model.forward,
  mode=--compile-mode, fullgraph=True, dynamic=False)``: the same decode steps on a static cache and
  the same prefill shapes (one compile per shape). Compilation is done in untimed warm-up calls and
  recorded in ``compile_seconds`` (with ``compile_graphs``, 1 unless it recompiled, and
  ``cudagraph_skips``); ``--compile-mode auto`` times dense decode b1 with
  ``reduce-overhead`` and ``default`` and uses the faster for dense and 2:4. The JSON's ``headline``
  holds the compiled figures.

Also: bytes of the converted linears' weights, GPU memory allocated after each model's measurements
(compiled graphs and their memory pools freed first), peak memory per phase.

Dense is measured first and the same model is then converted, so two 16 GB models never coexist.
Stopped by SIGTERM (``timeout`` at a time limit), it still writes the JSON: what it had not measured is
null and ``stopped`` says where it stopped (exit status 124).
Writes ``<out>/model_<gpu>.json`` (``model_<gpu>_qwen2.5-7b.json`` for Qwen, ``..._attn-<name>`` with
``--attn``: transformers' attention implementation for both models) and ``.png``; the last stdout line
starts with ``MODEL``.

    python benchmarks/bench_model.py [--arch qwen2.5-7b] [--layers 32]   # H100/H200: compiles dominate
    python benchmarks/bench_model.py --tiny --device cpu --out /tmp/bm --modes eager,compiled \
        --compile-mode default --compile-backend aot_eager                  # CPU smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import inspect
import json
import re
import signal
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, Qwen2Config, Qwen2ForCausalLM

import sparseflow as sf
from sparseflow.nn import SparseGatedMLP, SparseLinear
from sparseflow.nn.attention import PACKED_GQA, register_packed_gqa

# Prompt lengths that are not powers of two too: real prompts are 300 or 1337 tokens long.
PREFILL = {"b1x2048": (1, 2048), "b8x512": (8, 512), "b1x300": (1, 300), "b1x1337": (1, 1337), "b4x700": (4, 700)}
DECODE_BATCHES = (1, 16, 64)
MODES = ("eager", "graph", "compiled")
AUTO_COMPILE_MODES = ("reduce-overhead", "default")  # what --compile-mode auto chooses between
REPS = 3  # timed samples per metric (median); --reps
# A prompt's forward is timed for at least PREFILL_MIN_S seconds: a 300-token prompt takes ~10 ms on
# an H100, and the median of three such calls moved by up to 8% between runs of the same tree (six
# compiled runs of 1 x 300 gave 0.93-1.12x), mostly host-side time between the kernels.
PREFILL_MIN_S = 0.5
MAX_SAMPLES = 50
WARMUP_CALLS = 3  # untimed compiled calls: compile, then (reduce-overhead) the CUDA graph recording


class OutOfTime(BaseException):
    """SIGTERM (what ``timeout`` sends at a device call's time limit) during the measurements: the
    run stops measuring and still writes its JSON, with what was not measured as null. A
    BaseException, so that ``attempt`` (which records a failed metric and goes on) lets it through."""


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise OutOfTime(f"signal {signum}")


def _speedups() -> dict[str, tuple[str, str, str]]:
    """speedup key -> (tokens/s key in the dense/sparse dicts, label, mode). The eager/graph keys keep the names
    earlier result files use; the compiled ones are the same with a ``compiled_`` prefix."""
    out: dict[str, tuple[str, str, str]] = {}
    for mode in ("eager", "compiled"):
        pre = "compiled_" if mode == "compiled" else ""
        for name in PREFILL:
            suffix = "" if name == "b1x2048" else f"_{name}"
            out[f"{pre}prefill_speedup{suffix}"] = (f"{pre}prefill_tok_s_{name}", f"prefill {name[1:]}", mode)
        for b in DECODE_BATCHES:
            kind = "graph" if mode == "eager" else mode
            out[f"{pre}decode_speedup_b{b}"] = (f"{pre}decode_tok_s_b{b}", f"decode b{b}", kind)
    out["eager_generate_speedup_b1"] = ("generate_tok_s_b1", "generate b1", "eager")
    return out


SPEEDUPS = _speedups()
ARCHS: dict[str, tuple[type[PretrainedConfig], type[nn.Module], str]] = {
    "llama3-8b": (LlamaConfig, LlamaForCausalLM, "Llama-3-8B"),
    "qwen2.5-7b": (Qwen2Config, Qwen2ForCausalLM, "Qwen2.5-7B"),
}


def model_config(
    arch: str, tiny: bool, layers: int | None, attn: str | None = None, causal_prefill: bool = False
) -> PretrainedConfig:
    """The published shapes of ``arch``; ``tiny``: a small config of the same architecture (Qwen2 keeps its
    q/k/v biases and untied lm_head); ``attn``: transformers' attention implementation (None: its default),
    or ``sdpa_packed_gqa`` (``sparseflow.nn.attention``: decode steps without repeat_kv; ``causal_prefill``:
    and compiled prompts without a mask, as this benchmark's prompts are not packed)."""
    cfg = _shapes(arch, tiny, layers)
    if attn == PACKED_GQA:
        register_packed_gqa(causal_prefill=causal_prefill)
    elif causal_prefill:
        raise ValueError(f"--causal-prefill needs --attn {PACKED_GQA}")
    if attn is not None:
        cfg._attn_implementation = attn
    return cfg


def _shapes(arch: str, tiny: bool, layers: int | None) -> PretrainedConfig:
    small = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}
    if arch == "qwen2.5-7b":
        big = {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4}
        dims = {**(small if tiny else big), "vocab_size": 1000 if tiny else 152064}
        return Qwen2Config(
            **dims,
            num_hidden_layers=layers or (2 if tiny else 28),
            max_position_embeddings=32768,
            rope_theta=1e6,
            tie_word_embeddings=False,
        )
    big = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8}
    dims = {**(small if tiny else big), "vocab_size": 1000 if tiny else 128256}
    layers = layers or (2 if tiny else 32)
    return LlamaConfig(**dims, num_hidden_layers=layers, max_position_embeddings=8192, rope_theta=500000.0)


def no_init() -> contextlib.AbstractContextManager:
    """transformers' no_init_weights (5.x: transformers.initialization, 4.x: modeling_utils), else nothing."""
    for mod in ("transformers.initialization", "transformers.modeling_utils"):
        with contextlib.suppress(ImportError, AttributeError):
            return importlib.import_module(mod).no_init_weights()
    return contextlib.nullcontext()


def build_model(arch: str, cfg: PretrainedConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Construct in ``dtype`` on ``device`` without init kernels, then fill the weights in place."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), no_init():
            model = ARCHS[arch][1](cfg)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
            else:  # RMSNorm scales, and Qwen2's q/k/v biases
                p.zero_() if name.endswith(".bias") else p.fill_(1.0)
    return model.eval().requires_grad_(False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    """Drop compiled code and CUDA-graph-tree pools too (torch._dynamo.reset), so they are neither carried
    into the next measurement nor counted as model memory."""
    torch._dynamo.reset()
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


def median_s(fn: Callable[[], Any], device: torch.device, warmup: int = 2, min_s: float = 0.0) -> float:
    """Median seconds per call of fn over REPS samples (perf_counter between device synchronizations),
    or more where ``min_s`` asks for it: samples are taken until they add up to ``min_s`` seconds
    (at most ``MAX_SAMPLES``)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < REPS or (sum(times) < min_s and len(times) < MAX_SAMPLES):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compile_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


def warm_up(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """The untimed warm-up calls of a compiled fn (compilation, CUDA graph recording): their seconds, and what
    they compiled: graphs (1 unless a guard failed and it recompiled) and CUDA graph skips (reduce-overhead
    gave up on CUDA graphs for a graph: then it is timed without them)."""
    before = compile_counts()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(WARMUP_CALLS):
        fn()
    sync(device)
    return {"seconds": time.perf_counter() - t0} | {k: v - before[k] for k, v in compile_counts().items()}


def fwd_params(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def compiler(backend: str, mode: str) -> Callable[[Callable], Callable]:
    """torch.compile(fn, mode, fullgraph=True, dynamic=False); other backends (aot_eager for CPU smoke tests)
    take no inductor mode."""
    kw: dict[str, Any] = {"mode": mode} if backend == "inductor" else {"backend": backend}
    return lambda fn: torch.compile(fn, fullgraph=True, dynamic=False, **kw)


def step_marked(fn: Callable[..., Any], **kw: Any) -> Callable[[], Any]:
    """A call of a compiled fn that starts a new CUDA-graph-tree generation first: each call's outputs may be
    overwritten by the next one, which nothing here reads."""

    def call() -> Any:
        torch.compiler.cudagraph_mark_step_begin()
        return fn(**kw)

    return call


def prefill_inputs(model: nn.Module, cfg: PretrainedConfig, device: torch.device, b: int, t: int) -> dict:
    ids = torch.randint(0, cfg.vocab_size, (b, t), device=device)
    kw = {"logits_to_keep": 1} if "logits_to_keep" in fwd_params(model) else {}
    return {"input_ids": ids, "use_cache": False, **kw}


def prefill_tok_s(model: nn.Module, cfg: PretrainedConfig, device: torch.device, b: int, t: int) -> float:
    kw = prefill_inputs(model, cfg, device, b, t)
    return b * t / median_s(lambda: model(**kw), device, min_s=PREFILL_MIN_S)


def compiled_prefill_tok_s(
    model: nn.Module, cfg: PretrainedConfig, device: torch.device, b: int, t: int, compile_fn: Callable
) -> tuple[float, dict]:
    """(tokens/s, warm_up's record) of the compiled forward at one shape."""
    kw = prefill_inputs(model, cfg, device, b, t)
    model(**kw)  # eager first: sparseflow's layers pick their kernel route for this M outside the trace
    call = step_marked(compile_fn(model.forward), **kw)
    compiled = warm_up(call, device)
    return b * t / median_s(call, device, 1, min_s=PREFILL_MIN_S), compiled


def static_cache(cfg: PretrainedConfig, batch: int, length: int, device: torch.device, dtype: torch.dtype) -> Any:
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


def decode_inputs(
    model: nn.Module, cfg: PretrainedConfig, device: torch.device, batch: int, context: int, steps: int
) -> dict:
    """Keyword arguments of one decode step after a ``context``-token prompt on a static cache long enough for
    every warm-up and timed step. Steps advance the cache position on transformers 5.x (a device-side counter,
    hence the length) and rewrite one slot on 4.x."""
    length = -(-(context + 16 + (REPS + 1) * steps) // 128) * 128
    cache = static_cache(cfg, batch, length, device, next(model.parameters()).dtype)
    names = fwd_params(model)
    kw: dict[str, Any] = {"cache" if "cache" in names else "past_key_values": cache, "use_cache": True}
    prompt = torch.randint(0, cfg.vocab_size, (batch, context), device=device)
    pos = {"cache_position": torch.arange(context, device=device)} if "cache_position" in names else {}
    keep = {"logits_to_keep": 1} if "logits_to_keep" in names else {}  # 64x512 full logits: 8 GB for nothing
    model(input_ids=prompt, **kw, **pos, **keep)
    if pos:  # 4.x: an explicit position keeps the step free of host syncs
        kw["cache_position"] = torch.tensor([context], device=device)
    return {"input_ids": torch.randint(0, cfg.vocab_size, (batch, 1), device=device), **kw}


def decode_tok_s(
    model: nn.Module, cfg: PretrainedConfig, device: torch.device, batch: int, context: int, steps: int
) -> tuple:
    """(tokens/s of one decode step replayed from a CUDA graph, graph error or None); eager steps if capture
    fails."""
    kw = decode_inputs(model, cfg, device, batch, context, steps)
    try:
        graph, _out = capture(lambda: model(**kw))
        return batch * steps / median_s(lambda: [graph.replay() for _ in range(steps)], device, 1), None
    except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager timing
        error = f"{type(e).__name__}: {e}"[:800]
        print(f"  decode b{batch}: CUDA graph failed ({error.splitlines()[0][:200]}); timing eager steps")
        sync(device)
    n = min(steps, 16)
    return batch * n / median_s(lambda: [model(**kw) for _ in range(n)], device, 1), error


def compiled_decode_tok_s(
    model: nn.Module,
    cfg: PretrainedConfig,
    device: torch.device,
    batch: int,
    context: int,
    steps: int,
    compile_fn: Callable,
) -> tuple[float, dict]:
    """(tokens/s, warm_up's record) of decode steps through the compiled forward on a static cache."""
    call = step_marked(compile_fn(model.forward), **decode_inputs(model, cfg, device, batch, context, steps))
    compiled = warm_up(call, device)
    return batch * steps / median_s(lambda: [call() for _ in range(steps)], device, 1), compiled


def generate_tok_s(model: nn.Module, cfg: PretrainedConfig, device: torch.device, context: int, new: int) -> float:
    ids = torch.randint(0, cfg.vocab_size, (1, context), device=device)
    kw = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": cfg.eos_token_id}
    return new / median_s(lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw), device, 1)


def attempt(res: dict, key: str, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) (args[2] is the device), or None with the error in res["errors"]: one failure must not end the run."""
    try:
        value = fn(*args)
        extra = value[1] if isinstance(value, tuple) and isinstance(value[1], dict) else None
        extra = "" if extra is None else f" (compile+warm-up {extra['seconds']:.1f}s, {extra['graphs']} graph(s))"
        print(f"  [{res['tag']}] {key}: {value[0] if isinstance(value, tuple) else value}{extra}")
        return value
    except Exception as e:  # noqa: BLE001
        res["errors"][key] = f"{type(e).__name__}: {e}"[:800]
        print(f"  [{res['tag']}] {key} FAILED: {res['errors'][key].splitlines()[0][:200]}")
        return None
    finally:
        free(args[2])


def choose_compile_mode(
    model: nn.Module, cfg: PretrainedConfig, device: torch.device, args: argparse.Namespace
) -> tuple[str, dict, tuple | None]:
    """--compile-mode auto: the mode with the faster dense decode b1 (used for dense and 2:4 alike). Returns
    (mode, {mode: tokens/s or None}, the chosen mode's (tokens/s, warm_up record) to reuse as dense's figure)."""
    res: dict[str, Any] = {"tag": "dense, choosing the compile mode", "errors": {}}
    runs = {}
    with torch.no_grad():
        for mode in AUTO_COMPILE_MODES:
            fn, steps = compiler(args.compile_backend, mode), args.decode_steps
            runs[mode] = attempt(res, mode, compiled_decode_tok_s, model, cfg, device, 1, args.context, steps, fn)
    timed = {m: r for m, r in runs.items() if r is not None}
    best = max(timed, key=lambda m: timed[m][0]) if timed else AUTO_COMPILE_MODES[0]
    tok_s = {m: (r[0] if r else None) for m, r in runs.items()} | {"errors": res["errors"] or None}
    print(f"compile mode: {best} (dense decode b1 tok/s: {tok_s})")
    return best, tok_s, runs[best]


def measure(
    model: nn.Module,
    cfg: PretrainedConfig,
    device: torch.device,
    args: argparse.Namespace,
    res: dict,
    known: dict[str, tuple] | None = None,
) -> dict:
    """tokens/s per mode, into ``res`` (``new_result``) as each is measured, so an ``OutOfTime`` leaves
    what was measured before it there; ``finish`` it afterwards. ``known``: compiled results measured
    already (the dense decode b1 that chose the compile mode), not compiled a second time."""
    known = known or {}
    prefill = {name: PREFILL[name] for name in args.prefill}
    compile_fn = compiler(args.compile_backend, args.compile_mode)
    with torch.no_grad():
        if "eager" in args.modes:
            for name, (b, t) in prefill.items():
                res[f"prefill_tok_s_{name}"] = attempt(res, f"prefill_{name}", prefill_tok_s, model, cfg, device, b, t)
            res["generate_tok_s_b1"] = attempt(
                res, "generate_b1", generate_tok_s, model, cfg, device, args.context, args.new_tokens
            )
        if "graph" in args.modes and device.type == "cuda":
            for b in args.decode_batches:
                out = attempt(res, f"decode_b{b}", decode_tok_s, model, cfg, device, b, args.context, args.decode_steps)
                tok_s, graph_err = out if out else (None, None)
                res[f"decode_tok_s_b{b}"], res[f"decode_mode_b{b}"] = tok_s, "eager" if graph_err else "cuda_graph"
                if graph_err:
                    res["decode_graph_error"][f"b{b}"] = graph_err
        if "compiled" in args.modes:
            for name, (b, t) in prefill.items():
                key = f"compiled_prefill_{name}"
                out = attempt(res, key, compiled_prefill_tok_s, model, cfg, device, b, t, compile_fn)
                res[f"compiled_prefill_tok_s_{name}"], res["compiled"][f"prefill_{name}"] = out or (None, None)
            for b in args.decode_batches:
                key = f"compiled_decode_b{b}"
                out = known.get(key) or attempt(
                    res, key, compiled_decode_tok_s, model, cfg, device, b, args.context, args.decode_steps, compile_fn
                )
                res[f"compiled_decode_tok_s_b{b}"], res["compiled"][f"decode_b{b}"] = out or (None, None)
    return res


def new_result(tag: str) -> dict:
    """One model's figures before any is measured: every tokens/s key present, as None."""
    res: dict[str, Any] = {"tag": tag, "errors": {}, "decode_graph_error": {}, "compile_seconds": {}, "compiled": {}}
    return res | {tok_key: None for tok_key, _, _ in SPEEDUPS.values()}


def finish(res: dict) -> dict:
    """``measure``'s figures as the JSON holds them: per-compile records split by kind, empties as None."""
    compiled = {k: v for k, v in res.pop("compiled").items() if v}
    res["compile_seconds"] = {k: v["seconds"] for k, v in compiled.items()}
    res["compile_graphs"] = {k: v["graphs"] for k, v in compiled.items()}
    res["cudagraph_skips"] = {k: v["cudagraph_skips"] for k, v in compiled.items()}
    for key in ("errors", "decode_graph_error", "compile_seconds", "compile_graphs", "cudagraph_skips"):
        res[key] = res[key] or None
    del res["tag"]
    return res


def linear_bytes(model: nn.Module) -> dict[str, int]:
    """Decoder-layer linear weight bytes: nn.Linear weights, and what each SparseLinear holds on the
    device (``memory_bytes``: the portable form unless a compact layer freed it, each kernel layout,
    dense copies, the fused gate/up layout); ``sparse`` is their sum, ``portable`` the compressed size."""
    layers = getattr(getattr(model, "model", model), "layers", model)
    kinds = ("portable", "cusparselt", "cutlass", "decode", "dense_fallback")
    out = dict.fromkeys(("dense", "sparse", "n_dense", "n_sparse", "compressed", *kinds), 0)
    for m in layers.modules():
        if isinstance(m, SparseGatedMLP) and m._fused is not None:
            out["decode"] += m._fused[1].nbytes
            out["sparse"] += m._fused[1].nbytes
        if isinstance(m, SparseLinear):
            out["compressed"], out["n_sparse"] = out["compressed"] + m.weight_nbytes, out["n_sparse"] + 1
            held = m.memory_bytes()
            out["sparse"] += held["total"]
            for k in kinds:
                out[k] += held[k]
        elif isinstance(m, nn.Linear):
            out["dense"], out["n_dense"] = out["dense"] + m.weight.numel() * m.weight.element_size(), out["n_dense"] + 1
    return out


def fused_groups(model: nn.Module) -> dict[str, int]:
    """How many q/k/v and gate/up groups run as one GEMM (``sparseflow.nn.fuse_projections``)."""
    groups = {id(g): g for m in model.modules() if (g := m.__dict__.get("_group")) is not None and g.fused is not None}
    return {
        "qkv": sum(len(g.members) == 3 for g in groups.values()),
        "gate_up": sum(len(g.members) == 2 for g in groups.values()),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def plot(result: dict, path: Path) -> None:
    """Grouped bars: per metric, one bar for each mode that measured it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not available: no plot")
        return
    groups: dict[str, dict[str, float]] = {}
    for key, (_, label, mode) in SPEEDUPS.items():
        if result[key] is not None:
            groups.setdefault(label, {})[mode] = result[key]
    if not groups:
        print("no speedups measured: no plot")
        return
    colors = {"eager": "tab:blue", "graph": "tab:orange", "compiled": "tab:green"}
    width = 0.8 / len(MODES)
    fig, ax = plt.subplots(figsize=(max(9, 1.1 * len(groups)), 4.8))
    for i, mode in enumerate(MODES):
        xs = [j + (i - (len(MODES) - 1) / 2) * width for j, g in enumerate(groups.values()) if mode in g]
        vals = [g[mode] for g in groups.values() if mode in g]
        if vals:
            bars = ax.bar(xs, vals, width, label=mode, color=colors[mode])
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(groups)), list(groups), rotation=20, ha="right")
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_ylabel("2:4 tokens/s over dense")
    ax.legend(title=f"mode (compiled: {result['compile']['mode']})", fontsize=8)
    mem = result["linear_weight_memory_ratio"]
    cfg = result["config"]
    arch = ("tiny " if cfg["tiny"] else "") + ARCHS[result["arch"]][2]
    ax.set_title(
        f"{result['device']}: {arch}, {cfg['layers']} layers, sparseflow 2:4 vs dense"
        + (f"\n(linear weight memory {mem:.2f}x)" if mem else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(result: dict) -> None:
    dense, sparse, mib, x = result["dense"], result["sparse"], 2**-20, lambda v: "-" if v is None else f"{v:.2f}x"
    print(f"\n{'metric':<36} | {'mode':<26} | {'dense':>12} | {'2:4':>12} | 2:4 vs dense")
    for key, (tok_key, label, mode) in SPEEDUPS.items():
        if mode == "graph":
            b = tok_key.split("_")[-1]
            fell_back = {d.get(f"decode_mode_{b}") for d in (dense, sparse)} == {"eager"}
            mode = "graph (eager)" if fell_back else mode
        elif mode == "compiled":
            mode = f"compiled ({result['compile']['mode']})"
        a, b = (f"{d[tok_key]:,.1f}" if d[tok_key] is not None else "-" for d in (dense, sparse))
        print(f"{label + ' tok/s':<36} | {mode:<26} | {a:>12} | {b:>12} | {x(result[key])}")
    w, p = result["linear_weight_bytes"], result["peak_memory_bytes"]
    mem_rows = [("decoder linear weights MiB", w["dense"], w["sparse"])]
    mem_rows += [("GPU allocated MiB", result["gpu_memory_before_bytes"], result["gpu_memory_after_bytes"])]
    for label, a, b in [*mem_rows, ("peak GPU MiB while benchmarking", p["dense"], p["sparse"])]:
        sa, sb = ("-" if v is None else f"{v * mib:,.1f}" for v in (a, b))
        print(f"{label:<36} | {'':<26} | {sa:>12} | {sb:>12} | {x(ratio(b, a))}")


def comma_list(choices: tuple | dict) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in items if v not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{bad or text!r}: choose from {', '.join(choices)}")
        return items

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=list(ARCHS), default="llama3-8b")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the arch's; 2 with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="tiny config of the arch, for CPU smoke tests")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--modes", type=comma_list(MODES), default=list(MODES), help="comma list of eager,graph,compiled")
    ap.add_argument(
        "--compile-mode",
        choices=["reduce-overhead", "max-autotune-no-cudagraphs", "default", "auto"],
        default="reduce-overhead",
        help="torch.compile mode; auto: the faster of reduce-overhead and default at dense decode b1",
    )
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: smoke tests)")
    ap.add_argument("--context", type=int, default=512, help="prompt tokens before decode steps and generate")
    ap.add_argument(
        "--attn",
        default=None,
        help=f"attention implementation for both models (sdpa, eager, {PACKED_GQA}: decode steps without repeat_kv)",
    )
    ap.add_argument("--prefill", type=comma_list(PREFILL), default=list(PREFILL), help="comma list of shapes")
    ap.add_argument(
        "--decode-batches",
        type=lambda v: [int(t) for t in v.split(",")],
        default=list(DECODE_BATCHES),
        help="comma list of decode batch sizes",
    )
    ap.add_argument("--decode-steps", type=int, default=50, help="decode steps per timed sample")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens per generate call")
    ap.add_argument("--reps", type=int, default=REPS, help="timed samples per metric (median)")
    ap.add_argument(
        "--memory", choices=["compact", "fast"], default="compact", help="the 2:4 layers' memory mode (SparseLinear)"
    )
    ap.add_argument(
        "--causal-prefill",
        action="store_true",
        help=f"with --attn {PACKED_GQA}: compiled prompts run causal flash attention, not a materialised mask",
    )
    ap.add_argument(
        "--tag", default="", help="appended to the result file's name (runs of one call keep their own files)"
    )
    return ap.parse_args(argv)


def convert(model: nn.Module, args: argparse.Namespace, device: torch.device, peaks: dict) -> tuple:
    """Sparsify the model in place and run ``sf.autotune`` for every M the 2:4 runs use: (sparsify
    seconds, autotune seconds, autotune's records)."""
    t0 = time.perf_counter()
    sf.sparsify(model, method="magnitude", fallback="never", progress=False, verbose=False)
    sf.set_memory(model, args.memory)
    sync(device)
    convert_s = time.perf_counter() - t0
    peaks["convert"] = peak(device, reset=True)
    print(f"sparsify: {convert_s:.1f}s")
    # The one-time kernel measurements (incl. the cuSPARSELt tuner) for every M the runs below
    # use (decode prompts too), timed on their own so they are neither hidden in nor charged to the
    # first timed call; compiled and graph-captured calls must find them done.
    t0 = time.perf_counter()
    tokens = {b * t for b, t in (PREFILL[n] for n in args.prefill)} | {args.context} | set(args.decode_batches)
    tokens |= {b * args.context for b in args.decode_batches}
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
    return convert_s, autotune_s, tuned


def main(argv: list[str] | None = None) -> dict:
    global REPS
    args = parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():  # else an 8B model is built in host memory and OOM-killed
        raise SystemExit("bench_model: needs a CUDA GPU (use --tiny for a small CPU smoke test)")
    REPS = args.reps
    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    match = re.search(r"\b([A-Z]+\d+[A-Z]*)\b", name) if cuda else None
    tag = match.group(1).lower() if match else ("gpu" if cuda else "cpu")
    cfg = model_config(args.arch, args.tiny, args.layers, args.attn, args.causal_prefill)
    skipped = {} if cuda or "graph" not in args.modes else {"graph": "no CUDA device: CUDA graph decode skipped"}
    if skipped:
        print(f"note: {skipped['graph']}")

    t0 = time.perf_counter()
    model = build_model(args.arch, cfg, device, dtype)
    sync(device)
    peaks = {"build": peak(device, reset=True)}
    print(f"built {cfg.num_hidden_layers}-layer {args.arch} on {name} ({dtype}) in {time.perf_counter() - t0:.1f}s")
    dense_w = linear_bytes(model)
    requested_mode, auto, known = args.compile_mode, None, {}
    dense, sparse = new_result("dense"), new_result("2:4")
    convert_s = autotune_s = mem_before = mem_after = stopped = None
    tuned: list[dict] = []
    phase = "dense"
    # A device call's time limit ends this run with SIGTERM (gpu_check.sh runs it under `timeout`):
    # what was measured by then is still written.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm) if main_thread else None
    try:
        if "compiled" in args.modes and args.compile_mode == "auto":
            args.compile_mode, auto, chosen = choose_compile_mode(model, cfg, device, args)
            known = {"compiled_decode_b1": chosen} if chosen else {}
        measure(model, cfg, device, args, dense, known)
        peaks["dense"] = peak(device, reset=True)
        free(device)
        mem_before = torch.cuda.memory_allocated(device) if cuda else None
        phase = "the conversion"
        convert_s, autotune_s, tuned = convert(model, args, device, peaks)
        phase = "2:4"
        measure(model, cfg, device, args, sparse)
        peaks["sparse"] = peak(device)
        free(device)
        mem_after = torch.cuda.memory_allocated(device) if cuda else None
    except OutOfTime as e:
        stopped = f"stopped ({e}, a time limit) while measuring {phase}: what was not measured is null"
        print(stopped)
        free(device)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    finish(dense)
    finish(sparse)
    sparse_w = linear_bytes(model)
    peaks = {"dense": None, "sparse": None} | peaks  # the phases a time limit stopped peaked at nothing known
    dense["peak_memory_bytes"], sparse["peak_memory_bytes"] = peaks["dense"], peaks["sparse"]

    speedups = {k: ratio(sparse[tok_key], dense[tok_key]) for k, (tok_key, _, _) in SPEEDUPS.items()}
    mem_vs_dense = ratio(mem_after, mem_before)
    result: dict[str, Any] = {
        "device": name,
        "tag": tag,
        "arch": args.arch,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__}
        | {"sparseflow": sf.__version__},
        "dtype": str(dtype).replace("torch.", ""),
        "config": {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size}
        | {"heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads, "vocab": cfg.vocab_size}
        | {"tiny": args.tiny},
        "settings": {"prefill": {n: PREFILL[n] for n in args.prefill}, "context": args.context}
        | {"decode_batches": args.decode_batches, "decode_steps": args.decode_steps, "reps": REPS}
        | {"new_tokens": args.new_tokens, "attn": getattr(model.config, "_attn_implementation", None)}
        | {"causal_prefill": args.causal_prefill}
        | {"modes": args.modes, "skipped": skipped or None},
        "compile": {"mode": args.compile_mode, "requested": requested_mode, "backend": args.compile_backend}
        | {"fullgraph": True, "dynamic": False, "auto_dense_decode_tok_s_b1": auto},
        # What the issue asks for first: compiled figures (the fastest way HF users run a model) and memory.
        "headline": {k: speedups[f"compiled_{k}"] for k in ("decode_speedup_b1", "decode_speedup_b16")}
        | {"prefill_speedup": speedups["compiled_prefill_speedup"], "gpu_memory_vs_dense": mem_vs_dense},
        "dense": dense,
        "sparse": sparse,
        **speedups,
        "linear_weight_bytes": {"dense": dense_w["dense"], "sparse": sparse_w["sparse"] + sparse_w["dense"]}
        | {"converted": sparse_w["n_sparse"], "left_dense": sparse_w["n_dense"]}
        | {"compressed": sparse_w["compressed"], "portable_held": sparse_w["portable"]}
        | {
            "cusparselt_copies": sparse_w["cusparselt"],
            "cutlass_copies": sparse_w["cutlass"],
            "decode_copies": sparse_w["decode"],
            "dense_fallback_copies": sparse_w["dense_fallback"],
        },
        "memory_mode": args.memory,
        "fused_groups": fused_groups(model),
        "resident_layouts": {
            k: sum(1 for r in tuned if r.get("resident") == k) for k in ("cutlass", "cusparselt", "dense")
        },
        # (None where a time limit stopped the run before the model was converted)
        "linear_weight_memory_ratio": ratio(sparse_w["sparse"] + sparse_w["dense"], dense_w["dense"])
        if convert_s is not None
        else None,
        # torch.cuda.memory_allocated after each model's measurements, compiled graphs freed
        "gpu_memory_before_bytes": mem_before,
        "gpu_memory_after_bytes": mem_after,
        "gpu_memory_after_vs_before": mem_vs_dense,
        "gpu_memory_vs_dense": mem_vs_dense,
        "peak_memory_bytes": peaks,
        "convert_seconds": convert_s,
        "autotune_seconds": autotune_s,
        "kernel_choices": tuned,  # per distinct layer shape and M: dense / decode / cusparselt, speedup
        "stopped": stopped,  # None, or where a time limit stopped the measurements
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = (
        f"model_{tag}"
        + ("" if args.arch == "llama3-8b" else f"_{args.arch}")
        + ("_fast" if args.memory == "fast" else "")
        + (f"_attn-{args.attn}" if args.attn else "")
        + ("-causal" if args.causal_prefill else "")
        + ("" if set(args.modes) == set(MODES) else "_" + "-".join(args.modes))  # a part of the runs
        + (f"_{args.tag}" if args.tag else "")
    )
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str))
    report(result)
    plot(result, out / f"{stem}.png")
    print(f"wrote {out / stem}.json and .png")
    s = {k: "n/a" if v is None else f"{v:.2f}x" for k, v in result.items() if k in SPEEDUPS or "ratio" in k}
    s["gpu_mem"] = "n/a" if mem_vs_dense is None else f"{mem_vs_dense:.2f}x"
    graph = "eager" if "eager" in {dense.get(f"decode_mode_b{b}") for b in DECODE_BATCHES} else "graph"
    pre = [n for n in PREFILL if n != "b1x2048"]
    print(
        f"MODEL {name} arch={args.arch} layers={cfg.num_hidden_layers} context={args.context} "
        f"prefill_b1x2048={s['prefill_speedup']} "
        + " ".join(f"prefill_{n}={s[f'prefill_speedup_{n}']}" for n in pre)
        + " "
        + " ".join(f"decode_{graph}_b{b}={s[f'decode_speedup_b{b}']}" for b in DECODE_BATCHES)
        + f" generate_b1={s['eager_generate_speedup_b1']} compile_mode={args.compile_mode} "
        f"compiled_prefill_b1x2048={s['compiled_prefill_speedup']} "
        + " ".join(f"compiled_prefill_{n}={s[f'compiled_prefill_speedup_{n}']}" for n in pre)
        + " "
        + " ".join(f"compiled_decode_b{b}={s[f'compiled_decode_speedup_b{b}']}" for b in DECODE_BATCHES)
        + f" linear_weight_mem={s['linear_weight_memory_ratio']} gpu_mem={s['gpu_mem']}"
        + ("" if convert_s is None else f" convert={convert_s:.1f}s")
        + (" STOPPED by a time limit" if stopped else "")
    )
    return result


if __name__ == "__main__":
    if main().get("stopped"):
        raise SystemExit(124)
