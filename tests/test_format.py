import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparseflow as sf
from tests.conftest import random_2_4


@st.composite
def two_four_weights(draw):
    n = draw(st.integers(1, 9))
    groups = draw(st.integers(1, 11))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, groups, 4, generator=g)
    # 0, 1 or 2 non-zeros per group, at random positions (zeros must survive the round trip too)
    keep = torch.rand(n, groups, 4, generator=g).argsort(-1)[..., :2]
    nnz = torch.randint(0, 3, (n, groups, 1), generator=g)
    mask = torch.zeros(n, groups, 4, dtype=torch.bool).scatter_(-1, keep, torch.arange(2).expand(n, groups, 2) < nnz)
    return (w * mask).reshape(n, groups * 4).to(dtype)


@settings(max_examples=200, deadline=None)
@given(two_four_weights())
def test_compress_decompress_round_trip(w):
    c = sf.compress_2_4(w)
    n, k = w.shape
    assert c.shape == (n, k) and c.dtype == w.dtype and c.values.shape == (n, k // 2)
    assert c.meta.shape == (n, (k + 7) // 8) and c.meta.dtype == torch.uint8
    assert torch.equal(sf.decompress_2_4(c), w)
    c.validate()


def test_prune_keeps_two_largest_per_group():
    w = torch.tensor([[1.0, -5.0, 3.0, 0.5, 0.0, 0.1, -0.2, 0.3]])
    p = sf.prune_2_4(w)
    assert torch.equal(p, torch.tensor([[0.0, -5.0, 3.0, 0.0, 0.0, 0.0, -0.2, 0.3]]))
    assert sf.is_2_4(p) and not sf.is_2_4(w)
    big = torch.randn(64, 128, dtype=torch.bfloat16)
    pb = sf.prune_2_4(big)
    assert pb.dtype == torch.bfloat16 and sf.is_2_4(pb)
    # every kept element is at least as large as every dropped one in its group
    g, pg = big.float().abs().reshape(64, 32, 4), pb.float().abs().reshape(64, 32, 4)
    kept_min = torch.where(pg != 0, g, torch.inf).amin(-1)
    dropped_max = torch.where(pg == 0, g, -torch.inf).amax(-1)
    assert (kept_min >= dropped_max).all()


def test_compressed_size_is_0_5625_of_dense_fp16():
    c = sf.compress_2_4(random_2_4(256, 512, torch.float16))
    assert c.nbytes == 256 * 512 * 2 * 0.5625


def test_not_2_4_error_names_row_and_group():
    w = random_2_4(8, 16)
    w[5, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(ValueError, match=r"2:4.*row 5, group 2"):
        sf.compress_2_4(w)


@pytest.mark.parametrize(
    "bad, err, match",
    [
        (torch.randn(4, 6), ValueError, "multiple of 4"),
        (torch.randn(4), ValueError, "2-D"),
        (torch.ones(4, 8, dtype=torch.int32), TypeError, "floating"),
        (torch.randn(0, 8), ValueError, "empty"),
        ([[1.0, 0, 0, 0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_weights(bad, err, match):
    with pytest.raises(err, match=match):
        sf.compress_2_4(bad)


def test_corrupt_metadata_is_detected():
    c = sf.compress_2_4(random_2_4(4, 16))
    c.meta[2, 1] = 0b0101_0100  # row 2: group 2 valid (0, 1), group 3 positions (1, 1)
    with pytest.raises(ValueError, match="row 2, group 3"):
        c.validate()


def test_to_returns_new_object_with_converted_values():
    c = sf.compress_2_4(random_2_4(4, 16))
    h = c.to(dtype=torch.float16)
    assert h is not c and h.dtype == torch.float16 and h.meta is c.meta
    assert torch.equal(h.decompress(), c.decompress().half())
    assert c.to("cpu") is c


def test_sparse24weight_rejects_mismatched_parts():
    c = sf.compress_2_4(random_2_4(4, 16))
    with pytest.raises(ValueError, match="values have shape"):
        sf.Sparse24Weight(c.values[:, :4], c.meta, (4, 16))
    with pytest.raises(ValueError, match="meta"):
        sf.Sparse24Weight(c.values, c.meta.float(), (4, 16))


def test_kernel_layouts_are_built_once_cached_and_dropped():
    """Sparse24Weight's one derived-layout cache, driven through the dense kernel (whose layout,
    the decompressed weight, builds on the CPU too)."""
    from sparseflow.kernels import KERNELS

    dense = sf.prune_2_4(torch.randn(64, 128))
    w = sf.compress_2_4(dense)
    assert w.cached_layouts() == set() and w.layout_bytes() == {}
    tmp = w.layout("dense", keep=False)  # a measurement's temporary: not kept
    assert torch.equal(tmp, dense) and w.cached_layouts() == set()
    kept = w.layout("dense")
    assert w.layout("dense") is kept and w.layout("dense", keep=False) is kept  # built once
    assert w.cached_layouts() == {("dense", None)}
    assert w.layout_bytes() == {"dense": KERNELS["dense"].nbytes(kept)} == {"dense": 64 * 128 * 4}
    w.values.mul_(2)  # values edited in place: every layout is stale
    assert w.cached_layouts() == set()
    assert torch.equal(w.layout("dense"), 2 * dense)
    w.drop_layouts("decode")  # another kernel's: nothing to drop
    assert w.cached_layouts() == {("dense", None)}
    w.drop_layouts(("dense", None))
    assert w.cached_layouts() == set()
    w.layout("dense")
    w.drop_layouts("dense")
    assert w.layout_bytes() == {}
    with pytest.raises(KeyError):
        w.layout("no-such-kernel")


def test_every_kernel_module_offers_the_kernel_interface():
    from sparseflow.kernels import KERNELS, Kernel
    from sparseflow.kernels.cusparselt import cslt_unsupported

    assert sorted(KERNELS) == ["cusparselt", "cutlass", "decode", "dense"]
    cpu = torch.device("cpu")
    for name, kernel in KERNELS.items():
        assert isinstance(kernel, Kernel) and kernel.name == name
        why = kernel.refusal(cpu, torch.float16, 4096, 4096)
        assert (why is None) == (name == "dense"), (name, why)  # the 2:4 kernels need a GPU
    # cuSPARSELt's GEMM layouts 1, 3 and 4 share one compressed buffer; 0 and 2 keep their own
    cslt = KERNELS["cusparselt"]
    assert [cslt.cache_key(v) for v in range(5)] == [0, 1, 2, 1, 1]
    assert cslt_unsupported(4096, 4096) is None and "multiple of 32" in cslt_unsupported(4096, 4100)
