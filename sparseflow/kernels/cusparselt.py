"""NVIDIA's cuSPARSELt (``csrc/cusparselt/cusparselt_gemm.cpp``): the 2:4 GEMM library, from M = 16.

cuSPARSELt reads the weight in its own compressed buffer, built on the device by
``cusparseLtSpMMACompress`` from the dense 2:4 weight. How y = x W^T is posed to the library (its
"GEMM layout", 0-4, see ``sparseflow._ext``) decides how that buffer describes W: layouts 1, 3
and 4 share one buffer, 0 and 2 keep their own (``cache_key``). The dispatcher searches an
algorithm per (shape, M-bucket) in-process where the library's search works (``search_works``)
and through the crash-isolated tuner (``sparseflow.kernels.cusparselt_tuner``) elsewhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from sparseflow._ext import _C, CSLT_LAYOUT_OVERRIDE, sparse_unavailable_reason
from sparseflow.kernels.base import Kernel

__all__ = [
    "CSLT_ALIGN",
    "KERNEL",
    "CsltWeight",
    "CusparseLtKernel",
    "cache_key",
    "cslt_candidates",
    "cslt_layout",
    "cslt_unsupported",
    "search_works",
]

CSLT_ALIGN = 32  # cuSPARSELt needs N and K to be multiples of this


def cslt_unsupported(n: int, k: int) -> str | None:
    """Why cuSPARSELt cannot take an N x K weight, or None when it can."""
    if n % CSLT_ALIGN == 0 and k % CSLT_ALIGN == 0:
        return None
    bad = f"in_features K={k}" if k % CSLT_ALIGN else f"out_features N={n}"
    return f"{bad} is not a multiple of {CSLT_ALIGN}, which cuSPARSELt requires"


def cslt_layout(bucket: int) -> int:
    """The layout used where nothing was measured (csrc/cusparselt/cusparselt_gemm.cpp): 1, the one
    whose library search and every algorithm run safely on an H200 with cuSPARSELt 0.8.0."""
    if CSLT_LAYOUT_OVERRIDE:
        return int(CSLT_LAYOUT_OVERRIDE)
    del bucket  # one default for every M; measured decisions may pick another
    return 1


def cslt_candidates() -> list[int]:
    """Layouts the dispatcher measures. Layout 1 (sparse W, y^T output plus a transpose) searches
    in-process. Layout 4 (x described as PyTorch does, y written directly) is faster with its best
    algorithm (1.17-1.70x over cuBLAS at M >= 1024 on the H200) but has no working library search
    and a few algorithm ids that crash, so its ids are swept in a child process
    (``sparseflow.kernels.cusparselt_tuner``); ``SPARSEFLOW_CSLT_TUNER=0`` turns that off.
    ``SPARSEFLOW_CSLT_LAYOUTS=1,4,0`` measures other layouts too (those without a working search
    go through the tuner): a way to try layouts 0/2, whose library search crashes, on a new GPU."""
    if CSLT_LAYOUT_OVERRIDE:
        return [int(CSLT_LAYOUT_OVERRIDE)]
    if os.environ.get("SPARSEFLOW_CSLT_TUNER", "1") == "0":
        return [1]
    wanted = os.environ.get("SPARSEFLOW_CSLT_LAYOUTS", "1,4")
    try:
        layouts = [int(v) for v in wanted.split(",")]
    except ValueError:
        layouts = [-1]
    if not layouts or any(not 0 <= v <= 4 for v in layouts):
        raise ValueError(f"SPARSEFLOW_CSLT_LAYOUTS must list cuSPARSELt layouts 0-4, e.g. '1,4'; got {wanted!r}")
    return list(dict.fromkeys(layouts))


def search_works(layout: int) -> bool:
    """Whether ``cusparseLtMatmulSearch`` can be run in-process for this layout."""
    return layout in (1, 3)  # it crashes (0, 2) or fails (4) on the others


def cache_key(layout: int) -> int:
    """Which compressed buffer a layout reads. Layouts 1, 3 and 4 describe W the same way (the
    sparse operand, row-major N x K) and share one (1 and 4 checked on an H200); layout 2 (W the
    sparse B) and the opt-in layout 0 keep their own."""
    return layout if layout in (0, 2) else 1


@dataclass(frozen=True)
class CsltWeight:
    """cuSPARSELt's compressed buffer of an N x K weight (on one GPU)."""

    packed: torch.Tensor
    n: int

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size()


class CusparseLtKernel(Kernel):
    """``pack(weight, layout)`` compresses for a GEMM layout; ``cfg`` = (the library's
    [algorithm id, split-k, split-k mode, buffers], GEMM layout)."""

    name = "cusparselt"
    readback_cfg = ([-1, 1, 0, 0], 1)  # the library's default algorithm, GEMM layout 1

    def refusal(self, device: torch.device, dtype: torch.dtype, n: int, k: int) -> str | None:
        reason = sparse_unavailable_reason(device)
        if reason is None and dtype not in (torch.float16, torch.bfloat16):
            reason = f"{dtype} has no 2:4 tensor-core path (use float16 or bfloat16)"
        return reason or cslt_unsupported(n, k)

    def pack(self, weight, key=None) -> CsltWeight:
        layout = cslt_layout(0) if key is None else int(key)
        return CsltWeight(_C.cslt_compress(weight.layout("dense", keep=False), layout), weight.shape[0])

    def cache_key(self, key) -> int:
        return cache_key(cslt_layout(0) if key is None else int(key))

    def nbytes(self, layout: CsltWeight) -> int:
        return layout.nbytes

    def run(self, x: torch.Tensor, layout: CsltWeight, cfg, bias: torch.Tensor | None) -> torch.Tensor:
        y = _C.cslt_mm(x.contiguous(), layout.packed, layout.n, cfg[0], cfg[1])
        if bias is not None:
            y.add_(bias)
        return y


KERNEL = CusparseLtKernel()
