"""CUTLASS's sm90 2:4 GEMM (sparseflow.kernels.cutlass): every compiled configuration against a
float64 reference on fresh random data, outputs poisoned first. Runs on a Hopper GPU with
sparseflow._cutlass built; skipped elsewhere."""

import pytest
import torch
from torch import nn

import sparseflow as sf
from sparseflow.kernels import cutlass
from sparseflow.kernels.dispatch import DISPATCHER
from tests.conftest import TOL, needs_cuda, random_2_4, rel_err

pytestmark = [
    needs_cuda,
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not cutlass.available(torch.device("cuda")),
        reason="CUTLASS sm90 kernels not built or not a Hopper GPU",
    ),
]

SHAPES = [  # (M, N, K): M = 1 and odd M, tiles partly filled in every dimension, long K
    (1, 64, 128),
    (7, 192, 384),
    (16, 4096, 4096),
    (33, 320, 1152),
    (64, 6144, 4096),
    (255, 4096, 14336),
    (256, 1024, 2048),
    (1000, 768, 3072),
    (4096, 4096, 4096),
]


def _poisoned(m, n, dtype):
    """Fill freed allocator blocks with NaN so an unwritten output element shows up."""
    junk = torch.empty(max(m * n * 2, 64 << 20), device="cuda", dtype=dtype).fill_(float("nan"))
    del junk


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_every_configuration_matches_reference(dtype, m, n, k):
    torch.manual_seed(m + 3 * n + 7 * k)
    w = random_2_4(n, k, dtype, "cuda")
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    cw = cutlass.pack_cutlass(sf.compress_2_4(w))
    ref = nn.functional.linear(x.double(), w.double())
    names = cutlass.configs(dtype)
    assert len(names) >= 2
    for cfg, name in enumerate(names):
        _poisoned(m, n, dtype)
        out = cutlass.cutlass_mm(x, cw, cfg)
        torch.cuda.synchronize()
        assert out.shape == (m, n) and out.dtype == dtype
        assert rel_err(out, ref) < TOL[dtype], f"config {cfg} ({name})"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forced_backend_with_bias_nd_input_and_a_view(dtype):
    """backend='cutlass' through sparse_mm: bias, 3-D x, and x a strided view (copied to be
    contiguous and aligned before the kernel)."""
    torch.manual_seed(0)
    w = random_2_4(512, 1024, dtype, "cuda")
    b = torch.randn(512, device="cuda", dtype=dtype)
    c = sf.compress_2_4(w)
    x = torch.randn(2, 40, 1024, device="cuda", dtype=dtype)
    _poisoned(80, 512, dtype)
    out = sf.sparse_mm(x, c, b, backend="cutlass")
    assert rel_err(out, nn.functional.linear(x.double(), w.double(), b.double())) < TOL[dtype]
    xv = torch.randn(300, 1032, device="cuda", dtype=dtype)[:, 8:]  # rows 1032 apart, offset 8
    out = sf.sparse_mm(xv, c, None, backend="cutlass")
    assert rel_err(out, nn.functional.linear(xv.double(), w.double())) < TOL[dtype]


def test_dispatcher_times_cutlass_and_records_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFLOW_CACHE_DIR", str(tmp_path))
    DISPATCHER.clear()
    w = sf.compress_2_4(random_2_4(4096, 4096, torch.float16, "cuda"))
    x = torch.randn(512, 4096, device="cuda", dtype=torch.float16)
    sf.sparse_mm(x, w)
    d = DISPATCHER.lookup(w.device, w.dtype, 4096, 4096, 512)
    assert d.cutlass_ms is not None and 0 <= d.cutlass_cfg < len(cutlass.configs(torch.float16))
    # the standing is the worse end of the bucket (M = 481..512): never better than the top alone
    assert d.m_lo == 481 and d.lo_ms["cutlass"] > 0 and d.lo_ms["dense"] > 0
    assert 0 < d.speedup <= d.dense_ms / min(t for t in (d.sparse_ms, d.cutlass_ms) if t) * (1 + 1e-9)
    row = next(r for r in DISPATCHER.table(w.device, w.dtype, 4096, 4096) if r["m_bucket"] == 512)
    assert row["cutlass_ms"] == d.cutlass_ms
    if d.choice != "cutlass":  # the layout it built for timing is freed unless chosen
        assert "cutlass" not in w.layout_bytes()
    DISPATCHER.clear()


def test_bad_input_is_a_clear_error():
    w16 = sf.compress_2_4(random_2_4(128, 256, torch.float16, "cuda"))
    cw = cutlass.pack_cutlass(w16)
    with pytest.raises(ValueError, match="config 99 out of range"):
        cutlass.cutlass_mm(torch.randn(4, 256, device="cuda", dtype=torch.float16), cw, 99)
    with pytest.raises(TypeError, match="x is torch.bfloat16"):
        cutlass.cutlass_mm(torch.randn(4, 256, device="cuda", dtype=torch.bfloat16), cw, 0)
    with pytest.raises(ValueError, match=r"expected \(M, 256\)"):
        cutlass.cutlass_mm(torch.randn(4, 384, device="cuda", dtype=torch.float16), cw, 0)
    # the extension's own checks answer with a message, not a crash, where Python's are bypassed
    from sparseflow._ext import _CUTLASS

    y = torch.empty(4, 128, device="cuda", dtype=torch.float16)
    x = torch.randn(4, 256, device="cuda", dtype=torch.float16)
    assert _CUTLASS.mm(x, cw.A, cw.E, y, None, 99) == "no such configuration"
    assert _CUTLASS.mm(x, cw.A[:-8], cw.E, y, None, 0) == "the compressed weight does not match N and K"
    assert _CUTLASS.mm(x.float(), cw.A, cw.E, y, None, 0).startswith("x and y must be")
    assert _CUTLASS.mm(x, cw.A, cw.E, y, torch.empty(64, dtype=torch.uint8), 0).startswith("the workspace must be")
    assert _CUTLASS.linear(x, cw.A, cw.E, 128, 0, 99) == (None, "no such configuration")
    assert _CUTLASS.linear(x, cw.A, cw.E, 192, 0, 0) == (None, "the compressed weight does not match N and K")
    y2, err = _CUTLASS.linear(x, cw.A, cw.E, 128, 0, 0)
    assert err == "" and y2.shape == (4, 128)
    assert rel_err(y2, nn.functional.linear(x.double(), w16.decompress().double())) < TOL[torch.float16]
    odd = sf.compress_2_4(random_2_4(96, 256, torch.float16, "cuda"))
    with pytest.raises(ValueError, match="multiple of 64"):
        cutlass.pack_cutlass(odd)
    with pytest.raises(ValueError, match="backend='cutlass'.*multiple of 64"):
        sf.sparse_mm(torch.randn(4, 256, device="cuda", dtype=torch.float16), odd, backend="cutlass")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 289, 1281])
def test_padded_run_matches_reference_and_returns_only_x_rows(dtype, m):
    """x padded to whole token tiles of each configuration (the dispatcher's `cutlass_pad`):
    the same result, M rows."""
    torch.manual_seed(m)
    w = random_2_4(1024, 2048, dtype, "cuda")
    cw = sf.compress_2_4(w).layout("cutlass")
    x = torch.randn(m, 2048, device="cuda", dtype=dtype)
    b = torch.randn(1024, device="cuda", dtype=dtype)
    ref = nn.functional.linear(x.double(), w.double(), b.double())
    for cfg in range(len(cutlass.configs(dtype))):
        tile = cutlass.token_tile(dtype, cfg)
        _poisoned(cutlass.padded_rows(m, tile), 1024, dtype)
        out = cutlass.PaddedRun(tile)(x, cw, cfg, b)
        assert out.shape == (m, 1024)
        assert rel_err(out, ref) < TOL[dtype], f"config {cfg}"
