"""Large-M 2:4 GEMM on Hopper through CUTLASS's sm90 sparse kernels (``sparseflow._cutlass``).

The kernels (``csrc/cutlass/cutlass_gemm_impl.cuh``) run ``wgmma.sp`` fed by TMA in a warp-specialized
pipeline, with the weight as the sparse operand. They read the weight in CUTLASS's own order
(values + metadata interleaved for the instruction), which CUTLASS's compressor builds once on the
device from the dense 2:4 weight: one more derived layout of the portable form, cached on the
``Sparse24Weight`` like cuSPARSELt's. ``sparseflow.kernels.dispatch`` times every compiled configuration
beside cuSPARSELt, our decode kernel and dense cuBLAS, and keeps the fastest per M-bucket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from sparseflow import _ext
from sparseflow._ext import _CUTLASS, CUTLASS_ERROR
from sparseflow.kernels.base import Kernel

__all__ = [
    "KERNEL",
    "CutlassKernel",
    "CutlassWeight",
    "PaddedRun",
    "PlannedRun",
    "Step",
    "available",
    "configs",
    "cutlass_mm",
    "meta_k64",
    "mm_padded",
    "pack_cutlass",
    "padded_rows",
    "refusal",
    "step_at",
    "tile_k",
    "token_tile",
    "unsupported",
]


@dataclass(frozen=True)
class CutlassWeight:
    """A weight in CUTLASS's sm90 2:4 layout (on one GPU)."""

    A: torch.Tensor  # kept values, CUTLASS's padded order
    E: torch.Tensor  # metadata bytes
    n: int
    k: int

    @property
    def nbytes(self) -> int:
        return self.A.numel() * self.A.element_size() + self.E.numel()


def available(device: torch.device) -> bool:
    """True where the kernels can run: built, and ``device`` is an sm_90 (Hopper) GPU."""
    return unavailable_reason(device) is None


def unavailable_reason(device: torch.device) -> str | None:
    """Why the kernels cannot run on ``device`` (not built, not Hopper), or None."""
    if _CUTLASS is None:
        return CUTLASS_ERROR
    if device.type != "cuda" or _ext.device_capability(device) != (9, 0):
        return f"CUTLASS's sm90 2:4 kernels are compiled for sm_90a (Hopper) only; {device} is not one"
    return None


def unsupported(n: int, k: int) -> str | None:
    """Why the kernels cannot take an N x K weight, or None."""
    align_n, align_k = (_CUTLASS.ALIGN_N, _CUTLASS.ALIGN_K) if _CUTLASS is not None else (64, 128)
    if n % align_n or k % align_k:
        return f"N = {n} must be a multiple of {align_n} and K = {k} of {align_k}"
    return None


def refusal(device: torch.device, dtype: torch.dtype, n: int, k: int) -> str | None:
    """Why an N x K ``dtype`` weight on ``device`` cannot run here, or None: the one check every
    caller uses."""
    reason = unavailable_reason(device) or unsupported(n, k)
    if reason is None and dtype not in (torch.float16, torch.bfloat16):
        reason = f"{dtype} weights have no 2:4 tensor-core path (float16 or bfloat16)"
    return reason


def configs(dtype: torch.dtype) -> list[str]:
    """Names of the compiled configurations (tile, cluster, schedule); a cfg is an index here."""
    return list(_CUTLASS.configs(dtype == torch.bfloat16)) if _CUTLASS is not None else []


def pack_cutlass(weight) -> CutlassWeight:
    """CUTLASS's layout of a CUDA ``Sparse24Weight``, built on its device by CUTLASS's compressor."""
    reason = refusal(weight.device, weight.dtype, *weight.shape)
    if reason:
        raise ValueError(f"sparseflow: CUTLASS 2:4 GEMM unavailable for {weight}: {reason}")
    n, k = weight.shape
    a_elems, e_bytes, ws_bytes = _CUTLASS.sizes(weight.dtype == torch.bfloat16, n, k)
    dense = weight.layout("dense", keep=False).contiguous()
    A = torch.empty(a_elems, dtype=weight.dtype, device=weight.device)
    E = torch.empty(e_bytes, dtype=torch.uint8, device=weight.device)
    ws = torch.zeros(max(ws_bytes, 1), dtype=torch.uint8, device=weight.device)
    with torch.cuda.device(weight.device):
        err = _CUTLASS.compress(dense, A, E, ws)
    if err:
        raise RuntimeError(f"sparseflow: CUTLASS's 2:4 compressor failed for {weight}: {err}")
    return CutlassWeight(A, E, n, k)


def meta_k64(e: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The resident form's metadata (``CutlassWeight.E``, written by CUTLASS's compressor for tile
    K = 128) in the order the tile K = 64 configurations read: a new tensor, 1/16 of the dense
    weight's bytes. The values are the same in both forms; only the metadata differs.

    CUTLASS 4.2's sm90 sparse builder lays the metadata of an N x K weight (one byte per 8 columns)
    out in atoms of 64 rows x min(tile K, 128) columns, the atoms of one column block after each
    other (``Sm90GemmSparseConfig::fill_layoutE``; printed with ``cute::print`` for both tile Ks).
    Within an atom, byte (row r, column byte j) sits at, for tile K = 128,
    ``16 r0 + 2 r1 + 256 r2 + j0 + 128 j1 + 4 j2`` (r = r0 + 8 r1 + 16 r2; j = j0 + 2 j1 + 4 j2,
    j2 < 4) and, for tile K = 64, at ``8 r0 + 2 r1 + 128 r2 + j0 + 64 j1 + 4 j2`` (j2 < 2). So a
    K = 128 atom is two K = 64 atoms with the high bit of j2 (which of the two) moved inward: one
    permutation of a view. ``tests/test_cutlass_cpu.py`` checks it against both layouts written out
    coordinate by coordinate, and ``tests/test_cutlass.py`` against the float64 reference on the GPU.
    """
    if n % 64 or k % 128:
        raise ValueError(f"meta_k64: a {n} x {k} weight; N must be a multiple of 64 and K of 128")
    if e.numel() != n * k // 8:
        raise ValueError(f"meta_k64: {e.numel()} metadata bytes for a {n} x {k} weight; expected {n * k // 8}")
    # The last three factors (j2's low bit, r1, j0) are 8 bytes in the same order in both forms:
    # moved as int64 (8x fewer elements than bytes: the byte-wise copy took about 50 us on
    # gate/up's 14.7 MB on the H100, most of what the K = 64 tiles gained at M = 2048).
    words = e.view(torch.int64).view(k // 128, n // 64, 4, 2, 8, 2)
    return words.permute(0, 5, 1, 2, 3, 4).reshape(-1).view(torch.uint8)


def _tile(dtype: torch.dtype, cfg: int) -> tuple[int, int, int]:
    """(rows, tokens, K) of configuration ``cfg``'s tile: its name's first word, "rows x tokens x K"."""
    rows, tokens, k = configs(dtype)[cfg].split()[0].split("x")
    return int(rows), int(tokens), int(k)


def tile_k(dtype: torch.dtype, cfg: int) -> int:
    """Tile K of configuration ``cfg``."""
    return _tile(dtype, cfg)[2]


# Configurations that read the metadata in the tile K = 64 order (the same for both dtypes).
_K64 = frozenset(i for i in range(len(configs(torch.float16))) if tile_k(torch.float16, i) == 64)

_WORKSPACE: dict[tuple, int] = {}


def cutlass_mm(x: torch.Tensor, w: CutlassWeight, cfg: int) -> torch.Tensor:
    """y = x @ W^T for 2-D x with configuration ``cfg`` (an index into ``configs``), checked."""
    if not isinstance(w, CutlassWeight):
        raise TypeError(f"cutlass_mm: weight must be a CutlassWeight (pack_cutlass), got {type(w).__name__}")
    if x.dim() != 2 or x.shape[1] != w.k:
        raise ValueError(f"cutlass_mm: x has shape {tuple(x.shape)}, expected (M, {w.k})")
    if x.dtype != w.A.dtype or x.device != w.A.device:
        raise TypeError(f"cutlass_mm: x is {x.dtype} on {x.device}, the weight {w.A.dtype} on {w.A.device}")
    count = _CUTLASS.CONFIGS if _CUTLASS is not None else 0
    if not 0 <= cfg < count:
        raise ValueError(f"cutlass_mm: config {cfg} out of range 0..{count - 1}")
    return mm_unchecked(x, w, cfg)


def mm_unchecked(x: torch.Tensor, w: CutlassWeight, cfg: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``cutlass_mm`` (+ bias) for callers that checked x against the weight already (the hot
    path: ``CutlassKernel.run``); the extension still refuses what would corrupt memory."""
    if not x.is_contiguous() or x.data_ptr() % 16:
        x = x.contiguous()
        if x.data_ptr() % 16:
            x = x.clone()
    m = x.shape[0]
    dev = x.get_device()
    key = (x.dtype, cfg, w.n, m, w.k, dev)
    need = _WORKSPACE.get(key)
    if need is None:
        if len(_WORKSPACE) > 4096:  # one entry per distinct M: bounded for servers with varying M
            _WORKSPACE.clear()
        need = _WORKSPACE[key] = _CUTLASS.workspace(x.dtype == torch.bfloat16, cfg, w.n, m, w.k, dev)
    e = meta_k64(w.E, w.n, w.k) if cfg in _K64 else w.E
    y, err = _CUTLASS.linear(x, w.A, e, w.n, need, cfg)  # y and the workspace allocated in C++
    if err:
        raise RuntimeError(
            f"sparseflow: CUTLASS 2:4 GEMM ({configs(x.dtype)[cfg]}, M = {m}, N = {w.n}, K = {w.k}) failed: {err}"
        )
    if bias is not None:
        y.add_(bias)
    return y


def token_tile(dtype: torch.dtype, cfg: int) -> int:
    """Token rows per tile of configuration ``cfg`` (the middle number of its name, "rows x tokens
    x K"). Read when a route or a measurement is made, not per call."""
    return _tile(dtype, cfg)[1]


def padded_rows(m: int, tile: int) -> int:
    """M rounded up to a whole number of token tiles."""
    return -(-m // tile) * tile


def mm_padded(x: torch.Tensor, w: CutlassWeight, cfg: int, rows: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``mm_unchecked`` run on ``rows`` token rows (x's rows, then rows whose outputs are dropped).

    Why: on the H100 these kernels take longer on a part-filled last token tile than on a full
    one. Gate/up (28672 x 4096) with 128 x 128 stream-K tiles took 165 us at M = 333 and 119 us
    with x padded to 384 rows, the same tile count; the 128 x 192 tiles took 229 us at M = 700 and
    184 us padded to 768 (``scripts/probe_m_sweep.py --pad 1``, benchmarks/NOTES.md). The copy of
    x costs M x K x 4 bytes of traffic, which the dispatcher's timing includes: it pads only
    where that measured faster (``Decision.cutlass_pad``)."""
    m = x.shape[0]
    if m >= rows:
        return mm_unchecked(x, w, cfg, bias)
    xp = x.new_empty(rows, x.shape[1])  # the extra rows' values are never read back
    xp[:m].copy_(x)
    return mm_unchecked(xp, w, cfg, bias)[:m]


class PaddedRun:
    """``CutlassKernel.run`` with x padded to a whole number of ``tile``-row token tiles
    (``mm_padded``): what a route runs where the dispatcher measured padding faster."""

    __slots__ = ("tile",)

    def __init__(self, tile: int) -> None:
        self.tile = tile

    def __call__(self, x: torch.Tensor, layout: CutlassWeight, cfg: int, bias: torch.Tensor | None) -> torch.Tensor:
        return mm_padded(x, layout, cfg, padded_rows(x.shape[0], self.tile), bias)


class Step(NamedTuple):
    """Up to ``m_end`` rows (from the previous step's end), run configuration ``cfg``, padding x
    to whole tiles of ``tile`` rows (0: as it is)."""

    m_end: int
    cfg: int
    tile: int


def step_at(steps, m: int) -> Step:
    """The step of a plan (``Step``s in ascending ``m_end``) that serves M rows; the last beyond it."""
    for s in steps:
        if m <= s.m_end:
            return s
    return steps[-1]


class PlannedRun:
    """``CutlassKernel.run`` with the configuration chosen by x's row count from ``steps``
    (``sparseflow.kernels.dispatch.cutlass_plan``): one route serves an M-bucket, and inside it the
    fastest configuration changes where its token-tile count does."""

    __slots__ = ("steps",)

    def __init__(self, steps) -> None:
        self.steps = tuple(steps)

    def __call__(self, x: torch.Tensor, layout: CutlassWeight, cfg: int, bias: torch.Tensor | None) -> torch.Tensor:
        m = x.shape[0]
        step = step_at(self.steps, m)
        if step.tile:
            return mm_padded(x, layout, step.cfg, padded_rows(m, step.tile), bias)
        return mm_unchecked(x, layout, step.cfg, bias)


class CutlassKernel(Kernel):
    """CUTLASS's sm90 kernels (Hopper, any M). ``cfg``: an index into ``configs``."""

    name = "cutlass"
    readback_cfg = 0  # configuration 0 runs at every M

    def refusal(self, device: torch.device, dtype: torch.dtype, n: int, k: int) -> str | None:
        return refusal(device, dtype, n, k)

    def pack(self, weight, key=None) -> CutlassWeight:
        return pack_cutlass(weight)

    def nbytes(self, layout: CutlassWeight) -> int:
        return layout.nbytes

    # The hot path calls mm_unchecked itself: no wrapper frame per call.
    run = staticmethod(mm_unchecked)


KERNEL = CutlassKernel()
