"""q/k/v (and gate/up) as one 2:4 GEMM: ``ProjectionGroup`` and ``fuse_projections``.

Why: Hugging Face attention calls ``q_proj``, ``k_proj`` and ``v_proj`` on the same hidden states,
three GEMMs whose k/v parts are small (Llama-3-8B: 1024 rows each). At decode sizes each of those
launches costs about as much as the much larger q (H100, CUTLASS, M <= 8: q 11.0 us, k and v 7.6
us each); one 6144-row GEMM measured 14.6 us (benchmarks/NOTES.md). A SwiGLU MLP's gate and up
projections read the same input too. In the compact mode a group keeps one layout of its
members' weights stacked by rows, and nothing else on the GPU.

How: the model's code is left as it is. The first projection called on a tensor runs the fused
layer and keeps its output until the others have taken their slices (the same
tensor object; ``torch.compile`` traces this into one GEMM and three slices). ``state_dict``,
``.to()``, loading and ``memory="fast"`` see three plain layers again: each member reads its rows
back from the fused layout (``split``), as a compact layer reads back its own.
"""

from __future__ import annotations

import torch
from torch import nn

from sparseflow.format import Sparse24Weight
from sparseflow.nn.linear import SparseLinear

__all__ = ["ProjectionGroup", "fuse_projections"]

# Sibling projections of one input: attention (Llama, Mistral, Qwen2, Gemma, ...) and SwiGLU MLPs
# with separate gate/up (run by SparseGatedMLP, whose fused decode kernel serves the fast mode)
_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class ProjectionGroup:
    """2:4 layers that read the same input, run as one GEMM of their stacked rows once built.

    Not a module: the members stay where the model has them (their names are the checkpoint's
    keys); the fused layer is held here, outside the module tree."""

    def __init__(self, members: list[SparseLinear]) -> None:
        self.members = tuple(members)
        start = 0
        for p in self.members:
            p.__dict__["_group"], p.__dict__["_group_rows"] = self, (start, start + p.out_features)
            start += p.out_features
        self.rows = start
        self.fused: SparseLinear | None = None
        self._x: torch.Tensor | None = None  # the input of the pending fused output
        self._y: torch.Tensor | None = None
        self._left = 0  # members yet to take their slice of _y

    def refusal(self) -> str | None:
        """Why the members cannot be fused now, or None."""
        ps = self.members
        if any(p.memory != "compact" for p in ps):
            return "not every member is in the compact memory mode"
        if len({p.backend for p in ps}) > 1:
            return "the members have different backends"
        if len({(p.weight_values.device, p.weight_values.dtype, p.in_features) for p in ps}) > 1:
            return "the members differ in device, dtype or in_features"
        if ps[0].weight_values.device.type != "cuda":
            return "the members are not on a GPU"
        if torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling():
            return "inside a CUDA-graph capture or a compiled region"
        return None

    def build(self) -> SparseLinear | None:
        """Fuse now where ``refusal`` allows (else None): stack the members' portable forms,
        keep the stack's one layout (``SparseLinear.make_resident``), free the members' own."""
        if self.fused is not None or self.refusal() is not None:
            return self.fused
        ps = self.members
        for p in ps:
            p._restore()  # a member that kept a layout of its own holds its portable form again
        ws = [p.weight_2_4 for p in ps]
        values = torch.cat([w.values for w in ws])
        meta = torch.cat([w.meta for w in ws])
        bias = None
        if any(p.bias is not None for p in ps):
            bias = torch.cat([p.bias if p.bias is not None else values.new_zeros(p.out_features) for p in ps])
        fused = SparseLinear.from_compressed(
            Sparse24Weight(values, meta, (self.rows, ps[0].in_features)), bias, ps[0].backend, "compact"
        )
        pinned = {p.__dict__.get("_pinned") for p in ps}
        if len(pinned) == 1:
            fused.resident = pinned.pop()
        for p in ps:  # the stack replaces them: empty placeholders, as a compact layer's
            p._buffers["weight_values"] = values.new_empty((p.out_features, 0))
            p._buffers["weight_meta"] = meta.new_empty((p.out_features, 0))
            p._w, p._route = None, None
        self.fused = fused
        # Loading to a GPU peaks here: the layout is built from a dense copy of the stack. The
        # members' own forms (as many bytes as the stack) must not live on through ``ws``.
        del ws, values, meta
        fused.make_resident()
        return fused

    def split(self) -> None:
        """Undo ``build``: every member holds its portable form again (read back from the fused
        layout, on its device)."""
        fused = self.fused
        if fused is None:
            return
        values, meta = fused.weight_2_4.portable()
        for p in self.members:
            a, b = p.__dict__["_group_rows"]
            p._buffers["weight_values"], p._buffers["weight_meta"] = values[a:b].clone(), meta[a:b].clone()
            p._w, p._route = None, None
        self.fused, self._x, self._y, self._left = None, None, None, 0

    def out(self, member: SparseLinear, x: torch.Tensor) -> torch.Tensor:
        """``member(x)``: its slice of the fused output, computed once per input tensor."""
        if self._x is not x:
            self._x, self._y, self._left = x, self.fused(x), len(self.members)
        y = self._y
        self._left -= 1
        if self._left <= 0:  # every member has taken its slice: do not keep the activation alive
            self._x = self._y = None
        a, b = member.__dict__["_group_rows"]
        return y[..., a:b]

    def portable(self, member: SparseLinear, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The member's (values, meta), read back from the fused layout onto ``device``: its rows
        only (a state_dict of a group reads the layout once per member)."""
        w = self.fused.weight_2_4
        values, meta = w.portable(device, rows=member.__dict__["_group_rows"])
        if w.resident is None:  # views of the stack the fused layer holds: the caller gets its own
            values, meta = values.clone(), meta.clone()
        return values, meta


def fuse_projections(model: nn.Module) -> int:
    """Group every attention's ``q_proj``/``k_proj``/``v_proj``, and every MLP's
    ``gate_proj``/``up_proj``, that are all ``SparseLinear`` of one input width and backend
    (``ProjectionGroup``); returns how many groups were made. A group
    runs fused once built: by ``SparseLinear.make_resident`` (which ``sparsify`` and
    ``from_pretrained`` call) in the compact mode on a GPU. Encoder-decoder models are left
    alone: their cross-attention feeds k/v another tensor than q."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_projections: model must be a torch.nn.Module, got {type(model).__name__}")
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return 0
    made = 0
    for mod in model.modules():
        for names in _SIBLINGS:
            ps = [getattr(mod, name, None) for name in names]
            if not all(isinstance(p, SparseLinear) for p in ps) or any("_group" in p.__dict__ for p in ps):
                continue
            if len({p.in_features for p in ps}) == 1 and len({p.backend for p in ps}) == 1:
                ProjectionGroup(ps)
                made += 1
    return made
