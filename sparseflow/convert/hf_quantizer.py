"""Lets ``transformers.AutoModel*.from_pretrained`` load sparseflow checkpoints.

Our ``config.json`` carries ``quantization_config = {"quant_method": "sparseflow", ...}``.
transformers routes such a config to the quantizer registered under that name, which swaps
``SparseLinear`` into the meta skeleton before transformers streams the weights in (its own
loader: device_map, dtype, sharding all work as usual), then checks the result.
Registration happens when this module is imported (``import sparseflow`` does it). Without
that import transformers does not know the method: it warns "Unknown quantization type",
loads the dense architecture and re-initialises the 2:4 layers at random. That is why
:func:`sparseflow.from_pretrained` remains the recommended loader.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from sparseflow.convert.validation import CheckpointError, check_meta
from sparseflow.nn import SparseLinear, fuse_gated_mlps, fuse_projections

__all__ = ["SparseflowConfig", "SparseflowHfQuantizer"]

QUANT_METHOD = "sparseflow"


class SparseflowConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a sparseflow checkpoint: a pointer to the ``"sparseflow"``
    section of ``config.json``, which lists the 2:4 layers."""

    def __init__(self, format_version: int = 1, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.format_version = format_version


class SparseflowHfQuantizer(HfQuantizer):
    """Pre-quantized only (``requires_calibration``): transformers cannot 2:4-prune on load."""

    requires_calibration = True

    def _section(self, model) -> dict:
        from sparseflow.convert.checkpoint import SECTION, _check_section

        section = getattr(model.config, SECTION, None)
        if section is None:
            raise CheckpointError(f"config has quant_method={QUANT_METHOD!r} but no {SECTION!r} section")
        return _check_section(section, "config.json")

    def _process_model_before_weight_loading(self, model, **kwargs: Any):
        from sparseflow.convert.checkpoint import swap_in_sparse

        for name in self._section(model)["sparse_layers"]:
            swap_in_sparse(model, name, None, "config.json")
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        # transformers marks every tensor it loaded (tied ones share the mark). One without the mark
        # was missing from the checkpoint and got re-initialised: refuse the model instead.
        for name, t in model.state_dict(keep_vars=True).items():
            if not getattr(t, "_is_hf_initialized", False):
                raise CheckpointError(f"missing tensor {name!r}: not in the checkpoint (refusing a random re-init)")
        for name, mod in model.named_modules():
            if isinstance(mod, SparseLinear):
                check_meta(mod.weight_meta, (mod.out_features, mod.in_features), f"tensor {name}.weight_meta")
        fuse_gated_mlps(model)
        fuse_projections(model)  # fused by make_resident or sf.autotune (compact mode, GPU)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(QUANT_METHOD)(SparseflowConfig)
if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(QUANT_METHOD)(SparseflowHfQuantizer)
