"""The compiled extension (``sparseflow._C``), if this install built it, and one-time warnings."""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings

import torch

_C = None
EXT_ERROR: str | None = None
if importlib.util.find_spec("sparseflow._C") is None:  # CPU-only install: the reference path serves every call
    EXT_ERROR = "sparseflow._C was not built by this install"
else:  # built by setup.py where CUDA torch, nvcc and cuSPARSELt were present
    try:
        from sparseflow import _C  # type: ignore[attr-defined]
    except ImportError as exc:  # built, but does not load (e.g. against another torch)
        EXT_ERROR = f"sparseflow._C does not load: {exc}"

# CUTLASS's sm90 2:4 GEMM (csrc/cutlass/; sparseflow.kernels.cutlass): built beside _C where CUTLASS's
# headers were found (pip install nvidia-cutlass); runs on sm_90 (Hopper) only.
_CUTLASS = None
CUTLASS_ERROR: str | None = None
if importlib.util.find_spec("sparseflow._cutlass") is None:
    CUTLASS_ERROR = "sparseflow._cutlass was not built by this install (CUTLASS headers not found at build time)"
else:
    try:
        _CUTLASS = importlib.import_module("sparseflow._cutlass")
    except ImportError as exc:
        CUTLASS_ERROR = f"sparseflow._cutlass does not load: {exc}"

# How the 2:4 GEMM is posed to cuSPARSELt (csrc/cusparselt/cusparselt_gemm.cpp): 0 sparse A with a
# column-major output, 1 sparse A with a row-major y^T output transposed afterwards, 2 sparse B;
# 3 and 4 are 1 and 0 with x described as PyTorch describes it (M x K row-major, op T).
# sparseflow.kernels.cusparselt.cslt_layout picks one per M; SPARSEFLOW_CSLT_LAYOUT forces one for all M.
CSLT_LAYOUT_OVERRIDE = os.environ.get("SPARSEFLOW_CSLT_LAYOUT")


def env_number(name: str, default: float) -> float:
    """A non-negative number from the environment variable ``name`` (``default`` when unset);
    anything else is a ``ValueError`` that names the variable."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise ValueError(f"{name} must be a non-negative number, got {raw!r}")
    return value


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def extension_available() -> bool:
    """True when the CUDA extension (cuSPARSELt GEMM, format kernels) was built and imports."""
    return _C is not None


_CAPABILITY: dict[int, tuple[int, int]] = {}


def device_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) of a CUDA device, asked of torch once per device: every call's backend
    check reads it, and torch's query costs microseconds of host time each time."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    cap = _CAPABILITY.get(index)
    if cap is None:
        cap = _CAPABILITY[index] = tuple(torch.cuda.get_device_capability(index))
    return cap


def sparse_unavailable_reason(device: torch.device) -> str | None:
    """Why the sparse GPU path cannot run on ``device``, or None when it can."""
    if device.type != "cuda":
        return f"tensors are on {device}, the 2:4 kernels run on CUDA GPUs"
    if _C is None:
        return f"the CUDA extension is not built ({EXT_ERROR}); reinstall with `pip install --no-build-isolation -e .`"
    major, minor = device_capability(device)
    if major < 8:
        return f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}; 2:4 sparse tensor cores need sm_80 or newer"
    return None
