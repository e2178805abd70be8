"""Read and write compressed-tensors ``sparse-24-bitmask`` checkpoints (llm-compressor's 2:4 output).

Per 2:4 layer ``X`` such a checkpoint stores ``X.compressed`` (N x K/2: the kept values of each
row in column order), ``X.bitmask`` (N x ceil(K/8) uint8: bit ``c % 8`` of byte ``c // 8`` set
when column ``c`` is kept, numpy ``packbits(bitorder="little")``) and ``X.shape`` ([[N], [K]]),
with ``quantization_config.sparsity_config.format = "sparse-24-bitmask"`` in config.json.
``X.compressed`` is exactly our ``weight_values``; ``X.bitmask`` and our ``weight_meta`` have
the same size and the same byte -> two groups layout, so converting is a 256-entry byte table
in each direction, with no dense tensor ever built.

compressed-tensors itself dropped this format after 0.14 (0.15+ refuses such configs), so
these checkpoints are read here and written for the tools that still serve them (vLLM's
2:4 path, compressed-tensors <= 0.14).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparseflow.convert import checkpoint as ck
from sparseflow.convert.atomic import atomic_directory, refuse_existing
from sparseflow.convert.shards import ShardReader, read_headers, write_shards
from sparseflow.convert.validation import CheckpointError
from sparseflow.nn import SparseLinear

__all__ = [
    "bitmask_to_meta",
    "is_sparse24_config",
    "load_compressed_tensors",
    "meta_to_bitmask",
    "save_compressed_tensors",
]

FORMAT = "sparse-24-bitmask"
WRITTEN_VERSION = "0.14.0"  # the last compressed-tensors release that reads this format
_PARTS = ("compressed", "bitmask", "shape")


def _tables() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Byte tables: bitmask byte -> meta byte; bitmask byte -> both nibbles keep 2 bits;
    meta byte -> bitmask byte; bitmask nibble -> keeps 2 bits."""
    nib_to_meta = torch.zeros(16, dtype=torch.uint8)
    nib_valid = torch.zeros(16, dtype=torch.bool)
    meta_to_nib = torch.zeros(16, dtype=torch.uint8)
    for i0 in range(4):
        for i1 in range(i0 + 1, 4):
            bits = (1 << i0) | (1 << i1)
            nib_to_meta[bits] = i0 | (i1 << 2)
            nib_valid[bits] = True
            meta_to_nib[i0 | (i1 << 2)] = bits
    b = torch.arange(256)
    to_meta = nib_to_meta[b & 0xF] | (nib_to_meta[b >> 4] << 4)
    valid = nib_valid[b & 0xF] & nib_valid[b >> 4]
    to_mask = meta_to_nib[b & 0xF] | (meta_to_nib[b >> 4] << 4)
    return to_meta, valid, to_mask, nib_valid


_TO_META, _VALID, _TO_MASK, _NIB_VALID = _tables()


def bitmask_to_meta(bitmask: torch.Tensor, k: int, where: str = "bitmask") -> torch.Tensor:
    """compressed-tensors bitmask (N x ceil(K/8) uint8) -> our packed 2:4 metadata (same shape).

    Raises :class:`CheckpointError` unless every group of 4 columns keeps exactly 2.
    """
    if bitmask.dtype != torch.uint8 or bitmask.dim() != 2 or bitmask.shape[1] != (k + 7) // 8:
        raise CheckpointError(f"{where}: expected N x {(k + 7) // 8} uint8, got {list(bitmask.shape)} {bitmask.dtype}")
    idx = bitmask.long()
    meta = _TO_META.to(bitmask.device)[idx]
    valid = _VALID.to(bitmask.device)[idx]
    if (k // 4) % 2:  # the last byte's high nibble is padding (zero bits)
        valid[:, -1] = _NIB_VALID.to(bitmask.device)[idx[:, -1] & 0xF] & ((idx[:, -1] >> 4) == 0)
    if not bool(valid.all()):
        row, col = (int(v) for v in (~valid).nonzero()[0])
        raise CheckpointError(
            f"{where}: not 2:4: row {row}, columns {8 * col}..{8 * col + 7} keep bits {int(bitmask[row, col]):08b} "
            "(each group of 4 must keep exactly 2)"
        )
    return meta


def meta_to_bitmask(meta: torch.Tensor, k: int) -> torch.Tensor:
    """Our packed 2:4 metadata -> compressed-tensors bitmask (exact inverse of :func:`bitmask_to_meta`)."""
    mask = _TO_MASK.to(meta.device)[meta.long()]
    if (k // 4) % 2:
        mask[:, -1] &= 0x0F
    return mask


def is_sparse24_config(raw_config: dict) -> bool:
    """Whether a config.json dict describes a compressed-tensors sparse-24-bitmask checkpoint."""
    qc = raw_config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
        return False
    sc = qc.get("sparsity_config")
    return isinstance(sc, dict) and sc.get("format") == FORMAT


# ----------------------------------------------------------------------------------------- read


def load_compressed_tensors(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device_map: ck.DeviceMap = None,
    *,
    max_memory: dict | None = None,
    model_class: type | None = None,
    verify_checksums: bool = True,
) -> nn.Module:
    """Load a ``sparse-24-bitmask`` checkpoint with its 2:4 layers as ``SparseLinear``.

    Same loader as :func:`sparseflow.from_pretrained` (meta skeleton, tensor by tensor onto
    the device, every tensor checked); the 2:4 layers are the ones whose
    ``.compressed``/``.bitmask``/``.shape`` triples the files hold.
    """
    path = Path(path)
    raw = ck._read_config_json(path)
    if not is_sparse24_config(raw):
        raise CheckpointError(f"{path / 'config.json'}: not a compressed-tensors {FORMAT} checkpoint")
    if raw["quantization_config"].get("config_groups"):
        raise CheckpointError(f"{path / 'config.json'}: 2:4 combined with quantization is not supported")
    infos = read_headers(path)
    layers = sorted({n.rpartition(".")[0] for n in infos if n.rpartition(".")[2] in _PARTS})
    for layer in layers:
        for part in _PARTS:
            if f"{layer}.{part}" not in infos:
                raise CheckpointError(f"{path}: missing tensor {layer}.{part!s} (the other 2:4 parts of {layer} exist)")
    target_dtype = None if dtype in (None, "auto") else ck.dtype_from_name(dtype)
    stored_dtype = infos[f"{layers[0]}.compressed"].dtype if layers else None
    model = ck.build_skeleton(path, layers, target_dtype or stored_dtype, model_class, {})
    tied = {
        alias: target
        for alias, target in (getattr(model, "all_tied_weights_keys", None) or {}).items()
        if alias not in infos and target in infos
    }
    ck.tie(model, tied)
    devices = ck.resolve_device_map(model, device_map, max_memory)
    expected = {n: t for n, t in model.state_dict(keep_vars=True).items() if n not in tied}
    # Stored name -> the model tensor it becomes (2:4 parts renamed, `.shape` only checked).
    rename = {}
    for layer in layers:
        rename[f"{layer}.compressed"] = f"{layer}.weight_values"
        rename[f"{layer}.bitmask"] = f"{layer}.weight_meta"
    as_model = {rename.get(n, n): info for n, info in infos.items() if not n.endswith(".shape") or n[:-6] not in layers}
    ck.check_names(path, as_model, expected)
    for name, info in as_model.items():
        ck.check_header(path, name, info, expected[name], None)
    order = sorted(infos, key=lambda n: infos[n].file)
    reader = ShardReader(path, infos, order, verify=verify_checksums)
    try:
        for name in order:
            tensor = reader.get(name)
            where = f"{path / infos[name].file}: tensor {name!r}"
            layer, _, part = name.rpartition(".")
            if layer in layers and part == "shape":
                mod = model.get_submodule(layer)
                if tensor.numel() != 2 or [int(v) for v in tensor.flatten()] != [mod.out_features, mod.in_features]:
                    raise CheckpointError(
                        f"{where} is {tensor.flatten().tolist()} but the config implies "
                        f"{[mod.out_features, mod.in_features]}"
                    )
                continue
            if layer in layers and part == "bitmask":
                tensor = bitmask_to_meta(tensor, model.get_submodule(layer).in_features, where)
            ck.place(model, rename.get(name, name), tensor, devices, target_dtype)
    finally:
        reader.close()
    ck.finish(model, tied, devices, device_map)
    # The model in memory is a sparseflow model now: drop the compressed-tensors config so a
    # later save writes ours (and transformers does not try compressed-tensors on it).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


# ---------------------------------------------------------------------------------------- write


def save_compressed_tensors(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a compressed-tensors ``sparse-24-bitmask`` checkpoint (atomically).

    Config as compressed-tensors' own ``ModelCompressor.update_config`` writes it: sparsity
    targets ``["Linear"]`` with every dense ``nn.Linear`` listed under ``ignore``. An existing
    checkpoint at ``save_directory`` is refused unless ``overwrite=True``.
    """
    import copy

    what = "save_pretrained(format='compressed-tensors')"
    if not overwrite:
        refuse_existing(save_directory, what)
    config = copy.deepcopy(ck._model_config(model, what))
    ck.check_quantization_config(model, config, what)
    tensors, _ = ck.split_tied(model.state_dict())  # tied aliases dropped, as transformers does
    sparse = {name: mod for name, mod in model.named_modules() if isinstance(mod, SparseLinear)}
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        layer, _, attr = name.rpartition(".")
        mod = sparse.get(layer)
        if mod is None:
            out[name] = t
        elif attr == "weight_values":
            out[f"{layer}.compressed"] = t
            out[f"{layer}.bitmask"] = meta_to_bitmask(mod.weight_meta, mod.in_features)
            out[f"{layer}.shape"] = torch.tensor([[mod.out_features], [mod.in_features]])
        elif attr == "bias":
            out[name] = t
    dense_linears = sorted(name for name, mod in model.named_modules() if isinstance(mod, nn.Linear))
    # Fraction of zero weights in the model, counting each 2:4 weight at its dense size.
    zeros = sum(mod.out_features * mod.in_features // 2 for mod in sparse.values())
    dense = sum(t.numel() for n, t in tensors.items() if t.is_floating_point() and not n.endswith(".weight_values"))
    total = dense + 2 * zeros
    config.architectures = [type(model).__name__]
    config.quantization_config = {
        "quant_method": "compressed-tensors",
        "version": WRITTEN_VERSION,
        "sparsity_config": {
            "format": FORMAT,
            "sparsity_structure": "2:4",
            "targets": ["Linear"],
            "ignore": dense_linears,
            "global_sparsity": zeros / total if total else 0.0,
            "registry_requires_subclass": False,
        },
        "transform_config": {},
    }
    if hasattr(config, ck.SECTION):
        delattr(config, ck.SECTION)
    with atomic_directory(save_directory) as tmp:
        write_shards(tmp, out, max_shard_size, {})
        config.save_pretrained(tmp)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and ck._can_generate(model):
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(save_directory)
