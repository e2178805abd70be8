"""One layout per weight (``memory="compact"``): the portable form freed and read back on demand.

On a GPU a compact layer keeps its kernel's layout only. The mechanics (read-back through the
kernel, the placeholders, state_dict/load/.to restoring the portable form) are the same for every
kernel, so they are checked here on the CPU with the dense kernel's layout, which runs anywhere;
``tests/test_gpu.py`` checks them with the 2:4 kernels.
"""

import pytest
import torch
import torch.nn.functional as F

import sparseflow as sf
from sparseflow.kernels import KERNELS
from sparseflow.kernels.readback import dense_columns, portable_from_layout
from sparseflow.nn import SparseLinear


def _weight(n=48, k=200, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return sf.prune_2_4(torch.randn(n, k, generator=g).to(dtype))


def _keep_dense_only(layer: SparseLinear) -> None:
    """What a compact layer's first GPU call does, with the dense kernel's layout (runs on CPU)."""
    w = layer.weight_2_4
    w.keep_only("dense")
    layer._buffers["weight_values"], layer._buffers["weight_meta"] = w.values, w.meta


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [8, 12, 200, 1028])
def test_readback_returns_the_weight_exactly(dtype, k):
    dense = _weight(40, k, dtype, seed=k)
    w = sf.compress_2_4(dense)
    layout = KERNELS["dense"].pack(w)
    cols = torch.cat([c for _, c in dense_columns(KERNELS["dense"], layout, 40, k, dtype, "cpu", chunk=64)], dim=1)
    assert torch.equal(cols, dense)
    values, meta = portable_from_layout(KERNELS["dense"], layout, (40, k), dtype, "cpu")
    assert torch.equal(values, w.values) and torch.equal(meta, w.meta)  # compress_2_4's canonical form


@pytest.mark.parametrize("rows", [(0, 8), (8, 30), (30, 40)])
def test_readback_of_a_row_range_is_those_rows_of_the_weight(rows):
    """A projection of a fused stack reads back its own rows only."""
    dense = _weight(40, 200, torch.float16, seed=3)
    w = sf.compress_2_4(dense)
    layout = KERNELS["dense"].pack(w)
    values, meta = portable_from_layout(KERNELS["dense"], layout, (40, 200), torch.float16, "cpu", rows=rows)
    a, b = rows
    assert values.shape == (b - a, 100) and torch.equal(values, w.values[a:b]) and torch.equal(meta, w.meta[a:b])


def test_keep_only_frees_the_portable_form_and_reads_it_back():
    dense = _weight()
    w = sf.compress_2_4(dense)
    values, meta = w.values.clone(), w.meta.clone()
    w.keep_only("dense")
    assert w.resident == "dense"
    assert w.values.numel() == 0 and w.meta.numel() == 0 and w.values.shape[0] == 48
    assert w.cached_layouts() == {("dense", None)}
    assert w.layout_bytes() == {"dense": 48 * 200 * 2}
    assert w.nbytes == 48 * 100 * 2 + 48 * 25  # the portable form's size, held or not
    got_v, got_m = w.portable()
    assert torch.equal(got_v, values) and torch.equal(got_m, meta)
    got_v, got_m = w.portable(rows=(5, 17))
    assert torch.equal(got_v, values[5:17]) and torch.equal(got_m, meta[5:17])
    with pytest.raises(ValueError, match="rows must be"):
        w.portable(rows=(17, 5))
    with pytest.raises(ValueError, match="rows must be"):
        w.portable(rows=(0, 49))
    assert torch.equal(w.decompress(), dense)
    assert torch.equal(w.indices(), sf.compress_2_4(dense).indices())
    w.validate()
    assert torch.equal(w.to(dtype=torch.float32).decompress(), dense.float())
    assert w.to("cpu") is w
    with pytest.raises(KeyError, match="unknown kernel .marlin.; one of"):
        w.keep_only("marlin")
    assert w.resident == "dense" and torch.equal(w.decompress(), dense)  # nothing lost


def test_compact_layer_state_dict_load_and_to_restore_the_portable_form():
    dense = _weight()
    bias = torch.randn(48).half()
    layer = SparseLinear.from_compressed(sf.compress_2_4(dense), bias)
    assert layer.memory == "compact"
    ref_sd = {k: v.clone() for k, v in layer.state_dict().items()}
    _keep_dense_only(layer)
    assert layer.resident == "dense"
    assert layer.memory_bytes()["portable"] == 0 and layer.memory_bytes()["total"] == 48 * 200 * 2

    sd = layer.state_dict()  # read back: the placeholders never reach a checkpoint
    assert sd.keys() == ref_sd.keys()
    for key, value in ref_sd.items():
        assert torch.equal(sd[key], value), key

    x = torch.randn(5, 200).half()
    want = F.linear(x.float(), dense.float(), bias.float()).half()
    torch.testing.assert_close(layer(x), want)  # the CPU path reads the weight back too

    other = SparseLinear.from_compressed(sf.compress_2_4(_weight(seed=1)), torch.zeros(48).half())
    _keep_dense_only(other)
    other.load_state_dict(sd)  # into a compact layer: its portable form is restored, then loaded
    assert other.resident is None and torch.equal(other.dense_weight(), dense)

    layer.float()  # a dtype change restores the portable form and converts it
    assert layer.resident is None and layer.weight_values.dtype == torch.float32
    assert torch.equal(layer.dense_weight(), dense.float())


def test_a_no_op_apply_keeps_the_one_layout():
    layer = SparseLinear.from_compressed(sf.compress_2_4(_weight()), torch.zeros(48).half())
    _keep_dense_only(layer)
    layer.to("cpu")
    layer.half()
    assert layer.resident == "dense" and layer.weight_values.numel() == 0
    assert list(dict(layer.named_buffers())) == ["weight_values", "weight_meta"]  # order kept


def test_memory_modes_are_checked_and_fast_restores():
    layer = SparseLinear.from_compressed(sf.compress_2_4(_weight()))
    with pytest.raises(ValueError, match="memory must be one of"):
        layer.memory = "small"
    with pytest.raises(ValueError, match="memory must be one of"):
        SparseLinear(8, 8, memory="tiny")
    with pytest.raises(ValueError, match="resident must be one of"):
        layer.resident = "marlin"
    _keep_dense_only(layer)
    layer.memory = "fast"
    assert layer.resident is None and layer.weight_values.shape == (48, 100)
    model = torch.nn.Sequential(layer, SparseLinear(48, 8))
    assert sf.set_memory(model, "compact") == 2 and layer.memory == "compact"


@pytest.mark.parametrize("fmt", ["sparseflow", "compressed-tensors"])
def test_a_compact_model_saves_and_loads_its_weights(tmp_path, fmt):
    from sparseflow.convert.checkpoint import from_pretrained, save_pretrained
    from tests.ckpt_helpers import inputs, outputs, sparse_names, sparsify, tiny

    model = sparsify(tiny("qwen2", dtype=torch.float16))
    want = outputs(model, inputs())
    for name in sparse_names(model):
        _keep_dense_only(model.get_submodule(name))
    assert all(model.get_submodule(n).weight_values.numel() == 0 for n in sparse_names(model))
    kwargs = {} if fmt == "sparseflow" else {"format": "compressed-tensors"}
    save_pretrained(model, tmp_path / "m", **kwargs)
    loaded = from_pretrained(tmp_path / "m")
    assert sparse_names(loaded) == sparse_names(model)
    assert torch.equal(outputs(loaded, inputs()), want)
    assert torch.equal(outputs(model, inputs()), want)  # the compact model still runs, unchanged


# -- on the GPU: the 2:4 kernels' own layouts ---------------------------------------------------
def _gpu():
    from sparseflow._ext import _C

    if not torch.cuda.is_available() or _C is None:
        pytest.skip("needs CUDA and the built extension")


def _ref(x, dense, bias):
    return F.linear(x.double(), dense.double(), None if bias is None else bias.double())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(1024, 2048), (96, 160)])  # CUTLASS takes the first; not the second (N % 64)
def test_gpu_compact_layer_holds_one_layout_at_every_m(dtype, n, k):
    from sparseflow.kernels.dispatch import default_resident
    from tests.conftest import TOL, rel_err

    _gpu()
    ms = (1, 16, 256, 4096, 333, 7)
    torch.manual_seed(n + k)
    # A first layer of this shape pays the process's one-time costs: the dispatcher's measurements
    # and the libraries' per-stream workspaces (cuBLAS keeps one per stream the timing used:
    # ~100 MB on an H200). What a layer holds is what a second one adds.
    first = SparseLinear.from_compressed(sf.compress_2_4(sf.prune_2_4(torch.randn(n, k, device="cuda", dtype=dtype))))
    for m in ms:
        first(torch.randn(m, k, device="cuda", dtype=dtype))
    dense = sf.prune_2_4(torch.randn(n, k, device="cuda", dtype=dtype))
    bias = torch.randn(n, device="cuda", dtype=dtype)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    layer = SparseLinear.from_compressed(sf.compress_2_4(dense), bias)
    portable = layer.weight_nbytes
    expected = default_resident(layer.weight_2_4)
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        junk = torch.empty(64 << 20, device="cuda", dtype=torch.float16).fill_(float("nan"))
        del junk  # an unwritten output element would show as NaN
        y = layer(x)
        assert rel_err(y, _ref(x, dense, bias)) < 2 * TOL[dtype], f"M={m}"
        mem = layer.memory_bytes()
        held = [name for name in ("portable", "cusparselt", "cutlass", "decode", "dense_fallback") if mem[name]]
        assert held == [{"dense": "dense_fallback"}.get(expected, expected)], (m, mem)
        assert layer.resident == expected
        assert {kernel for kernel, _ in layer.weight_2_4.cached_layouts()} == {expected}
        del x, y
    if expected != "dense":
        assert mem["total"] <= 1.05 * portable  # the compressed size (cuSPARSELt pads: 1.04x at 96 x 160)
    torch.cuda.synchronize()
    resident_bytes = torch.cuda.memory_allocated() - before
    # (+ the bias and, at most, one grown eager decode workspace)
    assert resident_bytes <= mem["total"] + bias.numel() * bias.element_size() + (8 << 20), resident_bytes

    sd = layer.state_dict()  # read back from the layout
    assert sd["weight_values"].device.type == "cpu"
    assert torch.equal(sf.Sparse24Weight(sd["weight_values"], sd["weight_meta"], (n, k)).decompress(), dense.cpu())
    x = torch.randn(5, k, device="cuda", dtype=dtype)
    y = layer(x)
    layer.cpu()
    assert layer.resident is None and layer.weight_values.shape == (n, k // 2)
    assert torch.equal(layer.dense_weight(), dense.cpu())
    layer.cuda()
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)
    assert layer.resident == expected


@pytest.mark.gpu
def test_gpu_fast_mode_keeps_today_s_layouts_and_autotune_picks_the_resident(tmp_path, monkeypatch):
    _gpu()
    monkeypatch.setenv("SPARSEFLOW_CACHE_DIR", str(tmp_path))
    sf.DISPATCHER.clear()
    dense = sf.prune_2_4(torch.randn(2048, 2048, device="cuda", dtype=torch.float16))
    fast = SparseLinear.from_compressed(sf.compress_2_4(dense), memory="fast")
    compact = SparseLinear.from_compressed(sf.compress_2_4(dense))
    model = torch.nn.Sequential(fast, compact)
    rows = sf.autotune(model, tokens=(1, 16, 700))
    assert {r["resident"] for r in rows} == {compact.__dict__["_pinned"]}
    resident = compact.__dict__["_pinned"]
    assert resident in ("cutlass", "cusparselt", "dense")
    x = torch.randn(700, 2048, device="cuda", dtype=torch.float16)
    torch.testing.assert_close(compact(x), fast(x), rtol=2e-3, atol=2e-3)
    assert compact.resident == resident and compact.memory_bytes()["portable"] == 0
    assert fast.resident is None and fast.memory_bytes()["portable"] == 2048 * 1024 * 2 + 2048 * 256
    fast.memory = "compact"
    fast(x)
    assert fast.resident is not None and fast.memory_bytes()["portable"] == 0
    compact.memory = "fast"
    assert compact.resident is None and torch.equal(compact.dense_weight(), dense)
    sf.DISPATCHER.clear()


def test_choose_resident_takes_the_best_geomean_and_dense_when_no_2_4_kernel_pays(monkeypatch):
    from sparseflow.kernels import KERNELS, dispatch
    from sparseflow.kernels.dispatch import Decision, choose_resident

    monkeypatch.setattr(dispatch, "cutlass_wanted", lambda w: True)
    for name in ("cutlass", "cusparselt"):
        monkeypatch.setattr(KERNELS[name], "refusal", lambda *a: None)
    w = sf.compress_2_4(_weight())

    def d(dense, cutlass, cslt, layout=4):  # times at the top of the bucket; no bottom timings
        return Decision("dense", dense_ms=dense, cutlass_ms=cutlass, sparse_ms=cslt, layout=layout)

    # CUTLASS: 2x, 1.25x, 0.8x -> geomean 1.17x; cuSPARSELt unmeasured at M = 1, 1.1x and 1.0x above
    mixed = {1: d(2.0, 1.0, None), 512: d(1.0, 0.8, 1 / 1.1), 2048: d(4.0, 5.0, 4.0)}
    kernel, speedups = choose_resident(w, mixed)
    assert kernel == "cutlass"
    assert speedups == pytest.approx({1: 2.0, 512: 1.25, 2048: 0.8})
    # cuSPARSELt's 10x on a layout with its own buffer (2) does not count: it would be a second
    # copy; CUTLASS at 0.5x loses, so dense
    own = {m: d(1.0, 2.0, 0.1, layout=2) for m in (16, 64)}
    assert choose_resident(w, own)[0] == "dense"
    assert choose_resident(w, {m: d(1.0, 2.0, 0.1, layout=4) for m in (16, 64)})[0] == "cusparselt"
    # nothing beats dense by the margin overall: the layer keeps a dense layout
    slow = {16: d(1.0, 1.01, 1.2), 4096: d(1.0, 0.99, 0.99)}
    kernel, speedups = choose_resident(w, slow)
    assert kernel == "dense" and speedups == {16: 1.0, 4096: 1.0}


def test_sparsify_and_from_pretrained_take_the_memory_mode(tmp_path):
    from sparseflow.convert.checkpoint import from_pretrained, save_pretrained
    from tests.ckpt_helpers import sparse_names, tiny

    with pytest.raises(ValueError, match="memory must be 'compact' or 'fast'"):
        sf.sparsify(tiny("llama"), memory="small", progress=False)
    model = sf.sparsify(tiny("llama"), fallback="never", memory="fast", progress=False)
    names = sparse_names(model)
    assert names and {model.get_submodule(n).memory for n in names} == {"fast"}
    save_pretrained(model, tmp_path / "m")
    assert {from_pretrained(tmp_path / "m").get_submodule(n).memory for n in names} == {"compact"}
    assert {from_pretrained(tmp_path / "m", memory="fast").get_submodule(n).memory for n in names} == {"fast"}
    with pytest.raises(ValueError, match="memory must be one of"):
        from_pretrained(tmp_path / "m", memory="tiny")


def test_a_compact_layer_compiles_fullgraph_with_its_placeholders():
    """The op's fake implementation reads the output width from the (N x 0) placeholders."""
    dense = _weight()
    layer = SparseLinear.from_compressed(sf.compress_2_4(dense), torch.randn(48).half())
    _keep_dense_only(layer)
    x = torch.randn(3, 7, 200).half()
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert out.shape == (3, 7, 48) and torch.equal(out, eager)
    assert layer.resident == "dense" and layer.weight_values.numel() == 0


def test_keep_only_drops_the_routes_resolved_before():
    """A route resolved in the fast mode (or for another kept layout) holds that kernel's layout:
    switching to one layout must not leave it in use, nor alive."""
    from sparseflow import ops

    w = sf.compress_2_4(_weight())
    h = ops._handle(w)
    ops._routes[(h, 8, 0)] = ops.Route(w.values._version, None, "a fast-mode layout", None)
    other = ops._handle(sf.compress_2_4(_weight(seed=2)))
    ops._routes[(other, 8, 0)] = ops.Route(0, None, "another weight's", None)
    w.keep_only("dense")
    assert (h, 8, 0) not in ops._routes and (other, 8, 0) in ops._routes
    ops.forget_routes(other)
