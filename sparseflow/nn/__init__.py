"""Drop-in modules holding 2:4-compressed weights."""

from sparseflow.nn.gated_mlp import SparseGatedMLP, fuse_gated_mlps
from sparseflow.nn.linear import SparseLinear, set_memory

__all__ = ["SparseGatedMLP", "SparseLinear", "fuse_gated_mlps", "set_memory"]
