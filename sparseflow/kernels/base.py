"""What every GEMM kernel module offers the rest of SparseFlow.

A kernel reads the weight in its own device layout, derived from the portable ``Sparse24Weight``
(values + 2-bit positions) by ``pack`` and cached on the weight (``Sparse24Weight.layout``). The
dispatcher measures kernels per shape; ``sparseflow.ops`` resolves a route once per (weight,
M-bucket, backend) and then calls ``run`` directly, so ``run`` is the hot path: it does only what
the call needs (no checks the route already made).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable
from typing import Any

import torch


class Kernel(ABC):
    """One GEMM kernel: y = x @ W^T (+ bias) with W read from its own layout."""

    name: str  # the key in ``sparseflow.kernels.KERNELS`` and in ``Sparse24Weight.layout``

    @abstractmethod
    def refusal(self, device: torch.device, dtype: torch.dtype, n: int, k: int) -> str | None:
        """Why this kernel cannot take an N x K ``dtype`` weight on ``device``, or None when it can."""

    @abstractmethod
    def pack(self, weight, key: Hashable = None) -> Any:
        """Build the layout this kernel reads from a ``Sparse24Weight``, on the weight's device.
        ``key`` selects among a kernel's variants of its layout (cuSPARSELt's GEMM layouts)."""

    def cache_key(self, key: Hashable) -> Hashable:
        """Which cached layout ``pack(weight, key)`` builds: keys that read the same bytes share one."""
        return key

    @abstractmethod
    def nbytes(self, layout: Any) -> int:
        """Device bytes ``layout`` holds beyond the portable form."""

    # What ``readback`` runs the kernel with: a configuration valid at every M up to
    # ``readback_rows`` (the decode kernel takes at most 64 rows).
    readback_cfg: Any = None
    readback_rows: int = 1024

    @abstractmethod
    def run(self, x: torch.Tensor, layout: Any, cfg: Any, bias: torch.Tensor | None) -> torch.Tensor:
        """y = x @ W^T + bias for 2-D x (M x K). ``cfg``: the measured configuration (kernel-specific)."""
