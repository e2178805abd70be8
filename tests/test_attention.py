"""``sparseflow.nn.register_packed_gqa``: transformers' SDPA attention with one-token decode steps of grouped-query
attention run on the k/v heads as stored. Checked against transformers' eager attention (repeat_kv and
matmuls) on tiny Llama and Qwen2 models, eager, traced and through ``generate`` with a static cache."""

import pytest
import torch
from transformers import AttentionInterface

import sparseflow as sf
from sparseflow.nn.attention import PACKED_GQA, packed_gqa_sdpa
from tests.conftest import benchmark_script


@pytest.mark.parametrize("arch", ["llama3-8b", "qwen2.5-7b"])
def test_packed_gqa_matches_transformers_at_decode_steps_eager_and_compiled(arch):
    """``--attn sdpa_packed_gqa`` runs a one-token step on the k/v heads as stored (no repeat_kv): its logits
    equal transformers' eager attention (which repeats k/v and multiplies out), eager and traced, on a static
    cache whose mask hides the unfilled slots; prefill goes to transformers' own SDPA."""
    seen = []

    def spy(module, query, key, value, mask, **kw):
        seen.append((query.shape[2], None if mask is None else tuple(mask.shape)))
        return packed_gqa_sdpa(module, query, key, value, mask, **kw)

    logits = {}
    try:
        _decode_steps(arch, spy, logits)
    finally:
        sf.nn.register_packed_gqa()  # the real function again
    assert (16, None) in seen  # the prompt: transformers' SDPA path
    steps = [mask for q_len, mask in seen if q_len == 1]
    assert len(steps) == 4 and all(m is not None and m[:3] == (3, 1, 1) and m[3] > 17 for m in steps)  # masked
    for name in (PACKED_GQA, "compiled"):
        torch.testing.assert_close(logits[name], logits["eager"], rtol=1e-4, atol=1e-5)


def _decode_steps(arch, spy, logits):
    """One decode step's logits after a 16-token prompt: eager attention, packed, packed and traced."""
    bm = benchmark_script("bench_model")  # its tiny configs, weights and static-cache step
    for run in ("eager", PACKED_GQA, "compiled"):
        model, cfg, forward = _tiny(bm, arch, run, spy)
        assert cfg.num_attention_heads // cfg.num_key_value_heads == 2  # grouped-query attention
        torch.manual_seed(1)  # the same prompt and step token in each run, each on a fresh cache
        kw = bm.decode_inputs(model, cfg, torch.device("cpu"), 3, 16, 1)
        logits[run] = forward(**kw).logits


def _tiny(bm, arch, run, spy, causal_prefill=False):
    """(model, config, forward) of a tiny ``arch`` with seeded weights: ``run`` "eager" is transformers' eager
    attention; otherwise ``sdpa_packed_gqa`` with ``spy`` as its attention function, "compiled" traced
    whole (fullgraph) by aot_eager."""
    attn = "eager" if run == "eager" else PACKED_GQA
    cfg = bm.model_config(arch, True, 2, attn, causal_prefill=causal_prefill and attn == PACKED_GQA)
    if attn == PACKED_GQA:
        AttentionInterface.register(PACKED_GQA, spy)
    torch.manual_seed(0)
    model = bm.build_model(arch, cfg, torch.device("cpu"), torch.float32)
    forward = model.forward
    if run == "compiled":
        forward = torch.compile(forward, backend="aot_eager", fullgraph=True, dynamic=False)
    return model, cfg, forward


def test_generate_with_a_static_cache_gives_the_same_greedy_tokens():
    """What a user runs: ``attn_implementation="sdpa_packed_gqa"`` after ``register_packed_gqa()``, and
    ``generate`` with transformers' static cache, on a 2:4 model."""
    bm = benchmark_script("bench_model")
    tokens = {}
    for attn in ("sdpa", sf.nn.register_packed_gqa()):
        cfg = bm.model_config("llama3-8b", True, 2, attn)
        torch.manual_seed(0)
        model = bm.build_model("llama3-8b", cfg, torch.device("cpu"), torch.float32)
        sf.sparsify(model, method="magnitude", fallback="never", progress=False, verbose=False)
        ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
        kw = {"max_new_tokens": 6, "do_sample": False, "cache_implementation": "static", "pad_token_id": 0}
        tokens[attn] = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    assert tokens["sdpa"].shape == (2, 15)
    assert torch.equal(tokens["sdpa"], tokens[PACKED_GQA])


def test_what_sdpa_cannot_do_is_refused_by_name():
    """Logit soft-capping (Gemma 2) and attention sinks are not something SDPA does: the call is refused
    by name instead of running without them (transformers 5.17's own ``sdpa`` drops a soft-cap silently).
    A position bias, which transformers folds into the mask, is handed to its ``sdpa``."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = SimpleNamespace(num_key_value_groups=2, is_causal=True)
    q, kv = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8)
    out, _ = packed_gqa_sdpa(module, q, kv, kv, None)
    ref = torch.nn.functional.scaled_dot_product_attention(q, kv.repeat_interleave(2, 1), kv.repeat_interleave(2, 1))
    torch.testing.assert_close(out, ref.transpose(1, 2))
    for extra in ("softcap", "sinks", "s_aux"):
        with pytest.raises(ValueError, match=f"cannot apply {extra}"):
            packed_gqa_sdpa(module, q, kv, kv, None, **{extra: torch.zeros(4) if extra != "softcap" else 30.0})
    bias = torch.randn(1, 4, 1, 5)
    out, _ = packed_gqa_sdpa(module, q, kv, kv, None, position_bias=bias)
    ref, _ = sdpa_attention_forward(module, q, kv, kv, None, position_bias=bias)
    torch.testing.assert_close(out, ref)
    assert not torch.allclose(out, packed_gqa_sdpa(module, q, kv, kv, None)[0])  # the bias changed the result


@pytest.mark.parametrize("arch", ["llama3-8b", "qwen2.5-7b"])
def test_causal_prefill_runs_compiled_prompts_without_a_mask(arch):
    """``register_packed_gqa(causal_prefill=True)``: a compiled forward over a prompt with no cache and no
    attention_mask reaches SDPA with no mask (so ``is_causal=True``), and its logits equal transformers'
    eager attention, which multiplies out the full causal mask."""
    bm = benchmark_script("bench_model")
    seen, logits = [], {}

    def spy(module, query, key, value, mask, **kw):
        seen.append(mask is None)
        return packed_gqa_sdpa(module, query, key, value, mask, **kw)

    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    try:
        for run in ("eager", "compiled"):
            _, _, forward = _tiny(bm, arch, run, spy, causal_prefill=True)
            logits[run] = forward(input_ids=ids, use_cache=False).logits
    finally:
        sf.nn.register_packed_gqa()
    assert seen and all(seen)  # every layer's prompt attention ran without a mask
    torch.testing.assert_close(logits["compiled"], logits["eager"], rtol=1e-4, atol=1e-5)


def test_causal_prefill_keeps_the_mask_where_it_is_needed():
    """Eager packed sequences (position_ids restarting inside a row), an attention_mask with padding, and a
    prompt after cached tokens keep transformers' mask: logits equal eager attention's."""
    bm = benchmark_script("bench_model")
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(6))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]] * 2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    cases = {"packed": {"position_ids": pos}, "padded": {"attention_mask": mask}}
    try:
        for name, kw in cases.items():
            out = {}
            for attn in ("eager", PACKED_GQA):
                model, _, _ = _tiny(bm, "llama3-8b", attn, packed_gqa_sdpa, causal_prefill=True)
                first = model(input_ids=ids[:, :5], use_cache=True)  # 5 cached tokens, then the rest
                later = model(input_ids=ids[:, 5:], past_key_values=first.past_key_values).logits
                out[attn] = (model(input_ids=ids, use_cache=False, **kw).logits, later)
            for got, want in zip(out[PACKED_GQA], out["eager"]):
                keep = slice(None) if name == "packed" else (1, slice(3, None))  # padded rows' pad logits vary
                torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-5)
    finally:
        sf.nn.register_packed_gqa()
