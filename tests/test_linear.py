import io

import pytest
import torch
from torch import nn

import sparseflow as sf
from sparseflow.nn import SparseLinear
from tests.conftest import TOL, random_2_4, rel_err


def _pruned_linear(k=64, n=32, bias=True, dtype=torch.float32):
    lin = nn.Linear(k, n, bias=bias).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(random_2_4(n, k, dtype))
    return lin


@pytest.mark.parametrize("bias", [True, False])
def test_from_dense_matches_linear(bias):
    lin = _pruned_linear(bias=bias)
    sl = SparseLinear.from_dense(lin)
    x = torch.randn(4, 7, 64)
    ref = nn.functional.linear(x.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double())
    assert rel_err(sl(x), ref) < 1e-6
    assert (sl.bias is None) == (not bias)
    assert torch.equal(sl.dense_weight(), lin.weight.detach())


def test_from_dense_prune():
    lin = nn.Linear(64, 32)
    with pytest.raises(ValueError, match="2:4"):
        SparseLinear.from_dense(lin)
    sl = SparseLinear.from_dense(lin, prune=True)
    assert torch.equal(sl.dense_weight(), sf.prune_2_4(lin.weight.detach()))


def test_state_dict_round_trip_and_contents():
    sl = SparseLinear.from_dense(_pruned_linear(), backend="auto")
    sd = sl.state_dict()
    assert set(sd) == {"weight_values", "weight_meta", "bias"}
    buf = io.BytesIO()
    torch.save(sd, buf)
    fresh = SparseLinear(64, 32)
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    x = torch.randn(5, 64)
    assert torch.equal(fresh(x), sl(x))
    assert torch.equal(fresh.dense_weight(), sl.dense_weight())


def test_load_state_dict_rejects_wrong_shapes():
    sl = SparseLinear.from_dense(_pruned_linear())
    with pytest.raises(RuntimeError, match="size mismatch"):
        SparseLinear(128, 32).load_state_dict(sl.state_dict())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_to_dtype_moves_values_keeps_meta(dtype):
    lin = _pruned_linear()
    sl = SparseLinear.from_dense(lin).to(dtype)
    assert sl.weight_values.dtype == dtype and sl.weight_meta.dtype == torch.uint8 and sl.bias.dtype == dtype
    x = torch.randn(3, 64)
    ref = x.double() @ lin.weight.double().T + lin.bias.double()
    assert rel_err(sl(x.to(dtype)), ref) < 3 * TOL[dtype]


def test_weight_bytes_at_most_0_5625_of_dense_fp16():
    sl = SparseLinear.from_dense(_pruned_linear(k=4096, n=128, dtype=torch.float16))
    assert sl.weight_nbytes <= 0.5625 * 128 * 4096 * 2


def test_bad_construction():
    with pytest.raises(ValueError, match="multiple of 4"):
        SparseLinear(30, 8)
    with pytest.raises(ValueError, match="backend"):
        SparseLinear(32, 8, backend="turbo")
    with pytest.raises(TypeError, match="nn.Linear"):
        SparseLinear.from_dense(nn.Conv1d(4, 4, 1))


def test_forward_bad_input():
    sl = SparseLinear.from_dense(_pruned_linear())
    with pytest.raises(ValueError, match="K=64"):
        sl(torch.randn(3, 63))
    with pytest.raises(TypeError, match="dtype mismatch"):
        sl(torch.randn(3, 64, dtype=torch.float64))


def test_dispatch_info_on_cpu_is_empty():
    assert SparseLinear.from_dense(_pruned_linear()).dispatch_info() == []


def test_no_bias_module_constructed_directly():
    sl = SparseLinear(64, 32, bias=False)
    assert sl.bias is None and "bias" not in sl.state_dict()
    sl.load_state_dict(SparseLinear.from_dense(_pruned_linear(bias=False)).state_dict())
    assert sl(torch.randn(2, 64)).shape == (2, 32)


@pytest.mark.parametrize("backend", ["sparse", "decode", "cusparselt"])
def test_forced_gpu_backend_on_cpu_is_the_same_error_for_module_and_function(backend):
    lin = nn.Linear(64, 32)
    layer = SparseLinear.from_dense(lin, prune=True, backend=backend)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        layer(x)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        sf.sparse_mm(x, layer.weight_2_4, backend=backend)
    layer.backend = "auto"  # the reference path serves auto on the CPU
    layer._route = None
    assert rel_err(layer(x), nn.functional.linear(x, layer.dense_weight(), layer.bias)) < TOL[torch.float32]


def test_backend_can_be_changed_after_a_forward():
    layer = SparseLinear.from_dense(torch.nn.Linear(64, 32), prune=True)
    x = torch.randn(3, 64)
    layer(x)
    assert layer._route is not None
    layer.backend = "dense"  # e.g. on every layer of a model; must not be ignored by a cached route
    assert layer._route is None and layer.backend == "dense"
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight_2_4.decompress(), layer.bias))
    with pytest.raises(ValueError, match="backend must be one of"):
        layer.backend = "fastest"
    assert layer.backend == "dense"
