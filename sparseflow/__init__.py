"""SparseFlow: 2:4 structured sparsity for PyTorch and Hugging Face models on NVIDIA GPUs."""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it. Attributes resolve on first use (PEP 562), so the
# package itself imports nothing heavy.
_EXPORTS = {
    "extension_available": "sparseflow._ext",
    "SparsifyConfig": "sparseflow.convert",
    "SparsifyError": "sparseflow.convert",
    "report": "sparseflow.convert",
    "sparsify": "sparseflow.convert",
    "CheckpointError": "sparseflow.convert.checkpoint",
    "from_pretrained": "sparseflow.convert.checkpoint",
    "save_pretrained": "sparseflow.convert.checkpoint",
    "DISPATCHER": "sparseflow.kernels.dispatch",
    "autotune": "sparseflow.kernels.dispatch",
    "Sparse24Weight": "sparseflow.format",
    "compress_2_4": "sparseflow.format",
    "decompress_2_4": "sparseflow.format",
    "is_2_4": "sparseflow.format",
    "prune_2_4": "sparseflow.format",
    "SparseLinear": "sparseflow.nn",
    "set_memory": "sparseflow.nn",
    "sparse_mm": "sparseflow.ops",
}
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
    "set_memory",
    "sparse_mm",
    "sparsify",
]

if TYPE_CHECKING:
    from sparseflow._ext import extension_available
    from sparseflow.convert import SparsifyConfig, SparsifyError, report, sparsify
    from sparseflow.convert.checkpoint import CheckpointError, from_pretrained, save_pretrained
    from sparseflow.format import Sparse24Weight, compress_2_4, decompress_2_4, is_2_4, prune_2_4
    from sparseflow.kernels.dispatch import DISPATCHER, autotune
    from sparseflow.nn import SparseLinear, set_memory
    from sparseflow.ops import sparse_mm


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sparseflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


def _entered_as_command() -> bool:
    """Whether this import is the ``sparseflow`` command starting: ``python -m sparseflow``
    imports the package while ``sys.argv[0]`` is still ``"-m"``, the console script is a file
    named ``sparseflow``."""
    argv0 = sys.argv[0] if sys.argv else ""
    return argv0 == "-m" or os.path.basename(argv0) in ("sparseflow", "sparseflow.exe")


# A library import loads everything at once, as users expect: torch's custom ops get registered
# and so does the "sparseflow" quantization method, which lets transformers'
# AutoModel*.from_pretrained read our checkpoints after a bare `import sparseflow`. The command
# line skips this (torch and transformers take seconds to import, `--help` must not wait for
# them); each command imports what it uses, and the attributes above still resolve on demand.
if not _entered_as_command():
    for _module in dict.fromkeys(_EXPORTS.values()):
        importlib.import_module(_module)
    del _module
