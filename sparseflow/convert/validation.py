"""Checks run on a checkpoint while it loads, and the one error type they raise.

A damaged checkpoint must fail loudly and say where: every error names the file and the
tensor. The checks are split so the cheap ones (names, shapes, dtypes: header only) run on
every file before any tensor data is read, and the data checks (checksums, 2:4 metadata)
run tensor by tensor as the data arrives, without materialising anything large.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from sparseflow.format import Sparse24Weight

__all__ = ["CheckpointError", "check_meta", "crc32_of", "dtype_from_name", "dtype_name"]

# safetensors header dtype codes -> torch dtypes (the ones a model checkpoint can hold).
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"), ("U32", "uint32")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_code] = getattr(torch, _attr)

_META_CHUNK_BYTES = 1 << 20  # bound on the temporaries of one metadata check (freed memory is not always
# returned to the OS, so larger temporaries would show up in the loader's peak RSS)


def _valid_tables() -> tuple[np.ndarray, np.ndarray]:
    """Per meta byte: both nibbles valid; low nibble valid (for a row's padded last byte).
    A nibble i0 | i1 << 2 is valid iff i0 < i1 (both are 2-bit, so nothing else can go wrong)."""
    nib = np.array([(n & 3) < (n >> 2) for n in range(16)])
    byte = np.arange(256)
    return nib[byte & 15] & nib[byte >> 4], nib[byte & 15]


_VALID_BYTE, _VALID_LOW = _valid_tables()


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is: truncated, corrupt, incomplete or inconsistent."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"`` (the spelling config.json uses)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str | torch.dtype, what: str = "dtype") -> torch.dtype:
    """Inverse of :func:`dtype_name`; also accepts safetensors codes (``"F16"``) and torch dtypes."""
    if isinstance(name, torch.dtype):
        return name
    if name in _ST_DTYPES:
        return _ST_DTYPES[name]
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"{what}: unknown dtype {name!r}")
    return dtype


def crc32_of(tensor: torch.Tensor) -> int:
    """CRC-32 of a CPU tensor's bytes (as stored in safetensors: contiguous, little-endian)."""
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return 0
    return zlib.crc32(flat.view(torch.uint8).numpy())


def check_meta(meta: torch.Tensor, shape: tuple[int, int], where: str) -> None:
    """Raise :class:`CheckpointError` if any 2:4 position pair in ``meta`` is invalid.

    A fast pass on the packed bytes (a byte table on the CPU, bit tests on a GPU, over chunks
    of rows so loading holds at most a few MB extra); only when it finds a bad group does it ask
    ``Sparse24Weight.validate()`` for the detailed row/group message.
    """
    n, k = shape
    odd = (k // 4) % 2  # an odd number of groups leaves a padding nibble in each row's last byte
    rows = max(1, _META_CHUNK_BYTES // max(1, meta.shape[1]))
    for start in range(0, n, rows):
        chunk = meta[start : start + rows]
        if chunk.device.type == "cpu":  # a 256-entry table: the fastest check on the CPU
            arr = chunk.numpy()
            ok = bool(_VALID_BYTE[arr[:, :-1] if odd else arr].all()) and (
                not odd or bool(_VALID_LOW[arr[:, -1]].all())
            )
        else:
            hi = chunk[:, :-1] if odd else chunk
            ok = bool(((chunk & 3) < ((chunk >> 2) & 3)).all()) and bool((((hi >> 4) & 3) < (hi >> 6)).all())
        if not ok:
            values = torch.zeros(1, dtype=torch.uint8, device=meta.device).expand(n, k // 2)  # shape only
            try:
                Sparse24Weight(values, meta, shape).validate()
            except ValueError as err:
                raise CheckpointError(f"{where}: out-of-range 2:4 indices: {err}") from None
            raise CheckpointError(f"{where}: out-of-range 2:4 indices (invalid position nibble)")
