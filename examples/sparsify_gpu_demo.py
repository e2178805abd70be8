"""sf.sparsify on a GPU, then inference through SparseLinear: a Llama-3-8B-width model with random
fp16 weights (no download), a few decoder blocks so it runs in a minute.

    python examples/sparsify_gpu_demo.py [--layers 4] [--method sparsegpt]

Prints the per-layer report, checks the sparsified model against the same model with its
converted weights pruned by hand, generates greedily, and times prefill/decode dense vs 2:4.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sparseflow as sf
from sparseflow.nn import SparseLinear


def tokens_per_s(model, ids, new_tokens=0) -> float:
    with torch.no_grad():
        for _ in range(2):
            model(ids) if not new_tokens else model.generate(ids, max_new_tokens=4, do_sample=False)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        reps = 3
        for _ in range(reps):
            if new_tokens:
                model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            else:
                model(ids)
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / reps
    return (new_tokens or ids.numel()) * (ids.shape[0] if new_tokens else 1) / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument(
        "--fallback",
        default="never",
        choices=["never", "auto"],
        help="never: every linear becomes a SparseLinear (its dispatcher still picks dense per M "
        "where 2:4 is slower); auto: layers where 2:4 is slower stay unpruned nn.Linear",
    )
    ap.add_argument("--method", default="sparsegpt", choices=["magnitude", "wanda", "sparsegpt"])
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    model = LlamaForCausalLM(cfg).to("cuda", torch.float16).eval()
    dense = copy.deepcopy(model)
    calib = [torch.randint(0, cfg.vocab_size, (1, 512), device="cuda") for _ in range(8)]
    t0 = time.perf_counter()
    sf.sparsify(
        model,
        method=args.method,
        calibration=calib if args.method != "magnitude" else None,
        fallback=args.fallback,
        progress=False,
        verbose=False,
    )
    print(f"sparsify({args.method}) on {torch.cuda.get_device_name()}: {time.perf_counter() - t0:.1f}s")
    rep = sf.report(model)
    print(rep.summary())

    # Same model, converted weights pruned by hand: logits must match the SparseLinear model.
    ref = copy.deepcopy(dense)
    mods = dict(model.named_modules())
    for name, mod in ref.named_modules():
        if isinstance(mods.get(name), SparseLinear):
            mod.weight.data = mods[name].dense_weight()
    ids = torch.randint(0, cfg.vocab_size, (1, 64), device="cuda")
    with torch.no_grad():
        a, b = model(ids).logits.float(), ref(ids).logits.float()
    print(f"logits vs hand-pruned reference: rel err {((a - b).norm() / b.norm()).item():.2e}")
    out = model.generate(ids[:, :8], max_new_tokens=12, do_sample=False)
    out_ref = ref.generate(ids[:, :8], max_new_tokens=12, do_sample=False)
    print(f"greedy generate equal to reference: {torch.equal(out, out_ref)}")

    sparse_bytes = sum(m.weight_nbytes for m in model.modules() if isinstance(m, SparseLinear))
    dense_bytes = sum(
        m.weight_values.element_size() * m.in_features * m.out_features
        for m in model.modules()
        if isinstance(m, SparseLinear)
    )
    if dense_bytes:
        print(
            f"converted linears: {sparse_bytes / 2**30:.2f} GiB vs dense {dense_bytes / 2**30:.2f} GiB "
            f"({sparse_bytes / dense_bytes:.3f}x)"
        )
    del ref
    prefill = torch.randint(0, cfg.vocab_size, (1, args.prefill), device="cuda")
    decode = torch.randint(0, cfg.vocab_size, (1, 16), device="cuda")
    d_pre, s_pre = tokens_per_s(dense, prefill), tokens_per_s(model, prefill)
    d_dec, s_dec = tokens_per_s(dense, decode, 32), tokens_per_s(model, decode, 32)
    print(
        f"DEMO prefill 1x{args.prefill}: dense {d_pre:,.0f} tok/s, 2:4 {s_pre:,.0f} tok/s ({s_pre / d_pre:.2f}x) | "
        f"eager decode b1: dense {d_dec:,.1f} tok/s, 2:4 {s_dec:,.1f} tok/s ({s_dec / d_dec:.2f}x)"
    )


if __name__ == "__main__":
    main()
