"""The metadata permutation behind the tile K = 64 CUTLASS configurations (no GPU needed):
``meta_k64`` against both of CUTLASS 4.2's sm90 metadata layouts written out coordinate by
coordinate, as ``cute::print(Sm90GemmSparseConfig::fill_layoutE(problem))`` prints them for a
256 x 512 fp16 weight:

    tile K 128: (((8,2,4),N/64),((16,2,4),K/128)):(((128,16,2048),8192),((1,1024,32),N/64*8192))
    tile K  64: (((8,2,4),N/64),((16,2,2),K/64)):(((64,16,1024),4096),((1,512,32),N/64*4096))

in units of one weight element (8 per metadata byte). The GPU test (tests/test_cutlass.py) runs
the configurations themselves against a float64 reference."""

import pytest
import torch

from sparseflow.kernels import cutlass


def _offsets(n: int, k: int, tk: int) -> torch.Tensor:
    """Element offset of each (row, column) of an n x k weight's metadata in the tile-K form."""

    def place(coord, shape, stride):
        out = torch.zeros_like(coord)
        for s, d in zip(shape, stride):
            out += (coord % s) * d
            coord = coord // s
        return out

    atom = 64 * min(tk, 128)
    rows = place(torch.arange(n), [8, 2, 4, n // 64], [atom // 64, 16, atom // 4, atom])
    inner = [16, 2, 4] if tk == 128 else [16, 2, 2]
    cols = place(torch.arange(k), inner + [k // min(tk, 128)], [1, atom // 8, 32, n // 64 * atom])
    return rows[:, None] + cols[None, :]


@pytest.mark.parametrize("n,k", [(64, 128), (192, 384), (320, 1152), (256, 512)])
def test_meta_k64_is_the_k64_layout_of_the_same_bytes(n, k):
    o128, o64 = _offsets(n, k, 128), _offsets(n, k, 64)
    for o in (o128, o64):  # each layout is one-to-one, and keeps a metadata byte's 8 columns together
        assert o.unique().numel() == n * k
        assert (o // 8 == (o[:, ::8] // 8).repeat_interleave(8, dim=1)).all()
    e128 = torch.randint(0, 256, (n * k // 8,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n + k))
    expected = torch.empty_like(e128)
    expected[o64.flatten() // 8] = e128[o128.flatten() // 8]  # each (row, column)'s byte, moved
    e64 = cutlass.meta_k64(e128, n, k)
    assert e64.dtype == torch.uint8 and e64.data_ptr() != e128.data_ptr()
    assert torch.equal(e64, expected)


def test_meta_k64_refuses_a_size_it_does_not_know():
    with pytest.raises(ValueError, match="expected 4096"):
        cutlass.meta_k64(torch.zeros(4000, dtype=torch.uint8), 256, 128)
    with pytest.raises(ValueError, match="96 x 128 weight; N must be a multiple of 64"):
        cutlass.meta_k64(torch.zeros(96 * 16, dtype=torch.uint8), 96, 128)


def test_tile_k_reads_the_configuration_name(monkeypatch):
    monkeypatch.setattr(
        cutlass, "configs", lambda dtype: ["128x256x128 cluster 2x1 cooperative", "128x256x64 ping-pong"]
    )
    assert [cutlass.tile_k(torch.float16, i) for i in (0, 1)] == [128, 64]
    assert [cutlass.token_tile(torch.float16, i) for i in (0, 1)] == [256, 256]
