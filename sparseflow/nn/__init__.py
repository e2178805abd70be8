"""Drop-in modules holding 2:4-compressed weights."""

from sparseflow.nn.gated_mlp import SparseGatedMLP, fuse_gated_mlps
from sparseflow.nn.linear import SparseLinear, set_memory
from sparseflow.nn.projections import ProjectionGroup, fuse_projections

__all__ = ["ProjectionGroup", "SparseGatedMLP", "SparseLinear", "fuse_gated_mlps", "fuse_projections", "set_memory"]
