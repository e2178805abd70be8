"""Safetensors shards: writing them (with per-tensor checksums) and finding them again.

Layout is Hugging Face's: one ``model.safetensors``, or ``model-0000i-of-0000n.safetensors``
plus ``model.safetensors.index.json`` (``{"metadata": {"total_size": ...}, "weight_map":
{tensor: file}}``) above the size limit, so hub tooling understands the directory. Each file's
header metadata carries ``format=pt`` and a CRC-32 per tensor: a truncated file is caught by
safetensors itself, a file whose bytes were damaged in place by the checksum.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sparseflow.convert.validation import CheckpointError, crc32_of, dtype_from_name

__all__ = [
    "CRC_KEY",
    "INDEX_NAME",
    "SINGLE_NAME",
    "ShardReader",
    "TensorInfo",
    "locate_tensors",
    "parse_size",
    "read_headers",
    "write_shards",
]

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CRC_KEY = "sparseflow.crc32"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """``5_000_000`` or ``"5GB"`` / ``"500MiB"`` -> bytes."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"max_shard_size: cannot parse {size!r} (use bytes or e.g. '5GB', '500MB')")
    return parse_size(int(float(m.group(1)) * _UNITS[m.group(2).upper()]))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _plan(tensors: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    """Greedy, in order: a shard closes when the next tensor would overflow it. A tensor larger
    than the limit gets a shard of its own (as in transformers)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = _nbytes(t)
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def write_shards(
    directory: Path, tensors: dict[str, torch.Tensor], max_shard_size: int | str, metadata: dict[str, str]
) -> dict[str, str]:
    """Write ``tensors`` (no two sharing memory) into ``directory``; return ``{tensor: file}``.

    Only one shard is staged on the host at a time, so saving a GPU model needs host memory
    for the largest shard, not the model.
    """
    plan = _plan(tensors, parse_size(max_shard_size))
    names = (
        [SINGLE_NAME]
        if len(plan) == 1
        else [f"model-{i:05d}-of-{len(plan):05d}.safetensors" for i in range(1, len(plan) + 1)]
    )
    weight_map: dict[str, str] = {}
    for file, keys in zip(names, plan):
        shard = {k: tensors[k].detach().to("cpu").contiguous() for k in keys}
        crcs = {k: crc32_of(t) for k, t in shard.items()}
        save_file(shard, os.fspath(directory / file), metadata={**metadata, "format": "pt", CRC_KEY: json.dumps(crcs)})
        weight_map.update(dict.fromkeys(keys, file))
        del shard
    if len(plan) > 1:
        index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())}, "weight_map": weight_map}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return weight_map


def locate_tensors(directory: Path) -> dict[str, list[str]]:
    """``{file: [tensor names the index puts there]}`` for a checkpoint directory.

    For a single-file checkpoint the list is empty (the file's own header is the authority);
    for a sharded one the index is, and its sanity is checked here.
    """
    index_path = directory / INDEX_NAME
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index_path}: corrupt shard index ({err})") from None
        files: dict[str, list[str]] = {}
        for tensor, file in weight_map.items():
            if not isinstance(file, str) or os.path.basename(file) != file:
                raise CheckpointError(f"{index_path}: tensor {tensor!r} maps to an invalid file name {file!r}")
            files.setdefault(file, []).append(tensor)
        for file in files:
            if not (directory / file).is_file():
                raise CheckpointError(
                    f"{directory / file}: shard file is missing (the index lists tensors in it, e.g. {files[file][0]!r})"
                )
        return files
    if (directory / SINGLE_NAME).is_file():
        return {SINGLE_NAME: []}
    raise CheckpointError(f"{directory}: no {SINGLE_NAME} or {INDEX_NAME} (not a safetensors checkpoint)")


class TensorInfo(NamedTuple):
    """Where a stored tensor lives and what its header says, read before any data is."""

    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    crc32: int | None
    offset: int  # of the tensor's first byte in the file
    nbytes: int


def _open(path: Path):
    try:
        return safe_open(os.fspath(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({err})") from None


def _header(path: Path) -> tuple[int, dict]:
    """(offset of the data section, header JSON) of a safetensors file that safe_open accepted."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return 8 + size, json.loads(f.read(size))


def read_headers(directory: Path) -> dict[str, TensorInfo]:
    """Every stored tensor's file, shape, dtype, checksum and byte range, from the headers alone.

    safetensors validates each header first (a truncated file, bad offsets or garbage fail
    there). Raises :class:`CheckpointError` naming the file (and tensor) for that, a tensor
    stored twice, or a disagreement between the index and a file.
    """
    infos: dict[str, TensorInfo] = {}
    for file, listed in locate_tensors(directory).items():
        path = directory / file
        with _open(path) as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
        try:
            crcs = {k: int(v) for k, v in json.loads(metadata.get(CRC_KEY, "{}")).items()}
        except (ValueError, TypeError, AttributeError):
            raise CheckpointError(f"{path}: corrupt header metadata ({CRC_KEY!r} is not a JSON map)") from None
        start, header = _header(path)
        for name in keys:
            if name in infos:
                raise CheckpointError(f"{path}: tensor {name!r} is also stored in {directory / infos[name].file}")
            entry = header[name]
            dtype = dtype_from_name(entry["dtype"], f"{path}: tensor {name!r}")
            begin, end = entry["data_offsets"]
            infos[name] = TensorInfo(file, tuple(entry["shape"]), dtype, crcs.get(name), start + begin, end - begin)
        if listed:
            extra = sorted(set(keys) - set(listed))
            if extra:
                raise CheckpointError(f"{path}: extra tensor {extra[0]!r} that {INDEX_NAME} does not list")
            absent = sorted(set(listed) - set(keys))
            if absent:
                raise CheckpointError(f"{path}: missing tensor {absent[0]!r} ({INDEX_NAME} says it is in this file)")
    return infos


class ShardReader:
    """Reads stored tensors one at a time into fresh CPU tensors, checking checksums.

    Plain ``readinto`` from the file (no memory map): the bytes land once, in memory that
    torch allocated (aligned, so CPU kernels give bit-identical results to a model built in
    memory), and the page cache they pass through is not the process's memory. Loading onto
    a GPU therefore holds at most one tensor on the host at a time. A file is opened for its
    first tensor and closed after its last.
    """

    def __init__(self, directory: Path, infos: dict[str, TensorInfo], wanted: list[str], verify: bool = True):
        self.directory, self.infos, self.verify = directory, infos, verify
        self._left: dict[str, int] = {}
        for name in wanted:
            self._left[infos[name].file] = self._left.get(infos[name].file, 0) + 1
        self._open: dict[str, object] = {}

    def get(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        path = self.directory / info.file
        handle = self._open.get(info.file)
        if handle is None:
            handle = self._open[info.file] = open(path, "rb", buffering=0)  # noqa: SIM115 - closed in close()
        tensor = torch.empty(info.shape, dtype=info.dtype)
        if tensor.numel() * tensor.element_size() != info.nbytes:
            raise CheckpointError(f"{path}: tensor {name!r}: its byte range does not match its shape and dtype")
        if info.nbytes:
            buf = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            handle.seek(info.offset)
            done = 0
            while done < info.nbytes:
                n = handle.readinto(buf[done:])
                if not n:
                    raise CheckpointError(f"{path}: truncated while reading tensor {name!r}")
                done += n
        if self.verify and info.crc32 is not None and crc32_of(tensor) != info.crc32:
            raise CheckpointError(f"{path}: tensor {name!r} is corrupt (its bytes do not match the stored CRC-32)")
        self._left[info.file] -= 1
        if self._left[info.file] == 0:
            self._open.pop(info.file).close()
        return tensor

    def close(self) -> None:
        for handle in self._open.values():
            handle.close()
        self._open.clear()
