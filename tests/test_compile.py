"""torch.compile on a whole (tiny) Hugging Face model with 2:4 layers: no graph breaks, the same
logits, and on the GPU the same greedy tokens eager, compiled (inductor) and compiled with
``mode="reduce-overhead"``, which replays every step as a CUDA graph (the static-cache recipe
transformers documents for fast generation)."""

import inspect

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

import sparseflow as sf
from sparseflow.nn import SparseGatedMLP, SparseLinear
from tests.conftest import needs_cuda


def _tiny_sparse_llama(device, dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=512,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    sf.sparsify(model, method="magnitude", fallback="never", progress=False, verbose=False)
    assert any(isinstance(m, SparseGatedMLP) for m in model.modules())  # the fused MLP is traced too
    assert sum(isinstance(m, SparseLinear) for m in model.modules()) == 14
    return model


@pytest.mark.parametrize("one_layout", [False, True])
def test_compiled_model_has_no_graph_break_and_the_same_logits(one_layout):
    """fullgraph=True fails on any graph break; aot_eager traces what inductor would get.
    ``one_layout``: every layer keeps one layout and N x 0 placeholders for its portable buffers,
    as compact layers do on a GPU (here the dense kernel's layout, which runs on the CPU)."""
    model = _tiny_sparse_llama("cpu", torch.float32)
    if one_layout:
        for layer in (m for m in model.modules() if isinstance(m, SparseLinear)):
            w = layer.weight_2_4
            w.keep_only("dense")
            layer._buffers["weight_values"], layer._buffers["weight_meta"] = w.values, w.meta
    ids = torch.randint(0, 512, (2, 11))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        out = torch.compile(model.forward, fullgraph=True, backend="aot_eager")(input_ids=ids).logits
    torch.testing.assert_close(out, ref)


def _static_cache(model, batch: int, length: int):
    params = inspect.signature(StaticCache.__init__).parameters
    full = {"config": model.config, "max_batch_size": batch, "max_cache_len": length}
    full |= {"device": model.device, "dtype": model.dtype}
    return StaticCache(**{k: v for k, v in full.items() if k in params})


def _greedy(model, step, prompt: torch.Tensor, new: int) -> list[list[int]]:
    """Greedy decoding on a static cache; ``step(ids, cache, position)`` runs one forward."""
    cache = _static_cache(model, prompt.shape[0], prompt.shape[1] + new + 1)
    pos = torch.arange(prompt.shape[1], device=prompt.device)
    logits = model(input_ids=prompt, past_key_values=cache, cache_position=pos, use_cache=True).logits
    tok = logits[:, -1:].argmax(-1)
    out = [tok]
    for i in range(new - 1):
        pos = torch.tensor([prompt.shape[1] + i], device=prompt.device)
        tok = step(tok, cache, pos)[:, -1:].argmax(-1).clone()
        out.append(tok)
    return torch.cat(out, 1).tolist()


@needs_cuda
@pytest.mark.gpu
@pytest.mark.skipif(not sf.extension_available(), reason="CUDA extension not built")
@pytest.mark.parametrize("memory", ["compact", "fast"])
def test_greedy_tokens_equal_eager_graph_and_compiled(memory):
    model = _tiny_sparse_llama("cuda", torch.float16)
    sf.set_memory(model, memory)
    prompt = torch.randint(0, 512, (2, 9), device="cuda")

    def eager(tok, cache, pos):
        return model(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True).logits

    def compiled(mode):
        fwd = torch.compile(model.forward, mode=mode, fullgraph=True)
        return lambda tok, cache, pos: (
            fwd(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True).logits
        )

    # "reduce-overhead" replays each step as a CUDA graph. A graph of the HF step captured by hand
    # (torch.cuda.graph) gave other tokens from the 11th on (H100): host-side values frozen at
    # capture, the likely cause, were not confirmed, so the graph is checked as users get it.
    with torch.no_grad():
        ref = _greedy(model, eager, prompt, 12)
        assert _greedy(model, compiled("default"), prompt, 12) == ref
        assert _greedy(model, compiled("reduce-overhead"), prompt, 12) == ref
