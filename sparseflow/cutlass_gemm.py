"""Large-M 2:4 GEMM on Hopper through CUTLASS's sm90 sparse kernels (``sparseflow._cutlass``).

The kernels (``csrc/cutlass_gemm_impl.cuh``) run ``wgmma.sp`` fed by TMA in a warp-specialized
pipeline, with the weight as the sparse operand. They read the weight in CUTLASS's own order
(values + metadata interleaved for the instruction), which CUTLASS's compressor builds once on the
device from the dense 2:4 weight: one more derived layout of the portable form, cached on the
``Sparse24Weight`` like cuSPARSELt's. ``sparseflow.dispatch`` times every compiled configuration
beside cuSPARSELt, our decode kernel and dense cuBLAS, and keeps the fastest per M-bucket.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparseflow._ext import _CUTLASS, CUTLASS_ERROR

__all__ = ["CutlassWeight", "available", "configs", "cutlass_mm", "pack_cutlass", "unsupported"]


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
    return _CUTLASS is not None and device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


def unavailable_reason(device: torch.device) -> str | None:
    if _CUTLASS is None:
        return CUTLASS_ERROR
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return f"CUTLASS's sm90 2:4 kernels are compiled for sm_90a (Hopper) only; {device} is not one"
    return None


def unsupported(n: int, k: int) -> str | None:
    """Why the kernels cannot take an N x K weight, or None."""
    align_n, align_k = (_CUTLASS.ALIGN_N, _CUTLASS.ALIGN_K) if _CUTLASS is not None else (64, 128)
    if n % align_n or k % align_k:
        return f"N = {n} must be a multiple of {align_n} and K = {k} of {align_k}"
    return None


def configs(dtype: torch.dtype) -> list[str]:
    """Names of the compiled configurations (tile, cluster, schedule); a cfg is an index here."""
    return list(_CUTLASS.configs(dtype == torch.bfloat16)) if _CUTLASS is not None else []


def pack_cutlass(weight) -> CutlassWeight:
    """CUTLASS's layout of a CUDA ``Sparse24Weight``, built on its device by CUTLASS's compressor."""
    reason = unavailable_reason(weight.device) or unsupported(*weight.shape)
    if reason:
        raise ValueError(f"sparseflow: CUTLASS 2:4 GEMM unavailable for {weight}: {reason}")
    A, E = _CUTLASS.compress(weight.dense_on_device(keep=False))
    return CutlassWeight(A, E, *weight.shape)


def cutlass_mm(x: torch.Tensor, w: CutlassWeight, cfg: int) -> torch.Tensor:
    """y = x @ W^T for 2-D x (made contiguous and 16-byte aligned here) with configuration ``cfg``."""
    x = x.contiguous()
    if x.data_ptr() % 16:
        x = x.clone()
    return _CUTLASS.mm(x, w.A, w.E, w.n, cfg)
