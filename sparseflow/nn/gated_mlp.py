"""``SparseGatedMLP``: a SwiGLU MLP whose 2:4 gate and up projections run as one fused kernel.

In ``memory="fast"`` mode, at decode sizes (M <= 64 tokens) the decode kernel computes ``silu(x G^T) * (x U^T)`` in one
launch from an interleaved packing of G and U, so the 2x-wide gate/up output never reaches
memory; ``down_proj`` follows as usual. Elsewhere (prefill, CPU, ``torch.compile``, fp32) it runs
the model's own arithmetic through the ``SparseLinear`` submodules. Submodules keep the names
of the MLP it replaces (Llama/Mistral/Qwen2 ``gate_proj``/``up_proj``/``down_proj``, Phi-3
``gate_up_proj``/``down_proj``), so ``state_dict`` keys and checkpoints are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from sparseflow._ext import _C, sparse_unavailable_reason
from sparseflow.format import Sparse24Weight
from sparseflow.kernels.decode import (
    DECODE_MAX_M,
    DecodeWeight,
    decode_mm,
    decode_mm_portable,
    pack_decode_swiglu,
    portable_ok,
)
from sparseflow.kernels.dispatch import DISPATCHER
from sparseflow.nn.linear import SparseLinear

__all__ = ["SparseGatedMLP", "fuse_gated_mlps"]

_SPLIT = ("gate_proj", "up_proj", "down_proj", "act_fn")  # Llama, Mistral, Qwen2
_MERGED = ("gate_up_proj", "down_proj", "activation_fn")  # Phi-3


def _is_silu(act: object) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def _style(mlp: nn.Module) -> tuple[str, ...] | None:
    """The submodule names if ``mlp`` is a SwiGLU MLP with 2:4 gate/up projections, else None."""
    if all(hasattr(mlp, n) for n in _SPLIT):
        g, u = mlp.gate_proj, mlp.up_proj
        ok = isinstance(g, SparseLinear) and isinstance(u, SparseLinear) and _is_silu(mlp.act_fn)
        return _SPLIT if ok and (g.in_features, g.out_features) == (u.in_features, u.out_features) else None
    if all(hasattr(mlp, n) for n in _MERGED):
        gu = mlp.gate_up_proj
        ok = isinstance(gu, SparseLinear) and gu.out_features % 2 == 0 and _is_silu(mlp.activation_fn)
        return _MERGED if ok else None
    return None


class SparseGatedMLP(nn.Module):
    """Drop-in for a SwiGLU MLP whose gate/up projections are ``SparseLinear``."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        names = _style(mlp)
        if names is None:
            raise TypeError(f"SparseGatedMLP: {type(mlp).__name__} is not a SwiGLU MLP with SparseLinear gate/up")
        self._names = names
        # a bool, not `names is _SPLIT` at call time: torch.compile traces tuples as values, and an
        # identity test on them is False there (the wrong branch, a graph break on a missing name)
        self._split = names is _SPLIT
        for n in names:
            setattr(self, n, getattr(mlp, n))
        self._fused: tuple | None = None  # (key, DecodeWeight, bias)

    # -- the fused layout --------------------------------------------------------------------
    def _projections(self) -> tuple[SparseLinear, ...]:
        """The 2:4 layers the fused layout is built from (the first is the one the dispatcher measures)."""
        return (self.gate_proj, self.up_proj) if self._split else (self.gate_up_proj,)

    def _halves(self) -> tuple[Sparse24Weight, Sparse24Weight, torch.Tensor | None]:
        """(gate, up, bias cat([gate, up]) or None); only needed when (re)packing."""
        if self._split:
            g, u = self.gate_proj, self.up_proj
            bias = None if g.bias is None and u.bias is None else torch.cat([_bias(g), _bias(u)])
            return g.weight_2_4, u.weight_2_4, bias
        gu = self.gate_up_proj
        w, i = gu.weight_2_4, gu.out_features // 2
        gate = Sparse24Weight(w.values[:i], w.meta[:i], (i, w.shape[1]))
        up = Sparse24Weight(w.values[i:], w.meta[i:], (i, w.shape[1]))
        return gate, up, gu.bias

    def _fused_weight(self, portable: bool) -> tuple[DecodeWeight | tuple, torch.Tensor | None] | None:
        """The fused kernel's weight: the packed, tile-interleaved layout, or with ``portable``
        the (gate, up) halves of the portable form, read in place (no copy)."""
        key = (tuple((p.weight_values.data_ptr(), p.weight_values._version) for p in self._projections()), portable)
        if self._fused is not None and self._fused[0] == key:
            return self._fused[1], self._fused[2]
        if torch.cuda.is_current_stream_capturing():
            return None  # packing inside a capture would be recorded into the graph: run unfused
        gate, up, bias = self._halves()
        if portable and portable_ok(gate) and portable_ok(up):
            fused = (gate, up)
        else:
            fused = pack_decode_swiglu(gate, up)
        for w in (gate, up):
            w.drop_layouts("decode")  # the fused form replaces the per-projection layouts
        self._fused = (key, fused, bias)
        return fused, bias

    def _try_fused(self, x: torch.Tensor) -> torch.Tensor | None:
        if not x.is_cuda or _C is None or torch.compiler.is_compiling():
            return None
        if any(p.memory == "compact" for p in self._projections()):
            return None  # the fused layout would be a second copy of gate/up on the GPU
        measured = self._projections()[0].weight_2_4
        k = measured.shape[1]
        m = x.numel() // k if x.shape[-1] == k else 0
        if not 1 <= m <= DECODE_MAX_M or x.dtype != measured.dtype or x.dtype not in (torch.float16, torch.bfloat16):
            return None
        if x.device != measured.device or sparse_unavailable_reason(x.device) is not None:
            return None
        backend = self._projections()[0].backend  # the fused kernel is the decode kernel: honour it
        if backend in ("dense", "cusparselt"):
            return None
        d = DISPATCHER.decide(measured, m)
        if {"auto": d.choice, "sparse": d.best_sparse, "decode": "decode"}[backend] != "decode":
            return None
        fused = self._fused_weight(d.decode_portable)
        if fused is None:
            return None
        # gate and up together have twice the rows the decision was measured on: half the split
        split = max(1, d.decode_split // 2) if self._split else d.decode_split
        x2 = x.reshape(m, k).contiguous()
        if isinstance(fused[0], tuple):
            gate, up = fused[0]
            h = decode_mm_portable(x2, gate, fused[1], split, up=up, ring=d.decode_ring)
        else:
            h = decode_mm(x2, fused[0], fused[1], split, d.decode_ring)
        return h.view(*x.shape[:-1], h.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._try_fused(x)
        if h is None:
            if self._split:
                h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
            else:
                gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
                h = up * self.activation_fn(gate)
        return self.down_proj(h)

    def extra_repr(self) -> str:
        return "fused SwiGLU at M <= 64 (decode kernel)"


def _bias(lin: SparseLinear) -> torch.Tensor:
    return lin.bias if lin.bias is not None else lin.weight_values.new_zeros(lin.out_features)


def fuse_gated_mlps(model: nn.Module) -> int:
    """Replace every SwiGLU MLP of ``model`` whose gate/up are ``SparseLinear`` by a
    ``SparseGatedMLP`` (in place); returns how many were replaced."""
    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if name and not isinstance(mod, SparseGatedMLP) and _style(mod) is not None
    ]
    for name, mod in found:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, SparseGatedMLP(mod))
    return len(found)
