"""The GEMM kernels, one module each, and the registry the rest of SparseFlow reaches them by.

* ``dense``: cuBLAS through ``F.linear`` on the decompressed weight (the baseline);
* ``decode``: our ``mma.sp`` kernel for M <= 64 (``csrc/decode/``);
* ``cusparselt``: NVIDIA's cuSPARSELt library (``csrc/cusparselt/``), with its crash-isolated
  algorithm tuner in ``cusparselt_tuner``;
* ``cutlass``: CUTLASS's sm90 kernels, Hopper only (``csrc/cutlass/``).

Each module defines a ``Kernel`` (``base.py``): ``refusal``, ``pack``, ``nbytes``, ``run``. A
weight's layouts are built and cached through ``Sparse24Weight.layout(name)``. ``dispatch``
measures which kernel is fastest per shape and M-bucket; ``timing`` is the GPU timer it and the
benchmarks share.
"""

from __future__ import annotations

from sparseflow.kernels import cusparselt, cutlass, decode, dense
from sparseflow.kernels.base import Kernel

__all__ = ["KERNELS", "Kernel"]

KERNELS: dict[str, Kernel] = {k.name: k for k in (dense.KERNEL, cusparselt.KERNEL, decode.KERNEL, cutlass.KERNEL)}
