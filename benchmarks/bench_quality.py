"""Quality of 2:4 pruning methods on a real model: perplexity of SmolLM2-135M-Instruct after
``sparsify`` with magnitude / Wanda / SparseGPT (every decoder linear 2:4, fallback="never").

Text (offline, ships with Python): the help topics of ``pydoc_data.topics``, sorted by name; the
first half of the topics is the calibration text (32 random windows of 512 tokens), the second
half the evaluation text (non-overlapping 512-token windows). Writes
``benchmarks/results/quality_smollm2.json`` and prints a table plus greedy answers per method.

    python benchmarks/bench_quality.py                  # CPU: ~10 min; a GPU: ~1 min
    python benchmarks/bench_quality.py --eval-windows 32 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import sparseflow as sf
from sparseflow.convert import report, sparsify, text_windows
from sparseflow.data import GGUF, eval_windows, greedy_answer, load_gguf, perplexity, pydoc_texts, smollm2_path
from sparseflow.nn import SparseLinear

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a Python function that returns the sum of two numbers.",
]
TARGETS = {"wanda": 6.0, "sparsegpt": 3.5}  # max perplexity ratio to dense


def answers(model: nn.Module, tok, max_new_tokens: int) -> list[str]:
    return [greedy_answer(model, tok, prompt, max_new_tokens) for prompt in PROMPTS]


def decoder_linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf-dir", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16, help="512-token evaluation windows (0: all)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quality_smollm2.json"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="sparseflow: 2:4 weights on the CPU")
    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device(args.device)

    path = Path(args.gguf_dir) / GGUF if args.gguf_dir else smollm2_path()
    t0 = time.perf_counter()
    dense, tok = load_gguf(path, torch.float32, device)
    load_s = time.perf_counter() - t0
    calib_text, eval_text, source = pydoc_texts()
    calibration = [w.to(device) for w in text_windows(calib_text, tok, args.calib_windows, args.seq_len, seed=0)]
    evaluation = [w.to(device) for w in eval_windows(eval_text, tok, args.eval_windows, args.seq_len)]
    print(f"model: {GGUF} (dequantized to fp32) on {device}, loaded in {load_s:.0f} s")
    print(f"text: {source}")
    print(
        f"calibration: {len(calibration)} x {args.seq_len} tokens; evaluation: {len(evaluation)} x {args.seq_len} tokens"
    )

    names = decoder_linears(dense)
    rows = []
    for method in ["dense", *[m for m in args.methods.split(",") if m]]:
        model = dense if method == "dense" else copy.deepcopy(dense)
        seconds = 0.0
        extra = {}
        if method != "dense":
            t = time.perf_counter()
            sparsify(model, method, calibration=calibration, fallback="never", include=names, verbose=False)
            seconds = time.perf_counter() - t
            rep = report(model)
            mods = dict(model.named_modules())
            assert all(isinstance(mods[n], SparseLinear) and sf.is_2_4(mods[n].dense_weight()) for n in names)
            errs = [r.rel_error for r in rep.layers if r.rel_error is not None]
            extra = {
                "sparse_layers": rep.counts()["sparse"],
                "mean_layer_rel_error": sum(errs) / len(errs) if errs else None,
                "calibration": rep.calibration,
            }
        t = time.perf_counter()
        ppl = perplexity(model, evaluation)
        eval_s = time.perf_counter() - t
        gen = answers(model, tok, args.max_new_tokens)
        rows.append(
            {
                "method": method,
                "perplexity": ppl,
                "sparsify_seconds": seconds,
                "eval_seconds": eval_s,
                "answers": gen,
                **extra,
            }
        )
        print(f"  {method:<10} ppl {ppl:9.2f}   sparsify {seconds:6.1f} s   eval {eval_s:5.1f} s", flush=True)
        if model is not dense:
            del model

    base = rows[0]["perplexity"]
    for r in rows:
        r["ratio_to_dense"] = r["perplexity"] / base
        limit = TARGETS.get(r["method"])
        r["target_ratio"] = limit
        r["meets_target"] = None if limit is None else r["ratio_to_dense"] <= limit

    print()
    print(f"{'method':<10} {'layers 2:4':>10} {'perplexity':>11} {'x dense':>8} {'target':>7} {'sparsify s':>11}")
    for r in rows:
        target = (
            "-"
            if r["target_ratio"] is None
            else f"<={r['target_ratio']:.1f}x " + ("ok" if r["meets_target"] else "MISS")
        )
        layers = r.get("sparse_layers", 0)
        print(
            f"{r['method']:<10} {layers:>10} {r['perplexity']:>11.2f} {r['ratio_to_dense']:>7.2f}x {target:>7} {r['sparsify_seconds']:>11.1f}"
        )
    print()
    for i, prompt in enumerate(PROMPTS):
        print(f"Q: {prompt}")
        for r in rows:
            print(f"  {r['method']:<10} {r['answers'][i][:160]!r}")

    result = {
        "model": GGUF,
        "dtype": "float32 (dequantized from Q4_1)",
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "text": source,
        "calibration_tokens": [len(calibration), args.seq_len],
        "evaluation_tokens": [len(evaluation), args.seq_len],
        "decoder_linears": len(names),
        "fallback": "never",
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
