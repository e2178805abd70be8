"""q/k/v and gate/up fused into one 2:4 layer each (``sparseflow.nn.projections``).

On the CPU a group is built by hand (``refusal`` patched: it fuses only in the compact mode on a
GPU) and its fused layer keeps the dense kernel's layout, which runs on the CPU, the way a
compact layer keeps one layout on a GPU; the GPU test fuses as ``sparsify`` does."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import sparseflow as sf
from sparseflow.nn import ProjectionGroup, SparseLinear, fuse_projections
from tests.conftest import needs_cuda


def _keep_one_layout(layer: SparseLinear, kernel: str = "dense") -> None:
    w = layer.weight_2_4
    w.keep_only(kernel)
    layer._buffers["weight_values"], layer._buffers["weight_meta"] = w.values, w.meta


def _tiny(arch: str, device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    shape = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}
    common = {"num_hidden_layers": 2, "vocab_size": 512, "max_position_embeddings": 256}
    cfg, cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    model = cls(cfg(**shape, **common)).to(device=device, dtype=dtype).eval()
    sf.sparsify(model, method="magnitude", fallback="never", progress=False, verbose=False)
    return model


def _groups(model) -> list[ProjectionGroup]:
    found = {}
    for m in model.modules():
        g = m.__dict__.get("_group") if isinstance(m, SparseLinear) else None
        if g is not None:
            found[id(g)] = g
    return list(found.values())


def _fuse_on_cpu(model, monkeypatch) -> list[ProjectionGroup]:
    monkeypatch.setattr(ProjectionGroup, "refusal", lambda self: None)
    groups = _groups(model)
    for g in groups:
        assert g.build() is not None
        _keep_one_layout(g.fused)
    return groups


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # Qwen2: q/k/v with biases
def test_fused_projections_give_the_same_logits_and_state_dict(arch, monkeypatch):
    model = _tiny(arch)
    groups = _groups(model)
    # q/k/v and gate/up of each of the 2 layers; made by sparsify, fused only on a GPU
    assert len(groups) == 4 and all(g.fused is None for g in groups)
    assert sorted(g.rows for g in groups) == [512, 512, 1024, 1024]
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        before = {k: v.clone() for k, v in model.state_dict().items()}
        _fuse_on_cpu(model, monkeypatch)
        attn = model.model.layers[0].self_attn
        assert attn.k_proj.weight_values.shape == (attn.k_proj.out_features, 0)  # the members' forms are freed
        out = model(input_ids=ids).logits
        after = model.state_dict()
    torch.testing.assert_close(out, ref)
    assert after.keys() == before.keys()
    for key, t in before.items():  # each member's rows, read back from the fused layout
        assert torch.equal(after[key], t), key
    assert all(g._x is None and g._y is None for g in groups)  # no activation kept after a step
    assert "fused rows (0, 256) of 512" in repr(attn.q_proj)


def test_compiled_fused_model_has_no_graph_break(monkeypatch):
    """The first projection stores the fused output on the group, the others read it: dynamo
    traces this as one GEMM and three slices (fullgraph=True fails on a break)."""
    model = _tiny("llama")
    ids = torch.randint(0, 512, (2, 7))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        _fuse_on_cpu(model, monkeypatch)
        model(input_ids=ids)  # the fused layer's first call (on a GPU, make_resident's) checks its route eagerly
        out = torch.compile(model.forward, fullgraph=True, backend="aot_eager")(input_ids=ids).logits
    torch.testing.assert_close(out, ref)


def test_moving_loading_and_fast_mode_split_the_group(monkeypatch):
    model = _tiny("llama")
    ids = torch.randint(0, 512, (1, 5))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        state = {k: v.clone() for k, v in model.state_dict().items()}
        groups = _fuse_on_cpu(model, monkeypatch)
        model.to("cpu")  # nothing changes: the group stays fused
        assert all(g.fused is not None for g in groups)
        model.double()  # a new dtype: the members become plain layers again, converted
        assert all(g.fused is None for g in groups)
        q = model.model.layers[0].self_attn.q_proj
        assert q.weight_values.dtype == torch.float64 and q.weight_values.shape == (256, 128)
        model.float()
        torch.testing.assert_close(model(input_ids=ids).logits, ref)
        _fuse_on_cpu(model, monkeypatch)
        model.load_state_dict(state)  # loading splits first, then fills full-size buffers
        assert all(g.fused is None for g in groups)
        torch.testing.assert_close(model(input_ids=ids).logits, ref)
        _fuse_on_cpu(model, monkeypatch)
        sf.set_memory(model, "fast")
        assert all(g.fused is None for g in groups)
        torch.testing.assert_close(model(input_ids=ids).logits, ref)


def test_memory_bytes_share_the_fused_layout(monkeypatch):
    model = _tiny("llama")
    g = next(g for g in _fuse_on_cpu(model, monkeypatch) if len(g.members) == 3)
    total = g.fused.memory_bytes()["total"]
    shares = [p.memory_bytes()["total"] for p in g.members]
    assert total > 0 and abs(sum(shares) - total) <= len(shares)
    assert [p.weight_nbytes for p in g.members] == [
        SparseLinear(256, n, bias=False).weight_nbytes for n in (256, 128, 128)
    ]


def test_fuse_projections_refuses_what_is_not_a_module():
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        fuse_projections({"q_proj": None})


def test_fuse_projections_takes_only_three_2_4_layers_of_one_width():
    class Attn(nn.Module):
        def __init__(self, v_dense: bool) -> None:
            super().__init__()
            self.q_proj = SparseLinear.from_dense(nn.Linear(64, 64), prune=True)
            self.k_proj = SparseLinear.from_dense(nn.Linear(64, 32), prune=True)
            self.v_proj = nn.Linear(64, 32) if v_dense else SparseLinear.from_dense(nn.Linear(64, 32), prune=True)

    model = nn.Sequential(Attn(False), Attn(True))
    assert fuse_projections(model) == 1
    assert fuse_projections(model) == 0  # already grouped
    g = model[0].q_proj.__dict__["_group"]
    assert g.rows == 128 and g.refusal() == "the members are not on a GPU"
    assert "_group" not in model[1].q_proj.__dict__

    class EncDec(nn.Sequential):
        config = type("Cfg", (), {"is_encoder_decoder": True})()

    assert fuse_projections(EncDec(Attn(False))) == 0  # cross-attention feeds k/v another input


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_sparsify_fuses_qkv_into_one_layout(dtype):
    """On a GPU in the compact mode ``sparsify`` builds the groups: one layout for q/k/v (and one
    for gate/up), the
    members' portable buffers empty, the logits those of the unfused layers, and a state_dict
    that loads into an unfused copy."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=512,
        intermediate_size=1024,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=512,
    )
    dense = LlamaForCausalLM(cfg).to("cuda", dtype).eval()
    plain = LlamaForCausalLM(cfg).to("cuda", dtype).eval()
    plain.load_state_dict(dense.state_dict())
    sf.sparsify(dense, fallback="never", progress=False)
    sf.sparsify(plain, fallback="never", progress=False, fuse_projections=False, memory="fast")
    attn = dense.model.layers[0].self_attn
    g = attn.q_proj.__dict__["_group"]
    assert g.fused is not None and g.fused.resident is not None
    assert attn.q_proj.resident == g.fused.resident and attn.v_proj.weight_values.numel() == 0
    gate_up = dense.model.layers[0].mlp.gate_proj.__dict__["_group"]
    assert gate_up.fused is not None and gate_up.rows == 2 * cfg.intermediate_size
    ids = torch.randint(0, 512, (2, 37), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=2e-2, atol=2e-2)
    state = dense.state_dict()
    assert state["model.layers.0.self_attn.k_proj.weight_values"].device.type == "cpu"
    for key, t in plain.state_dict().items():
        if key.endswith(("weight_values", "weight_meta")):
            assert torch.equal(state[key], t.cpu()), key
