"""Reading a weight back out of the one layout a kernel keeps on the GPU.

A layer that keeps only its kernel's layout on the GPU (``SparseLinear(memory="compact")``) has
no portable copy to save or to re-pack from. Every kernel computes y = x W^T, so running it on
rows of the identity gives y = W^T's rows: each output element is one product ``1 * w`` plus
exact zeros, accumulated in fp32, so it is ``w`` exactly for fp16 and bf16 weights (a non-finite
weight would not survive: ``0 * inf`` is NaN). The columns come back in chunks, so the temporaries
are a few MB whatever the layer's size, and are compressed to the portable form as they arrive.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from sparseflow.kernels.base import Kernel

__all__ = ["dense_columns", "portable_from_layout"]


def dense_columns(kernel: Kernel, layout, n: int, k: int, dtype: torch.dtype, device, chunk: int = 1024) -> Iterator:
    """Yield ``(c0, W[:, c0:c1])`` over the K columns of the N x K weight ``layout`` holds.
    Chunks are multiples of 8 columns (whole metadata bytes of the portable form)."""
    step = max(8, min(chunk, kernel.readback_rows) // 8 * 8)
    for c0 in range(0, k, step):
        c1 = min(k, c0 + step)
        eye = torch.zeros(c1 - c0, k, dtype=dtype, device=device)
        eye[torch.arange(c1 - c0, device=device), torch.arange(c0, c1, device=device)] = 1
        yield c0, kernel.run(eye, layout, kernel.readback_cfg, None).t()


def portable_from_layout(
    kernel: Kernel,
    layout,
    shape: tuple[int, int],
    dtype: torch.dtype,
    device,
    out_device=None,
    rows: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The portable (values, meta) of the weight ``layout`` holds, written to ``out_device``
    (default: ``device``); ``rows`` (a, b): only rows a..b-1 (one projection of a fused stack),
    compressed and written without the others. Positions of kept zeros may differ from the form
    it was packed from (non-zeros first, as ``compress_2_4`` orders them); the weight they
    describe is the same."""
    from sparseflow.format import compress_2_4

    n, k = shape
    a, b = (0, n) if rows is None else rows
    out_device = device if out_device is None else out_device
    values = torch.empty(b - a, k // 2, dtype=dtype, device=out_device)
    meta = torch.empty(b - a, (k + 7) // 8, dtype=torch.uint8, device=out_device)
    for c0, cols in dense_columns(kernel, layout, n, k, dtype, device):
        cols = cols[a:b]
        part = compress_2_4(cols)
        c1 = c0 + cols.shape[1]
        values[:, c0 // 2 : c1 // 2].copy_(part.values)
        meta[:, c0 // 8 : c0 // 8 + part.meta.shape[1]].copy_(part.meta)
    return values, meta
