"""Our small-M (decode) 2:4 kernel: the weight layout it reads and its Python entry points.

The kernel (``csrc/decode/decode_gemm.cu``) runs ``mma.sp.m16n8k32`` with the weight as the sparse
operand. This module rearranges the portable form (values + 2-bit positions, see
``sparseflow.format``) into the per-lane fragment order the instruction wants, once per weight
and on the weight's device, so the kernel does nothing but 16-byte coalesced loads:

* ``A[tile, kstep, lane, 0:4]``: the four 32-bit registers of lane ``lane``'s A fragment for
  output rows ``16*tile .. +15`` and k ``32*kstep .. +31`` (8 kept values);
* ``E[tile, chunk, slot, 0:4]``: metadata of k-steps ``4*chunk .. +3`` for the 16 lanes that
  supply it (lane ``4g + t`` for t in {0, 1} reads slot ``2g + t``).

Fragment and metadata positions follow the PTX ISA's description of sparse ``mma.m16n8k32``
for 16-bit types: A as in the dense m16n8k16 fragment (row ``g`` / ``g+8``, compressed columns
``2t, 2t+1`` / ``+8``); metadata of thread ``t`` (0 or 1) of group ``g``: k ``16t .. 16t+15``,
bits 0-15 for row ``g`` and bits 16-31 for row ``g+8``, one nibble ``i0 | i1 << 2`` per group
of four. ``tests/test_decode_kernel.py`` checks these readings against the hardware through
``_C.mma_sp_probe``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparseflow._ext import _C, sparse_unavailable_reason
from sparseflow.kernels.base import Kernel

__all__ = [
    "DECODE_MAX_M",
    "KERNEL",
    "DecodeKernel",
    "DecodeWeight",
    "decode_mm",
    "decode_mm_portable",
    "pack_decode",
    "pack_decode_swiglu",
    "portable_ok",
    "portable_view",
]

DECODE_MAX_M = 64  # the kernel holds at most 8 n-tiles of 8 tokens
_TILE, _KSTEP, _CHUNK, _TILES_PER_BLOCK = 16, 32, 128, 8
_PAD_META = 0x44444444  # every nibble = positions (0, 1): valid metadata for all-zero padding


@dataclass(frozen=True)
class DecodeWeight:
    """A weight in the decode kernel's layout (on one GPU), or with ``portable`` a view of the
    portable form that the kernel reads in place (``A`` = values, ``E`` = meta; no copy)."""

    A: torch.Tensor  # tiles x ksteps x 32 x 4 int32 (portable: N x K/2 values)
    E: torch.Tensor  # tiles x chunks x 16 x 4 int32 (portable: N x K/8 uint8 metadata)
    n_out: int  # output features (for SwiGLU: the intermediate size)
    k: int
    swiglu: bool = False
    portable: bool = False

    @property
    def nbytes(self) -> int:
        """Device bytes of the packed copy (a portable view holds none of its own)."""
        return 0 if self.portable else self.A.numel() * 4 + self.E.numel() * 4


def _lane_positions(device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, compressed column) of the 8 values each lane holds, in register order."""
    lane = torch.arange(32, device=device)
    g, t = (lane // 4)[:, None], (lane % 4)[:, None]
    half = torch.tensor([0, 0, 8, 8, 0, 0, 8, 8], device=device)
    col = torch.tensor([0, 1, 0, 1, 8, 9, 8, 9], device=device)
    return g + half, 2 * t + col


def _to_int32(v: torch.Tensor) -> torch.Tensor:
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def _pack_rows(values: torch.Tensor, idx: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """values/idx: N x K/2 (idx = position 0..3 of each kept value) -> (A, E) with N padded to 16."""
    npad, kpad = -(-n // _TILE) * _TILE, -(-k // _CHUNK) * _CHUNK
    ks, tiles = kpad // _KSTEP, npad // _TILE
    v = values.new_zeros(npad, kpad // 2)
    v[:n, : k // 2] = values
    ix = torch.arange(kpad // 2, device=idx.device).remainder(2).expand(npad, -1).clone()  # padding: (0, 1)
    ix[:n, : k // 2] = idx
    rows, cols = _lane_positions(values.device)
    A = v.view(tiles, _TILE, ks, 16).permute(0, 2, 1, 3)[:, :, rows, cols]  # tiles x ks x 32 x 8
    A = A.contiguous().view(torch.int32).reshape(tiles, ks, 32, 4)

    nib = (ix[:, 0::2] | (ix[:, 1::2] << 2)).view(tiles, _TILE, ks, 8)  # per group of 4 k
    shifts = 4 * torch.arange(4, device=ix.device)
    half16 = (nib.view(tiles, _TILE, ks, 2, 4) << shifts).sum(-1)  # [..., t]: k 16t .. 16t+15
    lo, hi = half16[:, :8], half16[:, 8:]  # rows g and g + 8: tiles x 8 x ks x 2
    e = lo + (hi << 16)  # tiles x 8(g) x ks x 2(t)
    e = e.permute(0, 2, 1, 3).reshape(tiles, ks // 4, 4, 16).permute(0, 1, 3, 2)  # tiles x chunks x 16 x 4
    return A, _to_int32(e.contiguous())


def _pad_tiles(A: torch.Tensor, E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    extra = -A.shape[0] % _TILES_PER_BLOCK
    if extra:
        A = torch.cat([A, A.new_zeros(extra, *A.shape[1:])])
        E = torch.cat([E, E.new_full((extra, *E.shape[1:]), _to_int32(torch.tensor(_PAD_META)).item())])
    return A.contiguous(), E.contiguous()


def pack_decode(weight) -> DecodeWeight:
    """Decode-kernel layout of a ``Sparse24Weight`` (built where the weight lives)."""
    n, k = weight.shape
    A, E = _pad_tiles(*_pack_rows(weight.values, weight.indices(), n, k))
    return DecodeWeight(A, E, n, k)


def pack_decode_swiglu(gate, up) -> DecodeWeight:
    """One layout for gate and up (same shape): their 16-row tiles interleaved, so each block
    holds both halves of its features and writes ``silu(gate) * up`` directly."""
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"pack_decode_swiglu: gate {gate} and up {up} differ in shape, dtype or device")
    n, k = gate.shape
    ag, eg = _pack_rows(gate.values, gate.indices(), n, k)
    au, eu = _pack_rows(up.values, up.indices(), n, k)
    A = torch.stack([ag, au], 1).flatten(0, 1)
    E = torch.stack([eg, eu], 1).flatten(0, 1)
    A, E = _pad_tiles(A, E)  # 2T tiles padded to a multiple of 8: whole (gate, up) pairs
    return DecodeWeight(A, E, n, k, swiglu=True)


def decode_mm(
    x: torch.Tensor, w: DecodeWeight, bias: torch.Tensor | None = None, split: int = 0, ring: bool = False
) -> torch.Tensor:
    """y = x @ W^T (+ bias) for x of M <= 64 rows (2-D, contiguous); for a SwiGLU weight,
    ``silu(x @ G^T + bg) * (x @ U^T + bu)`` with ``bias = cat([bg, bu])``. ``split``: split-K
    factor (0 = the kernel's default); ``ring``: stream the weight through the shared-memory
    cp.async pipeline instead of registers (``sparseflow.kernels.dispatch`` times both)."""
    _check(x, w, bias)
    if x.data_ptr() % 4:
        x = x.clone()
    return _C.decode24_mm(x, w.A, w.E, bias, w.n_out, w.swiglu, split, ring)


def portable_ok(weight) -> bool:
    """Whether the kernel can read this ``Sparse24Weight`` in place (no packed copy): on a GPU,
    K a multiple of 128 (whole chunks), values and metadata contiguous and 16-byte aligned."""
    v, m = weight.values, weight.meta
    return (
        v.is_cuda
        and weight.shape[1] % _CHUNK == 0
        and v.is_contiguous()
        and m.is_contiguous()
        and v.data_ptr() % 16 == 0
        and m.data_ptr() % 16 == 0
    )


def portable_view(weight) -> DecodeWeight:
    """The layout under which the kernel reads a ``Sparse24Weight`` in place (``portable_ok``)."""
    n, k = weight.shape
    return DecodeWeight(weight.values, weight.meta, n, k, portable=True)


def decode_mm_portable(
    x: torch.Tensor, weight, bias: torch.Tensor | None = None, split: int = 0, up=None, ring: bool = False
) -> torch.Tensor:
    """``decode_mm`` on the portable form itself (``portable_ok``), so a layer needs no second,
    packed copy of its weight. With ``up`` (same shape), ``weight`` is the gate and the result
    ``silu(x @ G^T + bg) * (x @ U^T + bu)`` with ``bias = cat([bg, bu])``. ``ring``: the weight
    streams through a shared-memory ring instead of registers (which is faster depends on the
    shape; the dispatcher times both)."""
    n, k = weight.shape
    for w in (weight,) if up is None else (weight, up):
        if not portable_ok(w):
            raise ValueError(
                f"decode_mm_portable: {w} cannot be read in place (needs CUDA, K % {_CHUNK} == 0, contiguous "
                "16-byte aligned values and metadata); use pack_decode"
            )
    if up is not None and (up.shape != weight.shape or up.dtype != weight.dtype or up.device != weight.device):
        raise ValueError(f"decode_mm_portable: gate {weight} and up {up} differ in shape, dtype or device")
    view = DecodeWeight(weight.values, weight.meta, n, k, swiglu=up is not None, portable=True)  # for _check
    _check(x, view, bias)
    if x.dtype != weight.dtype:
        raise TypeError(f"decode_mm_portable: x is {x.dtype}, the weight {weight.dtype}")
    if x.data_ptr() % 4:
        x = x.clone()
    return _C.decode24_mm_portable(
        x,
        weight.values,
        weight.meta,
        None if up is None else up.values,
        None if up is None else up.meta,
        bias,
        up is not None,
        split,
        ring,
    )


def _dtype_refusal(dtype: torch.dtype) -> str | None:
    if dtype in (torch.float16, torch.bfloat16):
        return None
    return f"{dtype} has no 2:4 tensor-core path (use float16 or bfloat16)"


def _check(x: torch.Tensor, w: DecodeWeight, bias: torch.Tensor | None) -> None:
    """Clear errors before anything reaches the extension."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"decode_mm: x must be a contiguous 2-D tensor, got {getattr(x, 'shape', type(x))}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"decode_mm: x must be float16 or bfloat16, got {x.dtype}")
    if not x.is_cuda or x.device != w.A.device:
        raise ValueError(f"decode_mm: x is on {x.device} but the packed weight is on {w.A.device}")
    if not 1 <= x.shape[0] <= DECODE_MAX_M:
        raise ValueError(f"decode_mm: M must be in 1..{DECODE_MAX_M}, got {x.shape[0]}")
    if x.shape[1] != w.k:
        raise ValueError(f"decode_mm: x has K={x.shape[1]}, the weight has K={w.k}")
    want = 2 * w.n_out if w.swiglu else w.n_out
    if bias is not None and (tuple(bias.shape) != (want,) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"decode_mm: bias must be a {x.dtype} vector of {want} on {x.device}")


def default_split(w: DecodeWeight) -> int:
    return int(_C.decode24_default_split(w.A.shape[0], w.A.shape[1] * _KSTEP, w.A.device.index or 0))


def split_candidates(
    w: DecodeWeight, m: int = 1, ring: bool = False, portable: bool = False, bf16: bool = False
) -> list[int]:
    """The split-K factors the dispatcher times for this weight at ``m`` tokens with one pipeline
    (``ring``) and reading (``portable``): none, the default, half and twice it, and every grid
    of whole waves, ``j * SMs // row_blocks`` blocks per row block for j up to the blocks of that
    kernel resident per SM (the kernel is bound by the busiest SM: 9 splits of down's 32 row
    blocks, 288 blocks on 132 SMs, leaves 24 SMs a third block). Each as the kernel runs
    it: chunks dealt out evenly, so 18 splits of 112 chunks are 16 of 7."""
    dev = w.A.device.index or 0
    base, chunks, row_blocks = default_split(w), w.A.shape[1] // (_CHUNK // _KSTEP), w.A.shape[0] // _TILES_PER_BLOCK
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    per_sm = int(_C.decode24_blocks_per_sm(m, bf16, w.swiglu, ring, portable, dev))
    waves = [j * sms // row_blocks for j in range(1, per_sm + 1)]
    return sorted({_effective_split(s, chunks) for s in (1, base, max(1, base // 2), 2 * base, *waves)})


def _effective_split(split: int, chunks: int) -> int:
    """The split the kernel launches for a requested one (decode_ops.cpp: ``per`` chunks each)."""
    per = -(-chunks // max(1, min(split, chunks)))
    return -(-chunks // per)


class DecodeKernel(Kernel):
    """Our ``mma.sp`` kernel for M <= ``DECODE_MAX_M`` rows. ``cfg`` = (split-K, ring pipeline)."""

    name = "decode"
    readback_cfg = (0, False)  # split-K chosen by the kernel, register pipeline
    readback_rows = DECODE_MAX_M

    def refusal(self, device: torch.device, dtype: torch.dtype, n: int, k: int) -> str | None:
        # any N x K: pack pads to whole tiles and chunks
        return sparse_unavailable_reason(device) or _dtype_refusal(dtype)

    def pack(self, weight, key=None) -> DecodeWeight:
        return pack_decode(weight)

    def nbytes(self, layout: DecodeWeight) -> int:
        return layout.nbytes

    def run(self, x: torch.Tensor, layout: DecodeWeight, cfg, bias: torch.Tensor | None) -> torch.Tensor:
        # The route checked M, dtype and device; the kernel needs x contiguous and 4-byte aligned.
        x = x.contiguous()
        x = x if x.data_ptr() % 4 == 0 else x.clone()
        if layout.portable:
            return _C.decode24_mm_portable(x, layout.A, layout.E, None, None, bias, False, cfg[0], cfg[1])
        return _C.decode24_mm(x, layout.A, layout.E, bias, layout.n_out, layout.swiglu, cfg[0], cfg[1])


KERNEL = DecodeKernel()
