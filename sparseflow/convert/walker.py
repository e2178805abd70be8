"""Which layers of a model get 2:4 weights, and swapping them in (and back out) safely.

A *target* is one ``nn.Linear`` or GPT-2 ``Conv1D`` module with every place it is installed (a
module reachable under two names is one target). Selection, in order:

1. ``include`` (name patterns) if given, else ``filter_fn`` if given, else the default rule:
   everything but the output embeddings (``lm_head``; ``model.get_output_embeddings()``);
2. minus ``exclude`` patterns; then ``filter_fn(module, name)`` must also return True;
3. minus what cannot be converted: weights tied to an embedding (converting would untie them),
   non-floating (quantized) or offloaded (meta) weights, ``in_features % 4 != 0``, and the
   ``out_proj`` of ``nn.MultiheadAttention`` (which reads ``.weight`` directly).

A pattern matches a qualified name as a glob (``fnmatch``) on the whole name or on a dotted
suffix: ``"down_proj"``, ``"*.mlp.*"`` and ``"model.layers.0.*"`` all work.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import nn

from sparseflow._ext import sparse_unavailable_reason
from sparseflow.format import Sparse24Weight, compress_2_4, prune_2_4
from sparseflow.kernels.cusparselt import cslt_unsupported
from sparseflow.kernels.dispatch import DISPATCHER, SPARSE_MIN_GAIN, default_resident, resident_speedup
from sparseflow.nn import SparseLinear

__all__ = ["Journal", "Target", "build_sparse", "collect_targets", "decide_fallback", "shape_rule"]

DEFAULT_EXCLUDE = ("lm_head",)


def conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def layer_kind(module: nn.Module) -> str | None:
    conv1d = conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return "Conv1D"
    if isinstance(module, nn.Linear):
        return "Linear"
    return None


def matches(name: str, patterns: Sequence[str] | None) -> bool:
    return any(fnmatchcase(name, p) or fnmatchcase(name, "*." + p) for p in patterns or ())


@dataclass(eq=False)
class Target:
    """One convertible module, where it is installed, and what sparsify decided for it."""

    name: str
    module: nn.Module
    kind: str
    sites: list[tuple[nn.Module, str, str]]  # (parent, attribute, qualified name)
    out_features: int
    in_features: int
    action: str = "skipped"  # "sparse" | "dense-fallback" | "skipped"
    reason: str = ""
    speedup: dict[int, float | None] | None = None
    rel_error: float | None = None
    tie_key: int = 0  # id of the weight tensor: modules sharing one are converted together
    new: SparseLinear | None = None

    def weight(self) -> torch.Tensor:
        """The weight in F.linear layout (out x in); Conv1D stores it transposed."""
        w = self.module.weight.detach()
        return w.T if self.kind == "Conv1D" else w


def _sites(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, str]]]:
    sites: dict[int, list[tuple[nn.Module, str, str]]] = {}
    seen: set[tuple[int, str]] = set()
    for pname, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent.named_children():
            if layer_kind(child) is None or (id(parent), attr) in seen:
                continue
            seen.add((id(parent), attr))
            sites.setdefault(id(child), []).append((parent, attr, f"{pname}.{attr}" if pname else attr))
    return sites


def _embedding_weights(model: nn.Module) -> tuple[set[int], set[int]]:
    """ids and storage pointers of every embedding weight (ties may share either)."""
    embs = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    return {id(w) for w in embs}, {w.data_ptr() for w in embs if w.device.type != "meta"}


def _technical_reason(
    t: Target, parent_types: set[type], embed: tuple[set[int], set[int]], kinds: dict[int, set[str]]
) -> str:
    w = t.module.weight
    if id(w) in embed[0] or (w.device.type != "meta" and w.data_ptr() in embed[1]):
        return "weight tied to an embedding (converting it would untie them)"
    if not w.is_floating_point():
        return f"weight dtype {w.dtype} is not floating point (already quantized?)"
    if w.device.type == "meta":
        return "weight offloaded by accelerate (not resident); load it on a device to sparsify it"
    if t.in_features % 4:
        return f"in_features={t.in_features} is not a multiple of 4"
    if nn.MultiheadAttention in parent_types:
        return "used by nn.MultiheadAttention through its .weight"
    if len(kinds[t.tie_key]) > 1:
        return "weight shared between a Linear and a Conv1D"
    return ""


def collect_targets(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> list[Target]:
    """Every Linear/Conv1D of ``model`` as a Target, action "sparse" (selected) or "skipped" with why."""
    get_out = getattr(model, "get_output_embeddings", None)
    try:
        out_emb = get_out() if callable(get_out) else None
    except (AttributeError, NotImplementedError):
        out_emb = None
    embed = _embedding_weights(model)
    targets: list[Target] = []
    for sites in _sites(model).values():
        module = sites[0][0]._modules[sites[0][1]]
        kind = layer_kind(module)
        w = module.weight
        out_f, in_f = (w.shape[1], w.shape[0]) if kind == "Conv1D" else (w.shape[0], w.shape[1])
        targets.append(Target(sites[0][2], module, kind, sites, int(out_f), int(in_f), tie_key=id(w)))
    kinds: dict[int, set[str]] = {}
    for t in targets:
        kinds.setdefault(t.tie_key, set()).add(t.kind)
    for t in targets:
        names = [s[2] for s in t.sites]
        if include:
            selected, why = any(matches(n, include) for n in names), "not matched by include patterns"
        elif filter_fn is not None:
            selected, why = True, ""
        else:
            is_out = out_emb is not None and t.module is out_emb
            selected = not is_out and not any(matches(n, DEFAULT_EXCLUDE) for n in names)
            why = "output embeddings (lm_head) are kept dense by default"
        if selected and exclude and any(matches(n, exclude) for n in names):
            selected, why = False, "matched an exclude pattern"
        if selected and filter_fn is not None and not all(filter_fn(t.module, n) for n in names):
            selected, why = False, "rejected by filter_fn"
        if selected:
            why = _technical_reason(t, {type(s[0]) for s in t.sites}, embed, kinds)
            selected = not why
        t.action, t.reason = ("sparse", "") if selected else ("skipped", why)
    # A shared weight is converted only if every module using it is.
    ok: dict[int, bool] = {}
    for t in targets:
        ok[t.tie_key] = ok.get(t.tie_key, True) and t.action == "sparse"
    for t in targets:
        if t.action == "sparse" and not ok[t.tie_key]:
            t.action, t.reason = "skipped", "weight shared with a module that is not converted"
    return targets


def shape_rule(n: int, k: int) -> tuple[bool, str]:
    """The no-GPU fallback rule: (keep sparse?, why).

    A checkpoint is often made on one machine and served on another. Without a GPU here there is
    nothing to measure, and a guess by size would throw away layers that the serving GPU may
    well run faster as 2:4; so every layer the 2:4 kernels accept stays sparse, and the GPU it
    is served on decides per shape at run time (the dispatcher, ``sparseflow.autotune``), never
    running slower than dense there.
    """
    why = cslt_unsupported(n, k)
    if why:
        return False, f"{n}x{k}: {why} (shape rule)"
    return True, "no GPU here to measure: kept sparse, the GPU it runs on picks 2:4 or dense per shape"


def _probe_weight(n: int, k: int, dtype: torch.dtype, device: torch.device) -> Sparse24Weight:
    """A random 2:4 weight of this shape: the dispatcher's timing depends on the shape only."""
    return compress_2_4(prune_2_4(torch.randn(n, k, device=device, dtype=dtype)))


def _measure(
    n: int,
    k: int,
    dtype: torch.dtype,
    device: torch.device,
    expected_tokens: Sequence[int],
    min_speedup: float,
    memory: str = "compact",
) -> tuple[bool, str, dict[int, float | None] | None]:
    reason = sparse_unavailable_reason(device)
    if reason is None and dtype not in (torch.float16, torch.bfloat16):
        reason = f"{dtype} has no 2:4 tensor-core path (use float16 or bfloat16)"
    if reason is None:
        reason = cslt_unsupported(n, k)
    if reason is not None:
        return False, reason, None
    probe = _probe_weight(n, k, dtype, device)
    # compact: the layer will run the one kernel whose layout it keeps, at every M
    kept = default_resident(probe) if memory == "compact" else None
    speedups: dict[int, float | None] = {}
    slower = []
    for m in expected_tokens:
        d = DISPATCHER.decide(probe, int(m), only=kept)
        if kept is None:
            speedups[int(m)] = s = d.speedup
            loses = d.choice == "dense"
        else:
            speedups[int(m)] = s = resident_speedup(d, kept)
            loses = s is None or s < SPARSE_MIN_GAIN
        if loses or (s is not None and s < min_speedup):
            slower.append(int(m))
    if slower:
        return False, f"2:4 measured slower than dense at M={slower}", speedups
    return True, f"2:4 measured faster at M={[int(m) for m in expected_tokens]}", speedups


def decide_fallback(
    targets: list[Target],
    fallback: str,
    expected_tokens: Sequence[int],
    min_speedup: float,
    device: torch.device | None = None,
    memory: str = "compact",
) -> None:
    """fallback="auto": turn selected targets that would not be faster into "dense-fallback".

    Measured with the core dispatcher on the layer's GPU (or ``device`` when the model sits on
    the CPU and will be calibrated there): in the compact memory mode, the kernel the layer would
    keep; in the fast mode, the fastest 2:4 kernel per M. Otherwise :func:`shape_rule`.
    """
    cache: dict[tuple, tuple[bool, str, dict | None]] = {}
    for t in targets:
        if t.action != "sparse":
            continue
        if fallback == "never":
            t.reason = "fallback='never'"
            continue
        w = t.module.weight
        dev = w.device if w.device.type == "cuda" else device if device is not None and device.type == "cuda" else None
        key = (str(dev), w.dtype, t.out_features, t.in_features)
        if key not in cache:
            if dev is None:
                keep, why = shape_rule(t.out_features, t.in_features)
                cache[key] = (keep, why, None)
            else:  # the reason names the shape, as shape_rule's refusals do
                keep, why, speedup = _measure(
                    t.out_features, t.in_features, w.dtype, dev, expected_tokens, min_speedup, memory
                )
                cache[key] = (keep, f"{t.out_features}x{t.in_features}: {why}", speedup)
        keep, t.reason, t.speedup = cache[key]
        if not keep:
            t.action = "dense-fallback"


def build_sparse(t: Target, compressed: Sparse24Weight) -> SparseLinear:
    """A SparseLinear for ``t`` holding ``compressed`` (shared, not copied, between tied modules);
    an accelerate hook on the original is copied over so device placement keeps working."""
    bias = t.module.bias
    new = SparseLinear.from_compressed(compressed, None if bias is None else bias.detach())
    new.train(False)
    hook = getattr(t.module, "_hf_hook", None)
    if hook is not None:
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(new, copy.copy(hook))
    return new


class Journal:
    """Every module swap made, so a failure can put the originals back."""

    def __init__(self) -> None:
        self.entries: list[list] = []  # [parent, attribute, original or None once forgotten, name]

    def swap(self, parent: nn.Module, attr: str, new: nn.Module, name: str) -> None:
        old = parent._modules[attr]
        setattr(parent, attr, new)
        self.entries.append([parent, attr, old, name])

    @property
    def changed(self) -> list[str]:
        return [e[3] for e in self.entries]

    def forget(self) -> None:
        """Drop the originals (frees their memory; restore() can then no longer undo those swaps)."""
        for e in self.entries:
            e[2] = None

    def restore(self) -> bool:
        """Undo every swap still undoable, newest first; True when all were undone."""
        complete = True
        for parent, attr, old, _ in reversed(self.entries):
            if old is None:
                complete = False
            else:
                setattr(parent, attr, old)
        if complete:
            self.entries.clear()
        return complete
