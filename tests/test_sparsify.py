"""sparseflow.sparsify on tiny Hugging Face models built offline from configs (CPU)."""

import copy
import json
import warnings

import pytest
import torch
import transformers as T
from torch import nn
from transformers.pytorch_utils import Conv1D

import sparseflow as sf
from sparseflow.convert import SparsifyError, api, report, sparsify, text_windows, walker
from sparseflow.convert.methods import InputStats, sparsegpt, wanda
from sparseflow.kernels.dispatch import Decision
from sparseflow.nn import SparseLinear

T.logging.set_verbosity_error()
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning", "ignore::FutureWarning")

C = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 128}
KV = {"num_key_value_heads": 2}
ARCHS = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, dict(C, **KV)),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, dict(C, **KV)),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(C, **KV)),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, dict(C, **KV, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gemma": (T.GemmaConfig, T.GemmaForCausalLM, dict(C, **KV, head_dim=16)),
    "gpt2": (
        T.GPT2Config,
        T.GPT2LMHeadModel,
        {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 128, "n_positions": 64},
    ),
    "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM, dict(C)),
    "opt": (
        T.OPTConfig,
        T.OPTForCausalLM,
        {"hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 128}
        | {"word_embed_proj_dim": 64, "max_position_embeddings": 64},
    ),
    "falcon": (
        T.FalconConfig,
        T.FalconForCausalLM,
        {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
    ),
    "bert": (T.BertConfig, T.BertForMaskedLM, dict(C, max_position_embeddings=64)),
}
# Gemma-2 alternates sliding-window and full attention: each block gets its own mask.
EXTRA = {"gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, dict(C, **KV, head_dim=16, num_hidden_layers=3))}
QUIET = {"progress": False, "verbose": False}


def tiny(arch: str, dtype=torch.float32, seed: int = 0, **overrides) -> nn.Module:
    config_cls, model_cls, kw = {**ARCHS, **EXTRA}[arch]
    kw = {"vocab_size": 128, "bos_token_id": 1, "eos_token_id": 2, **kw, **overrides}
    torch.manual_seed(seed)
    return model_cls(config_cls(**kw)).to(dtype).eval()


def calib(n=4, length=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (1, length), generator=g) for _ in range(n)]


PROMPT = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(2))


def is_layer(m):
    return isinstance(m, (nn.Linear, Conv1D))


def set_weight(mod, w_linear_layout):
    with torch.no_grad():
        mod.weight.copy_(w_linear_layout.T if isinstance(mod, Conv1D) else w_linear_layout)


def hand_pruned(model, names, weights=None):
    """A copy of ``model`` whose layers ``names`` get magnitude 2:4 (or the given dense weights)."""
    ref = copy.deepcopy(model)
    mods = dict(ref.named_modules())
    for name in names:
        mod = mods[name]
        w = mod.weight.detach().T if isinstance(mod, Conv1D) else mod.weight.detach()
        set_weight(mod, sf.prune_2_4(w) if weights is None else weights[name])
    return ref


def sparse_names(model):
    return report(model).names("sparse")


def expected_layers(model):
    out = model.get_output_embeddings()
    return sorted(n for n, m in model.named_modules() if is_layer(m) and m is not out)


# -- architectures --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_magnitude_equals_hand_pruned(arch):
    model = tiny(arch)
    ref = hand_pruned(model, expected_layers(model))
    out = sparsify(copy.deepcopy(model), fallback="never", **QUIET)
    assert sorted(sparse_names(out)) == expected_layers(model)
    mods = dict(out.named_modules())
    for name in expected_layers(model):
        assert isinstance(mods[name], SparseLinear) and sf.is_2_4(mods[name].dense_weight())
    assert not isinstance(out.get_output_embeddings(), SparseLinear)
    assert not out.training
    with torch.no_grad():
        torch.testing.assert_close(out(PROMPT).logits, ref(PROMPT).logits, rtol=1e-5, atol=1e-5)
    if arch != "bert":
        kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(out.generate(PROMPT, **kw), ref.generate(PROMPT, **kw))


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_data_methods_on_every_architecture(arch, method):
    model = tiny(arch)
    out = sparsify(copy.deepcopy(model), method, calibration=calib(), fallback="never", **QUIET)
    rep = report(out)
    assert sorted(rep.names("sparse")) == expected_layers(model)
    assert "sequential over" in rep.calibration
    mods = dict(out.named_modules())
    weights = {n: mods[n].dense_weight() for n in rep.names("sparse")}
    for name, w in weights.items():
        assert sf.is_2_4(w), name
    for r in rep.layers:
        if r.action == "sparse":
            assert r.rel_error is not None and 0 <= r.rel_error < 1.5, (r.name, r.rel_error)
    ref = hand_pruned(model, weights, weights)  # same weights in the original modules
    with torch.no_grad():
        torch.testing.assert_close(out(PROMPT).logits, ref(PROMPT).logits, rtol=1e-5, atol=1e-5)
    if arch != "bert":
        kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(out.generate(PROMPT, **kw), ref.generate(PROMPT, **kw))


def _first_layers(model, arch):
    """Per block, the layers fed the block's (normed) input: their inputs in the final model equal
    what calibration saw if block j was calibrated on the outputs of the pruned blocks < j."""
    names = {"gemma2": ("self_attn.q_proj", "self_attn.k_proj"), "gpt2": ("attn.c_attn",)}[arch]
    return [n for n, m in model.named_modules() if isinstance(m, SparseLinear) and n.endswith(names)]


@pytest.mark.parametrize(
    "arch,method",
    [("gpt2", "wanda"), ("gemma2", "sparsegpt")],  # gemma2: sliding/full layers get different masks per block
)
def test_blocks_are_calibrated_on_pruned_predecessors(arch, method):
    if arch == "gemma2":
        model = tiny(arch, sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    else:
        model = tiny(arch, n_layer=3)
    data = calib(n=3, length=20)
    out = sparsify(copy.deepcopy(model), method, calibration=data, fallback="never", **QUIET)
    names = _first_layers(out, arch)
    assert len(names) >= 3
    mods = dict(out.named_modules())
    originals = dict(model.named_modules())
    stats = {n: InputStats(mods[n].in_features, torch.device("cpu"), hessian=True) for n in names}
    hooks = [mods[n].register_forward_hook(lambda m, a, o, n=n: stats[n].add(a[0])) for n in names]
    with torch.no_grad():
        for batch in data:
            out(batch)
    for h in hooks:
        h.remove()
    for n in names:  # recompute each layer's pruning from the final model's inputs
        w = originals[n].weight.detach()
        w = w.T if isinstance(originals[n], Conv1D) else w
        expect = wanda(w, stats[n]) if method == "wanda" else sparsegpt(w, stats[n].hessian())
        torch.testing.assert_close(mods[n].dense_weight(), expect, rtol=1e-4, atol=1e-5, msg=n)


def test_data_methods_beat_magnitude_on_layer_outputs():
    model = tiny("llama")
    with torch.no_grad():  # LLM-like activations: channels of very different scale
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(torch.randn(64).mul(0.8).exp())
    data = calib(n=8, length=32)
    block0 = [n for n, m in model.named_modules() if is_layer(m) and n.startswith("model.layers.0.")]
    inputs = {n: [] for n in block0}
    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_hook(lambda m, a, o, n=n: inputs[n].append(a[0])) for n in block0]
    with torch.no_grad():
        for batch in data:
            model(batch)
    for h in hooks:
        h.remove()
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        out = sparsify(copy.deepcopy(model), method, calibration=data, fallback="never", **QUIET)
        new = dict(out.named_modules())
        errors[method] = {}
        for n in block0:  # block 0's dense-model inputs are what every method saw for it
            x = torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs[n]])
            ref = x @ mods[n].weight.T
            errors[method][n] = float((x @ new[n].dense_weight().T - ref).norm() / ref.norm())
    for method in ("wanda", "sparsegpt"):
        wins = sum(errors[method][n] < errors["magnitude"][n] for n in block0)
        assert wins == len(block0), (method, errors)
        assert sum(errors[method].values()) < 0.9 * sum(errors["magnitude"].values())
    assert sum(errors["sparsegpt"].values()) < sum(errors["wanda"].values())


def test_model_without_blocks_calibrates_all_layers_at_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    data = [torch.randn(4, 32) for _ in range(4)]
    out = sparsify(copy.deepcopy(model), "sparsegpt", calibration=data, fallback="never", **QUIET)
    rep = report(out)
    assert rep.names("sparse") == ["0", "2"] and "at once" in rep.calibration
    assert all(isinstance(out[i], SparseLinear) for i in (0, 2))
    assert all(r.rel_error is not None for r in rep.layers)


# -- calibration inputs ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_data_methods_reject_missing_calibration(method):
    model = tiny("llama")
    with pytest.raises(ValueError, match="needs calibration data"):
        sparsify(model, method, **QUIET)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())


class ToyTokenizer:
    """Maps characters to ids (enough for calibration strings)."""

    def __call__(self, text, return_tensors=None):
        return {"input_ids": torch.tensor([[3 + ord(c) % 120 for c in text]])}


def test_strings_need_a_tokenizer_and_work_with_one():
    model = tiny("llama")
    texts = ["the quick brown fox jumps over the lazy dog", "a tiny model is calibrated on strings"]
    with pytest.raises(ValueError, match="tokenizer="):
        sparsify(copy.deepcopy(model), "wanda", calibration=texts, **QUIET)
    out = sparsify(model, "wanda", calibration=texts, tokenizer=ToyTokenizer(), fallback="never", **QUIET)
    assert "2 batches" in report(out).calibration


def test_calibration_forms_bxl_tensor_and_dicts():
    model = tiny("llama")
    batch = torch.randint(3, 128, (3, 16))
    a = sparsify(copy.deepcopy(model), "sparsegpt", calibration=[batch], fallback="never", **QUIET)
    b = sparsify(
        copy.deepcopy(model),
        "sparsegpt",
        calibration=[{"input_ids": batch, "attention_mask": torch.ones_like(batch)}],
        fallback="never",
        **QUIET,
    )
    wa, wb = (m.model.layers[1].mlp.down_proj.dense_weight() for m in (a, b))
    torch.testing.assert_close(wa, wb)


def test_text_windows():
    windows = text_windows("abcdefghij" * 20, ToyTokenizer(), n=5, seq_len=16, seed=3)
    assert len(windows) == 5 and all(w.shape == (1, 16) for w in windows)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        text_windows("short", ToyTokenizer(), seq_len=16)


# -- selection -----------------------------------------------------------------------------------


def test_filter_fn_and_patterns_are_obeyed():
    model = tiny("llama")
    out = sparsify(copy.deepcopy(model), fallback="never", filter_fn=lambda m, n: ".mlp." in n, **QUIET)
    assert sorted(sparse_names(out)) == sorted(n for n in expected_layers(model) if ".mlp." in n)
    assert isinstance(out.model.layers[0].self_attn.q_proj, nn.Linear)
    skipped = {r.name: r.reason for r in report(out).layers if r.action == "skipped"}
    assert skipped["model.layers.0.self_attn.q_proj"] == "rejected by filter_fn"

    out = sparsify(copy.deepcopy(model), fallback="never", exclude=["q_proj", "model.layers.1.mlp.*"], **QUIET)
    names = sparse_names(out)
    assert not any(n.endswith("q_proj") or n.startswith("model.layers.1.mlp.") for n in names)
    assert "model.layers.0.mlp.down_proj" in names and "model.layers.1.self_attn.k_proj" in names
    assert torch.equal(out.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)

    out = sparsify(copy.deepcopy(model), fallback="never", include=["down_proj", "lm_head"], **QUIET)
    assert sorted(sparse_names(out)) == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_conv1d_orientation():
    model = tiny("gpt2")
    conv = model.transformer.h[0].mlp.c_fc  # Conv1D(weight 64 x 256): y = x @ W + b
    assert tuple(conv.weight.shape) == (64, 256)
    out = sparsify(copy.deepcopy(model), fallback="never", **QUIET)
    new = out.transformer.h[0].mlp.c_fc
    assert (new.in_features, new.out_features) == (64, 256)
    assert torch.equal(new.dense_weight(), sf.prune_2_4(conv.weight.detach().T))
    assert torch.equal(new.bias, conv.bias)
    x = torch.randn(3, 5, 64)
    pruned = copy.deepcopy(conv)
    set_weight(pruned, sf.prune_2_4(conv.weight.detach().T))
    torch.testing.assert_close(new(x), pruned(x), rtol=1e-5, atol=1e-6)
    row = next(r for r in report(out).layers if r.name == "transformer.h.0.mlp.c_fc")
    assert row.kind == "Conv1D" and row.shape == (256, 64)


def test_layers_that_cannot_be_2_4_are_skipped_with_reason():
    model = nn.Sequential(nn.Linear(30, 16), nn.Linear(16, 8))
    out = sparsify(model, fallback="never", **QUIET)
    rows = {r.name: r for r in report(out).layers}
    assert rows["0"].action == "skipped" and "multiple of 4" in rows["0"].reason
    assert rows["1"].action == "sparse" and isinstance(out[1], SparseLinear)


# -- tied weights --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "gemma", "opt"])
def test_tied_embeddings_stay_tied(arch):
    model = tiny(arch)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    expected = expected_layers(model)
    out = sparsify(model, fallback="never", filter_fn=lambda m, n: True, **QUIET)  # even when selected
    assert out.get_output_embeddings().weight is out.get_input_embeddings().weight
    row = next(r for r in report(out).layers if r.name == "lm_head")
    assert row.action == "skipped" and "tied to an embedding" in row.reason
    assert sorted(sparse_names(out)) == expected


class SharedPair(nn.Module):
    """Two Linears sharing one weight (different biases)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 32)
        self.b.weight = self.a.weight
        self.c = nn.Linear(32, 8)

    def forward(self, x):
        return self.c(self.b(torch.relu(self.a(x))))


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_shared_weights_stay_shared(method):
    torch.manual_seed(0)
    model = SharedPair()
    data = [torch.randn(8, 32) for _ in range(3)]
    ref = copy.deepcopy(model)
    out = sparsify(model, method, calibration=data, fallback="never", **QUIET)
    assert isinstance(out.a, SparseLinear) and isinstance(out.b, SparseLinear)
    assert out.a.weight_values is out.b.weight_values and out.a.weight_meta is out.b.weight_meta
    assert not torch.equal(out.a.bias, out.b.bias)
    w = out.a.dense_weight()
    if method == "magnitude":
        assert torch.equal(w, sf.prune_2_4(ref.a.weight.detach()))
    with torch.no_grad():
        ref.a.weight.copy_(w)
        ref.c.weight.copy_(out.c.dense_weight())
        x = torch.randn(4, 32)
        torch.testing.assert_close(out(x), ref(x), rtol=1e-5, atol=1e-6)


# -- fallback ------------------------------------------------------------------------------------


def test_fallback_auto_without_gpu_keeps_every_layer_the_kernels_take():
    """No GPU to measure on: every kernel-aligned layer stays sparse, however small (the serving
    GPU decides per shape later); only shapes the kernels cannot take fall back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2048, 2048), nn.Linear(2048, 64), nn.Linear(64, 48))
    w2 = model[2].weight.detach().clone()
    out = sparsify(model, **QUIET)  # fallback="auto"
    rows = {r.name: r for r in report(out).layers}
    assert rows["0"].action == "sparse" and isinstance(out[0], SparseLinear)
    assert rows["1"].action == "sparse" and isinstance(out[1], SparseLinear) and "no GPU" in rows["1"].reason
    assert rows["2"].action == "dense-fallback" and "multiple of 32" in rows["2"].reason
    assert type(out[2]) is nn.Linear and torch.equal(out[2].weight, w2)  # unpruned: no quality lost
    assert walker.shape_rule(4096, 4096)[0] and walker.shape_rule(64, 64)[0] and not walker.shape_rule(4096, 4100)[0]


def test_fallback_auto_without_gpu_converts_a_small_model():
    model = tiny("llama")
    out = sparsify(model, "sparsegpt", calibration=calib(), **QUIET)
    assert report(out).counts() == {"sparse": 14, "dense-fallback": 0, "skipped": 1}
    assert len([m for m in out.modules() if isinstance(m, SparseLinear)]) == 14


def test_fallback_that_would_convert_nothing_refuses_and_changes_nothing():
    model = tiny("llama", hidden_size=48, intermediate_size=96, num_attention_heads=4)  # 48: no kernel takes it
    before = {n: (type(m), m.weight.detach().clone()) for n, m in model.named_modules() if is_layer(m)}
    with pytest.raises(SparsifyError, match="nothing would be converted.*fallback='never'") as err:
        sparsify(model, "sparsegpt", calibration=calib(), **QUIET)
    assert err.value.converted == []
    for n, m in model.named_modules():
        if n in before:
            assert type(m) is before[n][0] and torch.equal(m.weight, before[n][1])
    out = sparsify(model, fallback="never", **QUIET)  # the way out the message names
    assert report(out).counts()["sparse"] == 14


def test_model_without_convertible_layers_warns():
    model = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8), nn.Linear(6, 5))  # in_features 6: not a multiple of 4
    with pytest.warns(RuntimeWarning, match="no layer that can be converted"):
        out = sparsify(model, **QUIET)
    assert out is model and report(out).counts() == {"sparse": 0, "dense-fallback": 0, "skipped": 1}
    with pytest.warns(RuntimeWarning, match="no layer that can be converted"):
        sparsify(nn.Sequential(nn.ReLU()), **QUIET)


def test_non_module_is_a_type_error():
    with pytest.raises(TypeError, match=r"expected an nn.Module, got str \(load it first"):
        sparsify("gpt2")
    with pytest.raises(TypeError, match="expected an nn.Module, got dict"):
        sf.sparsify({"weight": torch.zeros(4, 4)})


@pytest.mark.parametrize("memory", ["fast", "compact"])
def test_fallback_measured_on_gpu_uses_the_dispatcher(monkeypatch, memory):
    """The GPU branch, with the measurement faked: sparse only where faster at every expected M
    (compact: the kernel the layer would keep, here cuSPARSELt, the only one timed)."""
    timings = {(4096, 4096): {16: 1.2, 2048: 1.5}, (1024, 4096): {16: 0.8, 2048: 1.3}}

    def decide(weight, m, only=None):
        s = timings[weight.shape][m]
        return Decision("cusparselt" if s >= 1 else "dense", sparse_ms=1.0, dense_ms=s, measured=True)

    monkeypatch.setattr(walker, "sparse_unavailable_reason", lambda device: None)
    monkeypatch.setattr(walker, "_probe_weight", lambda n, k, dtype, device: sf.compress_2_4(torch.zeros(n, k)))
    monkeypatch.setattr(walker, "default_resident", lambda w: "cusparselt")
    monkeypatch.setattr(walker.DISPATCHER, "decide", decide)
    model = nn.Sequential(nn.Linear(4096, 4096), nn.Linear(4096, 1024), nn.Linear(4096, 4096)).half()
    targets = walker.collect_targets(model)
    walker.decide_fallback(targets, "auto", (16, 2048), 1.0, device=torch.device("cuda"), memory=memory)
    got = {t.name: (t.action, t.speedup) for t in targets}
    assert got["0"] == ("sparse", {16: 1.2, 2048: 1.5}) and got["2"][0] == "sparse"
    assert got["1"] == ("dense-fallback", {16: 0.8, 2048: 1.3})
    # the reason names the shape, as the no-GPU rule's do (the CLI's refusal quotes it after the layer name)
    assert targets[1].reason == "1024x4096: 2:4 measured slower than dense at M=[16]"
    targets = walker.collect_targets(model)
    walker.decide_fallback(targets, "auto", (2048,), 1.0, device=torch.device("cuda"))
    assert all(t.action == "sparse" for t in targets)
    targets = walker.collect_targets(model.float())
    walker.decide_fallback(targets, "auto", (2048,), 1.0, device=torch.device("cuda"))
    assert all(t.action == "dense-fallback" and "no 2:4 tensor-core path" in t.reason for t in targets)
    assert targets[1].reason.startswith("1024x4096: torch.float32 has no 2:4")


def test_compact_fallback_judges_the_kernel_the_layer_would_keep(monkeypatch):
    """cuSPARSELt 1.5x, CUTLASS (the kept layout) 0.9x: fast mode converts, compact keeps it dense."""
    monkeypatch.setattr(walker, "sparse_unavailable_reason", lambda device: None)
    monkeypatch.setattr(walker, "_probe_weight", lambda n, k, dtype, device: sf.compress_2_4(torch.zeros(n, k)))
    monkeypatch.setattr(walker, "default_resident", lambda w: "cutlass")
    monkeypatch.setattr(
        walker.DISPATCHER,
        "decide",
        lambda w, m, only=None: Decision(
            "cusparselt", sparse_ms=1.0, cutlass_ms=1.5 / 0.9, dense_ms=1.5, measured=True
        ),
    )
    model = nn.Sequential(nn.Linear(4096, 4096)).half()
    fast = walker.collect_targets(model)
    walker.decide_fallback(fast, "auto", (2048,), 1.0, device=torch.device("cuda"), memory="fast")
    compact = walker.collect_targets(model)
    walker.decide_fallback(compact, "auto", (2048,), 1.0, device=torch.device("cuda"), memory="compact")
    assert fast[0].action == "sparse" and fast[0].speedup == {2048: pytest.approx(1.5)}
    assert compact[0].action == "dense-fallback" and compact[0].speedup == {2048: pytest.approx(0.9)}


# -- dtypes, modes, devices ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_half_precision_models(dtype, method):
    model = tiny("llama", dtype=dtype)
    out = sparsify(copy.deepcopy(model), method, calibration=calib(), fallback="never", **QUIET)
    mods = dict(out.named_modules())
    weights = {n: mods[n].dense_weight() for n in sparse_names(out)}
    assert all(mods[n].weight_values.dtype == dtype and sf.is_2_4(w) for n, w in weights.items())
    if method == "magnitude":
        for n, w in weights.items():
            assert torch.equal(w, sf.prune_2_4(dict(model.named_modules())[n].weight.detach()))
    ref = hand_pruned(model, weights, weights)
    with torch.no_grad():
        got, want = out(PROMPT).logits, ref(PROMPT).logits
    assert got.dtype == dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_leaves_model_in_eval_mode():
    model = tiny("gpt2").train()
    assert not sparsify(model, fallback="never", **QUIET).training


def test_device_option_on_cpu_gives_the_same_result():
    model = tiny("llama")
    a = sparsify(copy.deepcopy(model), "wanda", calibration=calib(), fallback="never", **QUIET)
    b = sparsify(copy.deepcopy(model), "wanda", calibration=calib(), fallback="never", device="cpu", **QUIET)
    assert torch.equal(a.model.layers[1].mlp.up_proj.dense_weight(), b.model.layers[1].mlp.up_proj.dense_weight())


def test_accelerate_dispatched_model_keeps_its_hooks():
    from accelerate import dispatch_model

    model = tiny("llama")
    ref = hand_pruned(model, expected_layers(model))
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1.self_attn": "cpu",
        "model.layers.1.mlp.gate_proj": "cpu",  # hooks on single linears too
        "model.layers.1.mlp.up_proj": "cpu",
        "model.layers.1.mlp.down_proj": "cpu",
        "model.layers.1.mlp.act_fn": "cpu",
        "model.layers.1.input_layernorm": "cpu",
        "model.layers.1.post_attention_layernorm": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    model = dispatch_model(model, device_map=device_map, force_hooks=True)
    assert hasattr(model.model.layers[1].mlp.down_proj, "_hf_hook")
    out = sparsify(model, "magnitude", fallback="never", **QUIET)
    new = out.model.layers[1].mlp.down_proj
    assert isinstance(new, SparseLinear) and hasattr(new, "_hf_hook")
    with torch.no_grad():
        torch.testing.assert_close(out(PROMPT).logits, ref(PROMPT).logits, rtol=1e-5, atol=1e-5)
    out2 = sparsify(
        dispatch_model(tiny("llama"), device_map=device_map, force_hooks=True),
        "sparsegpt",
        calibration=calib(),
        fallback="never",
        **QUIET,
    )
    assert len(sparse_names(out2)) == 14 and "sequential" in report(out2).calibration


# -- failures ------------------------------------------------------------------------------------


def _fail_on_call(monkeypatch, module, name, n):
    real = getattr(module, name)
    calls = {"n": 0}

    def wrapped(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("injected failure")
        return real(*a, **k)

    monkeypatch.setattr(module, name, wrapped)


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_failure_midway_restores_the_model(monkeypatch, method):
    model = tiny("llama")
    before = dict(model.named_modules())
    weights = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with torch.no_grad():
        logits = model(PROMPT).logits
    _fail_on_call(monkeypatch, api, "build_sparse", 10)  # in block 1, after block 0 was swapped
    with pytest.raises(SparsifyError, match="injected failure.*restored: no layer was changed") as info:
        sparsify(model, method, calibration=calib(), fallback="never", **QUIET)
    assert info.value.converted == []
    assert dict(model.named_modules()).keys() == before.keys()
    assert all(m is before[n] for n, m in model.named_modules())
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    assert all(torch.equal(p, weights[n]) for n, p in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, logits)
    with pytest.raises(ValueError, match="has not been through"):
        report(model)
    for n, m in model.named_modules():  # no hook or patched forward left behind
        assert not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__, n


def test_failure_without_rollback_reports_exactly_what_changed(monkeypatch):
    model = tiny("llama")
    block0 = [n for n in expected_layers(model) if n.startswith("model.layers.0.")]
    _fail_on_call(monkeypatch, api, "sparsegpt", 10)  # block 1's third weight group
    with pytest.raises(SparsifyError, match="stay converted") as info:
        sparsify(model, "sparsegpt", calibration=calib(), fallback="never", rollback=False, **QUIET)
    converted = sorted(info.value.converted)
    assert converted == block0
    for n, m in model.named_modules():
        if is_layer(m) or isinstance(m, SparseLinear):
            assert isinstance(m, SparseLinear) == (n in converted), n
    with torch.no_grad():
        assert torch.isfinite(model(PROMPT).logits).all()  # consistent: every layer whole


# -- report and options --------------------------------------------------------------------------


def test_quiet_by_default_verbose_prints_the_table(capsys):
    sparsify(tiny("llama"), progress=False)
    assert capsys.readouterr().out == ""
    out = sparsify(tiny("llama"), progress=False, verbose=True)
    assert report(out).table() in capsys.readouterr().out


def test_report_contents(capsys):
    model = tiny("gpt2")
    out = sparsify(model, "sparsegpt", calibration=calib(), fallback="never", progress=False, verbose=True)
    printed = capsys.readouterr().out
    rep = report(out)
    assert rep.method == "sparsegpt" and rep.fallback == "never" and rep.seconds > 0
    assert rep.counts() == {"sparse": 8, "dense-fallback": 0, "skipped": 1}
    names = [r.name for r in rep.layers]
    assert sorted(names) == sorted(n for n, m in tiny("gpt2").named_modules() if is_layer(m))
    row = next(r for r in rep.layers if r.name == "transformer.h.1.attn.c_attn")
    assert (row.kind, row.shape, row.action, row.speedup) == ("Conv1D", (192, 64), "sparse", None)
    assert 0 < row.rel_error < 1
    data = json.loads(json.dumps(rep.to_dict()))
    assert data["counts"]["sparse"] == 8 and len(data["layers"]) == 9
    for text in (printed, rep.table()):
        assert "transformer.h.1.attn.c_attn" in text and "192x64" in text and "8 sparse" in text


def test_bad_options():
    model = tiny("llama")
    with pytest.raises(ValueError, match="method must be one of"):
        sparsify(model, "random", **QUIET)
    with pytest.raises(ValueError, match="fallback must be"):
        sparsify(model, fallback="sometimes", **QUIET)
    with pytest.raises(TypeError, match="unknown option"):
        sparsify(model, blocksz=64, **QUIET)
    with pytest.raises(TypeError, match="list of name patterns"):
        sparsify(model, exclude="lm_head", **QUIET)


def test_progress_bar_and_no_warnings_about_caches(capsys):
    model = tiny("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        sparsify(model, "wanda", calibration=calib(), fallback="never", verbose=False)
    assert "sparsify[wanda]" in capsys.readouterr().err


def test_calibration_never_runs_sparse_linear_forward(monkeypatch):
    """Second passes use the pruned dense weight, so calibrating on a GPU builds no sparse plans
    or dense caches; the SparseLinear modules appear only once their block is done."""

    def forbidden(self, x):
        raise AssertionError("SparseLinear.forward ran during calibration")

    model = tiny("llama")
    monkeypatch.setattr(SparseLinear, "forward", forbidden)
    out = sparsify(model, "sparsegpt", calibration=calib(), fallback="never", **QUIET)
    assert len(sparse_names(out)) == 14
    assert all(r.rel_error is not None for r in report(out).layers if r.action == "sparse")
