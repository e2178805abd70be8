"""``densify``: the dense twin of a sparsified model, for like-for-like speed comparisons."""

from __future__ import annotations

from torch import nn

from sparseflow.nn import SparseLinear

__all__ = ["densify"]


def densify(model: nn.Module) -> nn.Module:
    """Replace every ``SparseLinear`` in ``model`` (in place) by an ``nn.Linear`` holding its
    decompressed 2:4 weight: same outputs, dense kernels. Returns ``model``."""
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, SparseLinear):
            continue
        weight = mod.dense_weight()
        linear = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if mod.bias is not None:
            linear.bias = nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, linear)
    return model
