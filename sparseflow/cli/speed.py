"""Prefill and decode tokens/s of a causal LM, measured the same way for dense and 2:4 models."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Speed:
    prefill: float  # tokens/s of one forward over the prompt
    decode: float  # tokens/s of one-token steps on the KV cache, batch 1
    prompt_tokens: int
    new_tokens: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(model: nn.Module, prompt_tokens: int = 128, new_tokens: int = 32, repeats: int = 3) -> Speed:
    """Best of ``repeats``: a 1 x prompt_tokens forward (prefill), then ``new_tokens`` greedy
    steps on its KV cache (decode). Random prompt ids, so no tokenizer is needed; a warm-up
    run first, so one-time costs (dispatch measurement, caches) are not counted."""
    if prompt_tokens < 1 or new_tokens < 1 or repeats < 1:
        raise ValueError("bench: --prompt-tokens, --tokens and --repeats must be positive")
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    # transformers 5.x renamed past_key_values to cache (the old name still works, with a warning)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    best_prefill = best_decode = 0.0
    for rep in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        _sync(device)
        t1 = time.perf_counter()
        past, token = out[key], out.logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            out = model(token, use_cache=True, **{key: past})
            past, token = out[key], out.logits[:, -1:].argmax(-1)
        _sync(device)
        t2 = time.perf_counter()
        if rep:  # rep 0 is the warm-up
            best_prefill = max(best_prefill, prompt_tokens / (t1 - t0))
            best_decode = max(best_decode, new_tokens / (t2 - t1))
    return Speed(best_prefill, best_decode, prompt_tokens, new_tokens)


def table(dense: Speed, sparse: Speed) -> str:
    """Dense vs 2:4 rows plus the ratio row."""
    head = (
        f"{'':<8} {f'prefill tok/s (1x{dense.prompt_tokens})':>26} {f'decode tok/s (b1, {dense.new_tokens} steps)':>30}"
    )
    rows = [head]
    for name, s in (("dense", dense), ("2:4", sparse)):
        rows.append(f"{name:<8} {s.prefill:>26,.1f} {s.decode:>30,.1f}")
    rows.append(f"{'2:4/dense':<8} {sparse.prefill / dense.prefill:>25.2f}x {sparse.decode / dense.decode:>29.2f}x")
    return "\n".join(rows)
