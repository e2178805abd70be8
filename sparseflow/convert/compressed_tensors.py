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

Many published 2:4 models are instead stored dense: ``sparsity_config.format = "dense"`` with
``sparsity_structure = "2:4"``, every targeted layer a plain ``X.weight`` that is 2:4 in its
values. Those are read too: each targeted layer is checked and compressed as it is read, one
at a time, so no dense 2:4 weight outlives its own conversion.

The config is data, never code: the format names are compared against the two above and
nothing a config names is imported, looked up or run (compressed-tensors itself resolves
formats through a registry; a config is not trusted to pick code here).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparseflow.convert import checkpoint as ck
from sparseflow.convert.atomic import atomic_directory, refuse_existing
from sparseflow.convert.shards import ShardReader, read_headers, write_shards
from sparseflow.convert.validation import CheckpointError
from sparseflow.format import compress_2_4
from sparseflow.nn import SparseLinear

__all__ = [
    "bitmask_to_meta",
    "is_sparse24_config",
    "load_compressed_tensors",
    "meta_to_bitmask",
    "save_compressed_tensors",
    "sparsity_format",
]

FORMAT = "sparse-24-bitmask"
DENSE = "dense"  # weights stored as they are, the 2:4 pattern in their zeros
FORMATS = (FORMAT, DENSE)
# config.json keys a compressed-tensors section is found under; compression_config is the older name.
CONFIG_KEYS = ("quantization_config", "compression_config")
_ROWS = 1024  # rows of a dense weight checked and compressed at a time (bounds the temporaries)
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


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _section(raw_config: dict) -> tuple[str, dict] | None:
    """(key, section) of config.json's compressed-tensors section, or None."""
    for key in CONFIG_KEYS:
        qc = raw_config.get(key)
        if isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors":
            return key, qc
    return None


def sparsity_format(raw_config: dict, where: str | os.PathLike = "config.json") -> str | None:
    """How a compressed-tensors checkpoint stores its 2:4 layers: :data:`FORMAT` or :data:`DENSE`;
    None when config.json has no compressed-tensors section at all.

    Raises :class:`CheckpointError` for a compressed-tensors section this reader cannot honour
    (no 2:4 sparsity, an unknown format). The format is only compared with the known names.
    """
    found = _section(raw_config)
    if found is None:
        return None
    key, qc = found
    sc = qc.get("sparsity_config")
    if not isinstance(sc, dict):
        raise CheckpointError(
            f"{where}: a compressed-tensors {key} without a sparsity_config; only 2:4 sparse checkpoints are read"
        )
    fmt = sc.get("format")
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise CheckpointError(
            f"{where}: {key}.sparsity_config.format is {_shown(fmt)}; sparseflow reads {' and '.join(FORMATS)} "
            "only (a format is never looked up or imported by name)"
        )
    if fmt == DENSE and sc.get("sparsity_structure") != "2:4":
        raise CheckpointError(
            f"{where}: {key}.sparsity_config.sparsity_structure is {_shown(sc.get('sparsity_structure'))}, "
            "not '2:4': only 2:4 sparse checkpoints are read"
        )
    return fmt


def is_sparse24_config(raw_config: dict) -> bool:
    """Whether a config.json dict describes a compressed-tensors sparse-24-bitmask checkpoint."""
    try:
        return sparsity_format(raw_config) == FORMAT
    except CheckpointError:
        return False


def _patterns(sc: dict, key: str, where: str) -> list[str]:
    value = sc.get(key, [] if key == "ignore" else None)
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise CheckpointError(f"{where}: sparsity_config.{key} must be a list of strings, got {_shown(value)}")
    for p in value:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as err:
                raise CheckpointError(f"{where}: sparsity_config.{key}: bad pattern {_shown(p)} ({err})") from None
    return value


def _matches(name: str, module: nn.Module, patterns: list[str]) -> bool:
    """compressed-tensors' target rule: a layer class name, an exact module name, or
    ``re:<regex>`` matched at the start of the module name."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif p in (name, type(module).__name__):
            return True
    return False


def targeted_linears(model: nn.Module, sparsity_config: dict, where: str) -> list[str]:
    """The ``nn.Linear`` modules a ``sparsity_config`` declares 2:4 (``targets`` minus ``ignore``)."""
    targets = _patterns(sparsity_config, "targets", where)
    ignore = _patterns(sparsity_config, "ignore", where)
    return [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and _matches(name, mod, targets) and not _matches(name, mod, ignore)
    ]


# ----------------------------------------------------------------------------------------- read


def load_compressed_tensors(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device_map: ck.DeviceMap = None,
    *,
    max_memory: dict | None = None,
    model_class: type | None = None,
    verify_checksums: bool = True,
    memory: str = "compact",
) -> nn.Module:
    """Load a compressed-tensors 2:4 checkpoint (``sparse-24-bitmask``, or ``dense`` with a 2:4
    ``sparsity_structure``) with its 2:4 layers as ``SparseLinear``.

    Same loader as :func:`sparseflow.from_pretrained` (meta skeleton, tensor by tensor onto
    the device, every tensor checked). ``sparse-24-bitmask``: the 2:4 layers are the ones whose
    ``.compressed``/``.bitmask``/``.shape`` triples the files hold. ``dense``: the linears that
    ``sparsity_config`` targets; each must be 2:4, else :class:`CheckpointError` names it.
    """
    path = Path(path)
    where = path / "config.json"
    raw = ck._read_config_json(path)
    fmt = sparsity_format(raw, where)
    if fmt is None:
        raise CheckpointError(f"{where}: not a compressed-tensors 2:4 checkpoint")
    key, qc = _section(raw)
    if qc.get("config_groups"):
        raise CheckpointError(f"{where}: 2:4 combined with quantization ({key}.config_groups) is not supported")
    infos = read_headers(path)
    target_dtype = None if dtype in (None, "auto") else ck.dtype_from_name(dtype)
    if fmt == DENSE:
        model, tied, layers = _dense_skeleton(path, qc["sparsity_config"], infos, target_dtype, model_class)
    else:
        model, tied, layers = _bitmask_skeleton(path, infos, target_dtype, model_class)
    devices = ck.resolve_device_map(model, device_map, max_memory)
    expected = {n: t for n, t in model.state_dict(keep_vars=True).items() if n not in tied}
    # Stored name -> the model tensor it becomes (2:4 parts renamed; `.shape` and dense 2:4
    # weights are checked here by hand, the rest by the common checks).
    rename = {}
    by_hand = set()
    for layer in layers:
        if fmt == DENSE:
            by_hand.add(f"{layer}.weight")
            expected.pop(f"{layer}.weight_values")
            expected.pop(f"{layer}.weight_meta")
        else:
            rename[f"{layer}.compressed"] = f"{layer}.weight_values"
            rename[f"{layer}.bitmask"] = f"{layer}.weight_meta"
            by_hand.add(f"{layer}.shape")
    for name in sorted(by_hand):
        if name not in infos:
            raise CheckpointError(f"{path}: missing tensor {name!r}; the model needs it and it is not in any shard")
    as_model = {rename.get(n, n): info for n, info in infos.items() if n not in by_hand}
    ck.check_names(path, as_model, expected)
    for name, info in as_model.items():
        ck.check_header(path, name, info, expected[name], None)
    order = sorted(infos, key=lambda n: infos[n].file)
    reader = ShardReader(path, infos, order, verify=verify_checksums)
    try:
        for name in order:
            tensor = reader.get(name)
            where_t = f"{path / infos[name].file}: tensor {name!r}"
            layer, _, part = name.rpartition(".")
            if name in by_hand and part == "shape":
                mod = model.get_submodule(layer)
                if tensor.numel() != 2 or [int(v) for v in tensor.flatten()] != [mod.out_features, mod.in_features]:
                    raise CheckpointError(
                        f"{where_t} is {tensor.flatten().tolist()} but the config implies "
                        f"{[mod.out_features, mod.in_features]}"
                    )
                continue
            if name in by_hand:  # a dense 2:4 weight: checked, compressed, and dropped here
                values, meta = _compress_dense(tensor, model.get_submodule(layer), where_t, layer)
                del tensor
                ck.place(model, f"{layer}.weight_values", values, devices, target_dtype)
                ck.place(model, f"{layer}.weight_meta", meta, devices, None)
                continue
            if layer in layers and part == "bitmask":
                tensor = bitmask_to_meta(tensor, model.get_submodule(layer).in_features, where_t)
            ck.place(model, rename.get(name, name), tensor, devices, target_dtype)
    finally:
        reader.close()
    ck.finish(model, tied, devices, device_map, memory)
    # The model in memory is a sparseflow model now: drop the compressed-tensors config so a
    # later save writes ours (and transformers does not try compressed-tensors on it).
    for key in CONFIG_KEYS:
        if hasattr(model.config, key):
            delattr(model.config, key)
    return model


def _tied_away(model: nn.Module, infos: dict) -> dict[str, str]:
    """``{alias: stored name}`` of the model's tied weights whose alias the files leave out."""
    return {
        alias: target
        for alias, target in (getattr(model, "all_tied_weights_keys", None) or {}).items()
        if alias not in infos and target in infos
    }


def _bitmask_skeleton(path: Path, infos: dict, target_dtype, model_class):
    layers = sorted({n.rpartition(".")[0] for n in infos if n.rpartition(".")[2] in _PARTS})
    for layer in layers:
        for part in _PARTS:
            if f"{layer}.{part}" not in infos:
                raise CheckpointError(f"{path}: missing tensor {layer}.{part!s} (the other 2:4 parts of {layer} exist)")
    stored_dtype = infos[f"{layers[0]}.compressed"].dtype if layers else None
    model = ck.build_skeleton(path, layers, target_dtype or stored_dtype, model_class, {})
    tied = _tied_away(model, infos)
    ck.tie(model, tied)
    return model, tied, layers


def _dense_skeleton(path: Path, sparsity_config: dict, infos: dict, target_dtype, model_class):
    """The skeleton with the targeted linears as (meta) ``SparseLinear``. A targeted weight that
    is tied to another tensor (a head sharing the embedding) stays dense: converting it would
    untie them."""
    where = str(path / "config.json")
    floats = Counter(i.dtype for i in infos.values() if i.dtype.is_floating_point)
    stored_dtype = floats.most_common(1)[0][0] if floats else None
    model = ck.build_skeleton(path, [], target_dtype or stored_dtype, model_class, {})
    tied = _tied_away(model, infos)
    layers = [n for n in targeted_linears(model, sparsity_config, where) if f"{n}.weight" not in tied]
    if not layers:
        raise CheckpointError(f"{where}: sparsity_config targets no nn.Linear of the model: nothing is 2:4")
    for layer in layers:
        info = infos.get(f"{layer}.weight")
        dtype = target_dtype or (info.dtype if info is not None and info.dtype.is_floating_point else stored_dtype)
        ck.swap_in_sparse(model, layer, dtype, path / "config.json")
    ck.tie(model, tied)
    return model, tied, layers


def _compress_dense(
    weight: torch.Tensor, mod: SparseLinear, where: str, layer: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, meta) of a dense weight that the config says is 2:4, row block by row block
    (the temporaries stay small); :class:`CheckpointError` at the first group that is not 2:4."""
    n, k = mod.out_features, mod.in_features
    if tuple(weight.shape) != (n, k):
        raise CheckpointError(f"{where} has shape {list(weight.shape)} but the config implies {[n, k]}")
    if not weight.is_floating_point():
        raise CheckpointError(f"{where} has dtype {weight.dtype}; a 2:4 weight must be floating point")
    values, metas = [], []
    for start in range(0, n, _ROWS):
        block = weight[start : start + _ROWS]
        bad = ((block.reshape(block.shape[0], k // 4, 4) != 0).sum(-1) > 2).nonzero()
        if len(bad):
            row, group = (int(v) for v in bad[0])
            raise CheckpointError(
                f"{where}: layer {layer!r} is not 2:4 although sparsity_config says so: row {start + row}, "
                f"columns {4 * group}..{4 * group + 3} hold more than 2 non-zeros"
            )
        compressed = compress_2_4(block)
        values.append(compressed.values)
        metas.append(compressed.meta)
    return torch.cat(values), torch.cat(metas)


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
            # the state_dict's meta: a compact layer's buffers are placeholders on the GPU
            out[f"{layer}.bitmask"] = meta_to_bitmask(tensors[f"{layer}.weight_meta"], mod.in_features)
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
