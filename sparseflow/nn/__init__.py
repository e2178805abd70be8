"""Drop-in modules holding 2:4-compressed weights."""

from sparseflow.nn.attention import register_packed_gqa
from sparseflow.nn.gated_mlp import SparseGatedMLP, fuse_gated_mlps
from sparseflow.nn.linear import SparseLinear, set_memory
from sparseflow.nn.projections import ProjectionGroup, fuse_projections

__all__ = [
    "ProjectionGroup",
    "SparseGatedMLP",
    "SparseLinear",
    "fuse_gated_mlps",
    "fuse_projections",
    "register_packed_gqa",
    "set_memory",
]
