"""SparseFlow: 2:4 structured sparsity for PyTorch and Hugging Face models on NVIDIA GPUs."""

from sparseflow._ext import extension_available
from sparseflow.convert import SparsifyConfig, SparsifyError, report, sparsify
from sparseflow.convert.checkpoint import CheckpointError, from_pretrained, save_pretrained
from sparseflow.format import Sparse24Weight, compress_2_4, decompress_2_4, is_2_4, prune_2_4
from sparseflow.kernels.dispatch import DISPATCHER, autotune
from sparseflow.nn import SparseLinear
from sparseflow.ops import sparse_mm

__version__ = "0.1.0"
__all__ = [
    "DISPATCHER",
    "CheckpointError",
    "Sparse24Weight",
    "SparseLinear",
    "SparsifyConfig",
    "SparsifyError",
    "autotune",
    "compress_2_4",
    "decompress_2_4",
    "extension_available",
    "from_pretrained",
    "is_2_4",
    "prune_2_4",
    "report",
    "save_pretrained",
    "sparse_mm",
    "sparsify",
]
