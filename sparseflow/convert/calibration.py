"""Calibration data in, per-block inputs out: what the data methods need to run block by block.

Sequential pruning calls each decoder block ourselves, so we need, for every block and batch, the
arguments the model would pass it (attention mask, position embeddings, ... which may differ per
block, e.g. sliding-window layers). :func:`capture_block_inputs` gets them for the price of the
embeddings: every block's ``forward`` is temporarily replaced by a recorder that stores its
arguments and returns its input unchanged, and the last one stops the forward with an exception.
Only block 0's hidden states are kept; later blocks get theirs from the pruned blocks before them.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["BlockCall", "call_model", "capture_block_inputs", "find_blocks", "prepare_batches", "text_windows"]

Batch = dict[str, torch.Tensor] | torch.Tensor


class _Stop(Exception):
    """Raised inside a forward once we have what we came for."""


def text_windows(text: str, tokenizer: Any, n: int = 32, seq_len: int = 512, seed: int = 0) -> list[torch.Tensor]:
    """``n`` windows of ``seq_len`` token ids (each 1 x seq_len) cut at random from one long text."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    if ids.numel() < seq_len:
        raise ValueError(f"text_windows: the text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, ids.numel() - seq_len + 1) for _ in range(n)]
    return [ids[s : s + seq_len].unsqueeze(0).clone() for s in starts]


def prepare_batches(
    calibration: Iterable[Any], tokenizer: Any = None, device: torch.device | None = None
) -> list[Batch]:
    """Token-id tensors (L, 1xL or BxL), tokenizer outputs (dicts) or strings (with ``tokenizer``)
    -> a list of forward batches on ``device``."""
    batches: list[Batch] = []
    for i, item in enumerate(calibration):
        if isinstance(item, str):
            if tokenizer is None:
                raise ValueError("sparsify: calibration holds strings; pass tokenizer= to turn them into token ids")
            item = {"input_ids": tokenizer(item, return_tensors="pt")["input_ids"]}
        if isinstance(item, torch.Tensor):
            item = item.unsqueeze(0) if item.dim() == 1 else item
            batches.append(item.to(device) if device is not None else item)
        elif isinstance(item, dict) or hasattr(item, "keys"):
            batch = {k: v for k, v in dict(item).items() if isinstance(v, torch.Tensor)}
            if not batch:
                raise ValueError(f"sparsify: calibration item {i} is a mapping without tensors")
            batches.append({k: (v.to(device) if device is not None else v) for k, v in batch.items()})
        else:
            raise TypeError(
                f"sparsify: calibration item {i} is a {type(item).__name__}; expected token-id tensors, "
                "tokenizer outputs or strings"
            )
    if not batches:
        raise ValueError("sparsify: the calibration data is empty")
    return batches


def _accepts(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def call_model(model: nn.Module, batch: Batch) -> Any:
    """One forward without a KV cache: HF models get keyword inputs, plain modules the tensor."""
    extra = {"use_cache": False} if _accepts(model.forward, "use_cache") else {}
    if isinstance(batch, dict):
        return model(**batch, **extra)
    name = getattr(model, "main_input_name", None)
    if name is not None and hasattr(model, "config"):
        return model(**{name: batch}, **extra)
    return model(batch)


def find_blocks(model: nn.Module, wanted: set[int]) -> tuple[str, nn.ModuleList] | None:
    """The ModuleList of same-typed blocks that holds the most of the ``wanted`` modules (by id)."""
    best = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or len({type(b) for b in mod}) != 1:
            continue
        count = sum(1 for block in mod for sub in block.modules() if id(sub) in wanted)
        if count and (best is None or count > best[0]):
            best = (count, name, mod)
    return None if best is None else (best[1], best[2])


@dataclass
class BlockCall:
    """The arguments of one block call, minus the hidden states (``slot``: its position or kwarg)."""

    args: tuple
    kwargs: dict
    slot: int | str


def _cache_type() -> type | None:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Cache


def _scrub(obj: Any, cache_type: type | None) -> Any:
    """Drop KV-cache objects so replaying a call never appends to a cache."""
    if cache_type is not None and isinstance(obj, cache_type):
        return None
    if isinstance(obj, tuple):
        return tuple(_scrub(o, cache_type) for o in obj)
    return obj


def _split(args: tuple, kwargs: dict) -> tuple[torch.Tensor, BlockCall]:
    cache_type = _cache_type()
    kw = {k: _scrub(v, cache_type) for k, v in kwargs.items()}
    if "use_cache" in kw:
        kw["use_cache"] = False
    if args and isinstance(args[0], torch.Tensor):
        return args[0], BlockCall((None, *(_scrub(a, cache_type) for a in args[1:])), kw, 0)
    if isinstance(kw.get("hidden_states"), torch.Tensor):
        hidden = kw.pop("hidden_states")
        return hidden, BlockCall(tuple(_scrub(a, cache_type) for a in args), kw, "hidden_states")
    raise RuntimeError("sparsify: cannot find the hidden states among a block's inputs (first argument)")


def to_device(obj: Any, device: torch.device | None) -> Any:
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def module_device(module: nn.Module) -> torch.device | None:
    """Where a module computes, or None when accelerate's hooks place its inputs (or it is empty)."""
    if hasattr(module, "_hf_hook"):
        return None
    for t in (*module.parameters(), *module.buffers()):
        return None if t.device.type == "meta" else t.device
    return None


def first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict) and out:
        return next(iter(out.values()))
    raise RuntimeError(f"sparsify: a block returned {type(out).__name__}; expected a tensor or a tuple of tensors")


def _call_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall, device: torch.device | None) -> Any:
    dev = device if device is not None else module_device(block)
    hidden, args, kwargs = to_device((hidden, call.args, call.kwargs), dev)
    if call.slot == 0:
        args = (hidden, *args[1:])
    else:
        kwargs = {**kwargs, call.slot: hidden}
    return block(*args, **kwargs)


def run_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall, device: torch.device | None) -> torch.Tensor:
    """Call ``block`` as the model would, with ``hidden`` as its input; returns its hidden output."""
    return first_tensor(_call_block(block, hidden, call, device))


def _wrapper_like(out: Any):
    """A function making ``h`` look like the block's real output ``out`` (tensor or tuple)."""
    if isinstance(out, torch.Tensor):
        return lambda h: h
    if isinstance(out, tuple):
        tail = out[1:]
        return lambda h: (h, *tail)
    if isinstance(out, list):
        tail = out[1:]
        return lambda h: [h, *tail]
    raise RuntimeError(f"sparsify: a block returned {type(out).__name__}; expected a tensor or a tuple")


class _Patched:
    """Temporarily replace the ``forward`` of some modules (restoring an accelerate-wrapped one too)."""

    def __init__(self, patches: dict[nn.Module, Any]) -> None:
        self.patches = patches
        self.saved: list[tuple[nn.Module, bool, Any]] = []

    def __enter__(self) -> None:
        for mod, fn in self.patches.items():
            self.saved.append((mod, "forward" in mod.__dict__, mod.__dict__.get("forward")))
            mod.forward = fn

    def __exit__(self, *exc: object) -> None:
        for mod, had, old in self.saved:
            if had:
                mod.forward = old
            else:
                del mod.forward


@dataclass
class Captured:
    hidden: list[torch.Tensor]  # block 0's input, one per batch
    calls: list[list[BlockCall]]  # calls[j][b]: block j's other arguments for batch b
    chained: bool  # every block received exactly the previous block's output, in order


def capture_block_inputs(
    model: nn.Module, blocks: Sequence[nn.Module], batches: list[Batch], device: torch.device | None = None
) -> Captured:
    """Record every block's arguments for every batch without running any block (see module doc).
    Block 0 runs once, on one batch (on ``device`` if given), to learn the shape of its output."""
    n = len(blocks)
    first: list[tuple[tuple, dict]] = []

    def stop0(*args: Any, **kwargs: Any) -> Any:
        first.append((args, kwargs))
        raise _Stop

    with _Patched({blocks[0]: stop0}):
        try:
            call_model(model, batches[0])
        except _Stop:
            pass
    if not first:
        raise RuntimeError("sparsify: the model's forward never reached its first block")
    hidden0, call0 = _split(*first[0])
    home = module_device(blocks[0]) if device is not None else None
    if home is not None:
        blocks[0].to(device)
    try:
        wrap = _wrapper_like(_call_block(blocks[0], hidden0, call0, device))  # learn the output's structure
    finally:
        if home is not None:
            blocks[0].to(home)

    hidden: list[torch.Tensor] = []
    calls: list[list[BlockCall]] = [[] for _ in range(n)]
    state = {"prev": None, "next": 0, "chained": True}

    def recorder(j: int):
        def record(*args: Any, **kwargs: Any) -> Any:
            h, call = _split(args, kwargs)
            if j != state["next"] or (j > 0 and h is not state["prev"]):
                state["chained"] = False
            state["next"], state["prev"] = j + 1, h
            if j == 0:
                hidden.append(h)
            calls[j].append(call)
            if j == n - 1:
                raise _Stop
            return wrap(h)

        return record

    with _Patched({b: recorder(j) for j, b in enumerate(blocks)}):
        for batch in batches:
            state.update(prev=None, next=0)
            try:
                call_model(model, batch)
            except _Stop:
                pass
            if state["next"] != n:
                state["chained"] = False
    chained = state["chained"] and all(len(c) == len(batches) for c in calls)
    return Captured(hidden, calls, chained)
