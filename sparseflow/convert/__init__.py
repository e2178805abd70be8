"""Whole-model conversion: ``sparsify(model)`` prunes, compresses and swaps in 2:4 ``SparseLinear``s."""

from sparseflow.convert.api import SparsifyConfig, SparsifyError, report, sparsify
from sparseflow.convert.calibration import text_windows
from sparseflow.convert.report import LayerReport, SparsifyReport
from sparseflow.convert.walker import shape_rule

__all__ = [
    "LayerReport",
    "SparsifyConfig",
    "SparsifyError",
    "SparsifyReport",
    "report",
    "shape_rule",
    "sparsify",
    "text_windows",
]
