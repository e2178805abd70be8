"""``save_pretrained`` / ``from_pretrained`` for models holding :class:`~sparseflow.nn.SparseLinear` layers.

On disk a checkpoint is a Hugging Face model directory: ``config.json`` (the model's own config
plus a ``"sparseflow"`` section), safetensors weights (never pickle), sharded with HF's index
above a size limit. A 2:4 layer is stored exactly as its ``state_dict`` holds it
(``<layer>.weight_values``, ``<layer>.weight_meta``, ``<layer>.bias``): the portable form,
0.5625x the dense bytes. Loading builds the model skeleton on the meta device, swaps in
``SparseLinear`` where the config says, and reads tensor by tensor straight onto each
tensor's device, so peak memory is about the compressed size, never the dense size. Every
tensor is checked against the config on the way (see :mod:`sparseflow.convert.validation`):
a missing tensor is an error, never a silent random initialisation.
"""

from __future__ import annotations

import copy
import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparseflow.convert import hf_quantizer as _hf_quantizer  # noqa: F401 - registers quant_method "sparseflow"
from sparseflow.convert.atomic import atomic_directory, interrupted_saves, refuse_existing
from sparseflow.convert.shards import ShardReader, TensorInfo, read_headers, write_shards
from sparseflow.convert.validation import CheckpointError, check_meta, dtype_from_name, dtype_name
from sparseflow.nn import SparseLinear, fuse_gated_mlps, fuse_projections
from sparseflow.nn.linear import _check_memory

__all__ = ["FORMAT_VERSION", "SECTION", "CheckpointError", "from_pretrained", "save_pretrained"]

FORMAT_VERSION = 1
SECTION = "sparseflow"  # config.json key of our section
QUANT_METHOD = "sparseflow"  # quantization_config.quant_method, routes transformers to our quantizer
DeviceMap = str | int | torch.device | dict[str, Any] | None


# ----------------------------------------------------------------------------------------- save


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    *,
    max_shard_size: int | str = "5GB",
    tokenizer: Any = None,
    format: str = "sparseflow",
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (a transformers ``PreTrainedModel``, some layers ``SparseLinear``) to a directory.

    ``format="sparseflow"`` (default) writes our checkpoint, readable by :func:`from_pretrained`
    and, once ``sparseflow`` is imported, by ``AutoModel*.from_pretrained``;
    ``format="compressed-tensors"`` writes a ``sparse-24-bitmask`` checkpoint instead (what
    llm-compressor produces and vLLM serves). The write is atomic: the directory is built
    next to the target and renamed into place, so a crash leaves the old checkpoint or none.
    A directory that already holds a checkpoint is refused (``FileExistsError``) unless
    ``overwrite=True``; files in it that a checkpoint does not own (a tokenizer, a README) are
    kept either way. ``tokenizer`` (optional) is saved with the model.

    A model that transformers loaded from a ``.gguf`` file carries a ``gguf``
    quantization_config although its weights are dequantized in memory: that config is
    dropped, the others (real quantization) are refused.
    """
    if format not in ("sparseflow", "compressed-tensors"):
        raise ValueError(f"save_pretrained: format must be 'sparseflow' or 'compressed-tensors', got {format!r}")
    if format == "compressed-tensors":
        from sparseflow.convert.compressed_tensors import save_compressed_tensors

        return save_compressed_tensors(
            model, save_directory, max_shard_size=max_shard_size, tokenizer=tokenizer, overwrite=overwrite
        )
    if not overwrite:
        refuse_existing(save_directory, "save_pretrained")
    config = _model_config(model, "save_pretrained")
    tensors, tied = split_tied(model.state_dict())
    sparse = [name for name, mod in model.named_modules() if isinstance(mod, SparseLinear)]
    section = _section(model, tensors, sparse, tied)
    config = copy.deepcopy(config)
    config.architectures = [type(model).__name__]
    check_quantization_config(model, config, "save_pretrained")
    config.quantization_config = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION}
    setattr(config, SECTION, section)
    if section["dtype"] is not None:
        config.dtype = section["dtype"]
    with atomic_directory(save_directory) as tmp:
        write_shards(tmp, tensors, max_shard_size, {"sparseflow.format_version": str(FORMAT_VERSION)})
        config.save_pretrained(tmp)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and _can_generate(model):
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(save_directory)


def check_quantization_config(model: nn.Module, config, what: str) -> None:
    """Refuse a model whose weights are really quantized (saving them as 2:4 would lose or
    misstate that). Accepted: no quantization_config, ours, and ``gguf`` when the weights are
    plain floating tensors: transformers loading a ``.gguf`` file leaves that config on a model
    it dequantized in memory, and such a model is an ordinary one. The caller's config copy
    gets a new quantization_config either way."""
    old_qc = getattr(config, "quantization_config", None)
    old_method = old_qc.get("quant_method") if isinstance(old_qc, dict) else getattr(old_qc, "quant_method", None)
    old_method = getattr(old_method, "value", old_method)  # transformers' QuantizationMethod enum
    if old_method in (None, QUANT_METHOD):
        return
    if old_method == "gguf":
        packed = next((n for n, p in model.named_parameters() if not p.is_floating_point()), None)
        if packed is None:
            return
        raise ValueError(
            f"{what}: the model holds GGUF-packed weights ({packed!r} is {model.get_parameter(packed).dtype}); "
            "load it dequantized (quantization_config=GgufConfig(dequantize=True)) to sparsify and save it"
        )
    raise ValueError(f"{what}: the model already carries a {old_method!r} quantization_config")


def _model_config(model: nn.Module, what: str):
    from transformers import PretrainedConfig

    config = getattr(model, "config", None)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"{what}: expected a transformers PreTrainedModel (with a .config), got {type(model).__name__}")
    return config


def _can_generate(model: nn.Module) -> bool:
    try:
        return bool(model.can_generate())
    except Exception:  # noqa: BLE001 - a model without generation support
        return False


def split_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split a state dict into tensors to store and ``{alias: stored name}`` for tied ones.

    Tied weights (an LM head sharing the embedding) appear under two names but are one tensor:
    it is stored once and re-tied on load. Views that overlap without being the same tensor
    (rare) are stored as copies, since safetensors refuses shared memory.
    """
    stored: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: Counter = Counter()
    for name, t in state.items():
        if t.device.type == "meta":
            raise ValueError(f"save_pretrained: tensor {name!r} is on the meta device (offloaded or never loaded)")
        if t.numel() == 0:
            stored[name] = t
            continue
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        stored[name] = t
        storages[(t.device, t.untyped_storage().data_ptr())] += 1
    for name, t in stored.items():
        if t.numel() and storages[(t.device, t.untyped_storage().data_ptr())] > 1:
            stored[name] = t.clone()
    return stored, tied


def _section(model: nn.Module, tensors: dict[str, torch.Tensor], sparse: list[str], tied: dict[str, str]) -> dict:
    """The ``"sparseflow"`` config section: what a loader must know beyond the model's config."""
    float_dtypes = Counter(t.dtype for t in tensors.values() if t.is_floating_point())
    sparse_dtypes = Counter(model.get_submodule(n).weight_values.dtype for n in sparse)
    main = (sparse_dtypes or float_dtypes).most_common(1)
    dtype = main[0][0] if main else None
    overrides = {n: dtype_name(t.dtype) for n, t in tensors.items() if t.is_floating_point() and t.dtype != dtype}
    from sparseflow import __version__

    return {
        "format_version": FORMAT_VERSION,
        "sparse_layers": sparse,
        "dtype": None if dtype is None else dtype_name(dtype),
        "dtype_overrides": overrides,
        "tied_weights": tied,
        "sparseflow_version": __version__,
    }


# ----------------------------------------------------------------------------------------- load


def from_pretrained(
    pretrained_model_name_or_path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device_map: DeviceMap = None,
    *,
    max_memory: dict | None = None,
    model_class: type | None = None,
    verify_checksums: bool = True,
    memory: str = "compact",
    **config_kwargs: Any,
) -> nn.Module:
    """Load a checkpoint written by :func:`save_pretrained`, or a compressed-tensors 2:4 one
    (``sparse-24-bitmask``, or stored ``dense`` with a 2:4 ``sparsity_config``: every targeted
    layer is checked to be 2:4 and compressed as it is read).

    ``dtype``: cast floating tensors to it (default: as stored). ``device_map``: ``None``
    (CPU), a device (``"cuda:0"``), ``"auto"``/``"balanced"``/``"sequential"`` (accelerate
    plans it from the compressed sizes and the free memory, capped by ``max_memory``), or an
    explicit ``{module: device}``. ``model_class`` overrides the class named by
    ``config.architectures``. ``memory``: the 2:4 layers' memory mode (``SparseLinear``): on GPUs
    "compact" layers settle on their one layout as they finish loading. Raises
    :class:`CheckpointError` for anything damaged or inconsistent, naming the file and tensor.
    """
    _check_memory(memory)
    path = Path(pretrained_model_name_or_path)
    raw = _read_config_json(path)
    section = raw.get(SECTION)
    if section is None:
        from sparseflow.convert import compressed_tensors as ct

        if ct.sparsity_format(raw, path / "config.json") is not None:
            return ct.load_compressed_tensors(
                path,
                dtype=dtype,
                device_map=device_map,
                max_memory=max_memory,
                model_class=model_class,
                verify_checksums=verify_checksums,
                memory=memory,
            )
        raise CheckpointError(f"{path / 'config.json'}: no {SECTION!r} section: not a sparseflow checkpoint")
    section = _check_section(section, path / "config.json")
    target_dtype = None if dtype in (None, "auto") else dtype_from_name(dtype)
    model = build_skeleton(path, section["sparse_layers"], target_dtype or section["dtype"], model_class, config_kwargs)
    tie(model, section["tied_weights"])
    devices = resolve_device_map(model, device_map, max_memory)
    infos = read_headers(path)
    expected = {n: t for n, t in model.state_dict(keep_vars=True).items() if n not in section["tied_weights"]}
    check_names(path, infos, expected)
    for name, info in infos.items():
        check_header(path, name, info, expected[name], section["dtype_overrides"].get(name, section["dtype"]))
    reader = ShardReader(path, infos, sorted(infos, key=lambda n: infos[n].file), verify=verify_checksums)
    sparse = {f"{n}.weight_meta": model.get_submodule(n) for n in section["sparse_layers"]}
    try:
        for name in sorted(infos, key=lambda n: infos[n].file):
            tensor = reader.get(name)
            if name in sparse:
                mod = sparse[name]
                check_meta(tensor, (mod.out_features, mod.in_features), f"{path / infos[name].file}: tensor {name!r}")
            place(model, name, tensor, devices, target_dtype)
    finally:
        reader.close()
    finish(model, section["tied_weights"], devices, device_map, memory)
    return model


def _read_config_json(path: Path) -> dict:
    config_path = path / "config.json"
    if not config_path.is_file():
        hint = ""
        leftovers = interrupted_saves(path)
        if leftovers:
            hint = f" (an interrupted save left {', '.join(str(p) for p in leftovers)})"
        what = "no config.json in" if path.is_dir() else "no checkpoint directory at"
        raise FileNotFoundError(f"from_pretrained: {what} {path}{hint}")
    try:
        raw = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path}: corrupt JSON ({err})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    return raw


def _check_section(section: Any, where: Path) -> dict:
    if not isinstance(section, dict):
        raise CheckpointError(f"{where}: the {SECTION!r} section must be an object")
    version = section.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{where}: {SECTION}.format_version is missing or invalid ({version!r})")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: written in sparseflow checkpoint format {version}, this sparseflow reads up to "
            f"{FORMAT_VERSION}: upgrade sparseflow"
        )
    layers = section.get("sparse_layers")
    if not isinstance(layers, list) or not all(isinstance(n, str) for n in layers):
        raise CheckpointError(f"{where}: {SECTION}.sparse_layers must be a list of module names")
    tied = section.get("tied_weights") or {}
    overrides = section.get("dtype_overrides") or {}
    for key, value in (("tied_weights", tied), ("dtype_overrides", overrides)):
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise CheckpointError(f"{where}: {SECTION}.{key} must map names to names")
    dtype = section.get("dtype")
    return {
        "sparse_layers": layers,
        "tied_weights": tied,
        "dtype": None if dtype is None else dtype_from_name(dtype, f"{where}: {SECTION}.dtype"),
        "dtype_overrides": {k: dtype_from_name(v, f"{where}: {SECTION}.dtype_overrides") for k, v in overrides.items()},
    }


def model_class_for(config, model_class: type | None = None) -> type:
    """The class to build: ``model_class`` (an ``AutoModel*`` class is resolved through its
    mapping) or the first of ``config.architectures`` that transformers exports."""
    import transformers

    if model_class is not None:
        mapping = getattr(model_class, "_model_mapping", None)
        return mapping[type(config)] if mapping is not None else model_class
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type):
            return cls
    raise CheckpointError(
        f"config.architectures={getattr(config, 'architectures', None)!r} names no class transformers exports; "
        "pass model_class="
    )


def build_skeleton(
    path: Path, sparse_layers: Iterable[str], dtype: torch.dtype | None, model_class: type | None, config_kwargs: dict
) -> nn.Module:
    """The model with every parameter on the meta device and ``SparseLinear`` (also on meta) in
    place of the listed ``nn.Linear`` layers. Buffers are built for real by the modules
    themselves (accelerate's ``include_buffers=False``): the non-persistent ones (rotary
    ``inv_freq``, ``position_ids``) are not in checkpoints and keep exactly these values."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, **config_kwargs)
    cls = model_class_for(config, model_class)
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config, dtype=dtype) if dtype is not None else cls._from_config(config)
    for name in sparse_layers:
        swap_in_sparse(model, name, dtype, path / "config.json")
    return model


def swap_in_sparse(model: nn.Module, name: str, dtype: torch.dtype | None, where: Path) -> SparseLinear:
    """Replace the ``nn.Linear`` at ``name`` by an empty (meta) ``SparseLinear`` of the same shape."""
    try:
        linear = model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"{where}: sparse layer {name!r} does not exist in the model the config builds") from None
    if not isinstance(linear, nn.Linear):
        raise CheckpointError(f"{where}: sparse layer {name!r} is a {type(linear).__name__}, not an nn.Linear")
    if linear.in_features % 4:
        raise CheckpointError(
            f"{where}: sparse layer {name!r} has in_features={linear.in_features}, not a multiple of 4"
        )
    sparse = SparseLinear(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        device="meta",
        dtype=dtype or linear.weight.dtype,
    )
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, sparse)
    return sparse


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


def _get(model: nn.Module, name: str) -> torch.Tensor:
    module, attr = _owner(model, name)
    return getattr(module, attr)


def tie(model: nn.Module, tied: dict[str, str]) -> None:
    """Make each alias the very same tensor object as its stored twin."""
    for alias, target in tied.items():
        try:
            value = _get(model, target)
            module, attr = _owner(model, alias)
        except AttributeError:
            raise CheckpointError(f"tied weight {alias!r} -> {target!r}: no such tensor in the model") from None
        if attr in module._parameters:
            module._parameters[attr] = value
        elif attr in module._buffers:
            module._buffers[attr] = value
        else:
            raise CheckpointError(f"tied weight {alias!r}: not a parameter or buffer of the model")


def resolve_device_map(model: nn.Module, device_map: DeviceMap, max_memory: dict | None) -> dict[str, torch.device]:
    """``device_map`` as ``{module prefix: torch.device}`` (``""`` = whole model)."""
    if device_map is None:
        return {"": torch.device("cpu")}
    if isinstance(device_map, (int, torch.device)) or (
        isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential")
    ):
        return {"": torch.device(device_map)}
    if isinstance(device_map, str):
        from accelerate.utils import get_balanced_memory, infer_auto_device_map

        no_split = getattr(model, "_no_split_modules", None) or []
        no_split = list(no_split)
        if device_map != "sequential":
            max_memory = get_balanced_memory(
                model, max_memory, no_split_module_classes=no_split, low_zero=device_map == "balanced_low_0"
            )
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    if not isinstance(device_map, dict):
        raise TypeError(f"device_map: expected None, a device, 'auto' or a dict, got {type(device_map).__name__}")
    out = {}
    for prefix, device in device_map.items():
        if device == "disk":
            raise NotImplementedError("device_map: disk offload is not supported for sparseflow checkpoints")
        out[prefix] = torch.device(device)
    return out


def device_for(name: str, devices: dict[str, torch.device]) -> torch.device:
    best = None
    for prefix in devices:
        if (prefix == "" or name == prefix or name.startswith(prefix + ".")) and (
            best is None or len(prefix) > len(best)
        ):
            best = prefix
    if best is None:
        raise ValueError(f"device_map does not place {name!r}")
    return devices[best]


def check_names(path: Path, infos: dict[str, TensorInfo], expected: dict[str, torch.Tensor]) -> None:
    missing = [n for n in expected if n not in infos]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{path}: missing tensor {missing[0]!r}{more}; the model needs it and it is not in any shard. "
            "Refusing to initialise it at random."
        )
    extra = [n for n in infos if n not in expected]
    if extra:
        raise CheckpointError(
            f"{path / infos[extra[0]].file}: extra tensor {extra[0]!r} that the model built from config.json does not have"
        )


def check_header(path: Path, name: str, info: TensorInfo, ref: torch.Tensor, stored_dtype: torch.dtype | None) -> None:
    """Shape and dtype of one stored tensor against what the config implies (``ref``: the
    skeleton's tensor; ``stored_dtype``: the floating dtype the config records for it)."""
    where = f"{path / info.file}: tensor {name!r}"
    if tuple(info.shape) != tuple(ref.shape):
        raise CheckpointError(f"{where} has shape {list(info.shape)} but the config implies {list(ref.shape)}")
    if ref.is_floating_point():
        if not info.dtype.is_floating_point:
            raise CheckpointError(f"{where} has dtype {dtype_name(info.dtype)}; the model needs a floating dtype")
        if stored_dtype is not None and info.dtype != stored_dtype:
            raise CheckpointError(
                f"{where} has dtype {dtype_name(info.dtype)} but config.json records {dtype_name(stored_dtype)}"
            )
    elif info.dtype != ref.dtype:
        raise CheckpointError(f"{where} has dtype {dtype_name(info.dtype)}, the model needs {dtype_name(ref.dtype)}")


def place(
    model: nn.Module,
    name: str,
    tensor: torch.Tensor,
    devices: dict[str, torch.device],
    dtype: torch.dtype | None,
) -> None:
    """Put a loaded tensor where the skeleton has its meta placeholder, on its device.

    Done by hand rather than via ``set_module_tensor_to_device`` so nothing is cast
    silently: the dtype was checked against the config, and only an explicit ``dtype``
    changes it.
    """
    module, attr = _owner(model, name)
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    tensor = tensor.to(device_for(name, devices))
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad and tensor.is_floating_point())
    else:
        module._buffers[attr] = tensor


def finish(
    model: nn.Module,
    tied: dict[str, str],
    devices: dict[str, torch.device],
    device_map: DeviceMap,
    memory: str = "compact",
) -> None:
    """Re-tie, move the non-persistent buffers next to their module's weights, prove that
    nothing is left on meta, fuse SwiGLU MLPs (``SparseGatedMLP``), set the 2:4 layers'
    ``memory`` mode (compact ones on GPUs keep one layout from here), dispatch across devices
    when there are several, ``eval()``."""
    tie(model, tied)
    for module_name, module in model.named_modules():
        for attr in module._non_persistent_buffers_set:
            buf = module._buffers.get(attr)
            if buf is not None:
                full = f"{module_name}.{attr}" if module_name else attr
                module._buffers[attr] = buf.to(device_for(full, devices))
    for kind, items in (
        ("parameter", model.named_parameters(remove_duplicate=False)),
        ("buffer", model.named_buffers(remove_duplicate=False)),
    ):
        for name, t in items:
            if t.device.type == "meta":
                raise CheckpointError(f"{kind} {name!r} was not loaded from the checkpoint (still on the meta device)")
    fuse_gated_mlps(model)  # before dispatch: accelerate's hooks then see the final modules
    fuse_projections(model)  # q/k/v: fused by make_resident below, on a GPU in the compact mode
    used = set(devices.values())
    sparse = [module for module in model.modules() if isinstance(module, SparseLinear)]
    for module in sparse:
        module.memory = memory
    if device_map is not None:
        model.hf_device_map = {k: str(v) for k, v in devices.items()}
    if len(used) > 1:
        from accelerate import dispatch_model

        main = next((d for d in devices.values() if d.type != "cpu"), None)
        dispatch_model(
            model,
            device_map=model.hf_device_map,
            main_device=main,
            offload_buffers=any(d.type == "cpu" for d in used),
            skip_keys=getattr(model, "_skip_keys_device_placement", None),
        )
    # after dispatch (its hooks place every tensor first); not with CPU/disk offload, whose hooks
    # swap the buffers in and out around each call
    if all(d.type == "cuda" for d in used):
        for module in sparse:
            module.make_resident()  # a no-op in the fast mode
    model.eval()
