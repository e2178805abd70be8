"""Dense cuBLAS (``F.linear``) on the decompressed weight: the baseline every 2:4 kernel must beat.

Its layout is the dense N x K weight on the device. The dispatcher builds one for timing without
caching it (``Sparse24Weight.layout("dense", keep=False)``); a route to dense keeps it, which is
the price of never being slower than dense at that M.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparseflow.kernels.base import Kernel

__all__ = ["KERNEL", "DenseKernel"]


class DenseKernel(Kernel):
    name = "dense"

    def refusal(self, device: torch.device, dtype: torch.dtype, n: int, k: int) -> str | None:
        return None  # F.linear takes every shape, dtype and device

    def pack(self, weight, key=None) -> torch.Tensor:
        from sparseflow.format import decompress_2_4

        return decompress_2_4(weight)

    def nbytes(self, layout: torch.Tensor) -> int:
        return layout.numel() * layout.element_size()

    def run(self, x: torch.Tensor, layout: torch.Tensor, cfg, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layout, bias)


KERNEL = DenseKernel()
