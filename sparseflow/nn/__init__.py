"""Drop-in modules holding 2:4-compressed weights."""

from sparseflow.nn.linear import SparseLinear

__all__ = ["SparseLinear"]
