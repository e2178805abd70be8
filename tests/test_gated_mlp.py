"""SparseGatedMLP: SwiGLU MLPs with 2:4 gate/up run as one fused decode kernel at small M."""

import copy

import pytest
import torch
import transformers as T

import sparseflow as sf
from sparseflow._ext import _C
from sparseflow.nn import SparseGatedMLP, SparseLinear, fuse_gated_mlps
from tests.conftest import TOL, rel_err

needs_ext = pytest.mark.skipif(_C is None or not torch.cuda.is_available(), reason="needs the CUDA extension and a GPU")


def _llama(dtype=torch.float32, hidden=64, inter=128, mlp_bias=False):
    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mlp_bias=mlp_bias,
    )
    return T.LlamaForCausalLM._from_config(cfg, dtype=dtype).eval()


def _phi3(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = T.Phi3Config(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    return T.Phi3ForCausalLM._from_config(cfg, dtype=dtype).eval()


@pytest.mark.parametrize("build", [_llama, _phi3])
def test_sparsify_fuses_swiglu_mlps_without_changing_results_or_keys(build):
    ids = torch.randint(0, 64, (2, 7))
    plain = sf.sparsify(build(), fallback="never", progress=False, verbose=False, fuse_mlp=False)
    fused = sf.sparsify(build(), fallback="never", progress=False, verbose=False)
    mlps = [m for m in fused.modules() if isinstance(m, SparseGatedMLP)]
    assert len(mlps) == 2 and not any(isinstance(m, SparseGatedMLP) for m in plain.modules())
    assert list(fused.state_dict()) == list(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(fused(ids).logits, plain(ids).logits)
    assert fuse_gated_mlps(fused) == 0  # idempotent


def test_gelu_mlps_and_dense_gates_are_left_alone():
    model = _llama()
    model.model.layers[0].mlp.act_fn = torch.nn.GELU()
    sf.sparsify(model, fallback="never", progress=False, verbose=False, exclude=["layers.1.mlp.up_proj"])
    assert not any(isinstance(m, SparseGatedMLP) for m in model.modules())


def test_fused_checkpoint_round_trip(tmp_path):
    model = sf.sparsify(_llama(), fallback="never", progress=False, verbose=False)
    sf.save_pretrained(model, tmp_path)
    back = sf.from_pretrained(tmp_path)
    assert sum(isinstance(m, SparseGatedMLP) for m in back.modules()) == 2
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


@needs_ext
@pytest.mark.parametrize("memory", ["fast", "compact"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("build", ["llama", "llama-bias", "phi3"])
def test_fused_path_on_gpu_matches_unfused(dtype, build, memory):
    if build == "phi3":
        model = _phi3(dtype)
    else:
        model = _llama(dtype, hidden=512, inter=1376, mlp_bias=build == "llama-bias")
    model = model.cuda()
    ref = copy.deepcopy(model)
    sf.sparsify(ref, fallback="never", progress=False, verbose=False, fuse_mlp=False)
    sf.sparsify(model, fallback="never", progress=False, verbose=False)
    sf.set_memory(model, memory)
    # same pruned weights in both
    ref.load_state_dict(model.state_dict())
    mlp = next(m for m in model.modules() if isinstance(m, SparseGatedMLP))
    k = model.config.hidden_size
    for m in (1, 5, 16, 64, 200):
        x = torch.randn(1, m, k, device="cuda", dtype=dtype)
        ref_mlp = ref.get_submodule("model.layers.0.mlp")
        with torch.no_grad():
            want = ref_mlp(x)
            got = mlp(x)
        assert rel_err(got, want) < 2 * TOL[dtype], f"M={m}"
    choice = sf.DISPATCHER.decide(mlp._projections()[0].weight_2_4, 1).choice
    # the fused layout is a second copy of gate/up: fast mode only
    assert (mlp._fused is not None) == (memory == "fast" and choice == "decode")


@needs_ext
@pytest.mark.parametrize("memory", ["fast", "compact"])
def test_decode_step_of_fused_model_captures_in_a_cuda_graph(memory):
    model = _llama(torch.float16, hidden=512, inter=1376).cuda()
    sf.sparsify(model, fallback="never", progress=False, verbose=False)
    sf.set_memory(model, memory)
    mlp = next(m for m in model.modules() if isinstance(m, SparseGatedMLP))
    x = torch.randn(4, 1, 512, device="cuda", dtype=torch.float16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(s):
        for _ in range(2):
            mlp(x)  # warm-up outside capture: decisions, packed layouts
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            y = mlp(x)
    torch.cuda.current_stream().wait_stream(s)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    with torch.no_grad():
        want = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
    assert rel_err(y, want) < 2 * TOL[torch.float16]
    assert all(isinstance(getattr(mlp, n), SparseLinear) for n in ("gate_proj", "up_proj", "down_proj"))
