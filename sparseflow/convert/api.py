"""``sparsify``: prune a model's linears to 2:4, compress them and swap in ``SparseLinear``, in place."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from functools import partial
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sparseflow.convert.calibration import (
    Batch,
    call_model,
    capture_block_inputs,
    find_blocks,
    first_tensor,
    module_device,
    prepare_batches,
    run_block,
)
from sparseflow.convert.methods import METHODS, InputStats, magnitude, sparsegpt, sparsegpt_factor, wanda
from sparseflow.convert.report import LayerReport, SparsifyReport
from sparseflow.convert.walker import Journal, Target, build_sparse, collect_targets, decide_fallback
from sparseflow.format import compress_2_4
from sparseflow.nn import SparseLinear, fuse_gated_mlps, fuse_projections
from sparseflow.nn.linear import MEMORY_MODES

__all__ = ["SparsifyConfig", "SparsifyError", "report", "sparsify"]

_REPORT_ATTR = "_sparseflow_report"


@dataclass
class SparsifyConfig:
    """Every option of :func:`sparsify` (see its docstring), validated."""

    method: str = "magnitude"
    fallback: str = "auto"
    filter_fn: Callable[[nn.Module, str], bool] | None = None
    include: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    expected_tokens: Sequence[int] = (16, 2048)
    min_speedup: float = 1.0
    blocksize: int = 128
    percdamp: float = 0.01
    sequential: bool = True
    device: str | torch.device | None = None
    error_batches: int = 8
    rollback: bool = True
    fuse_mlp: bool = True
    fuse_projections: bool = True
    memory: str = "compact"
    progress: bool = True
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"sparsify: method must be one of {METHODS}, got {self.method!r}")
        if self.fallback not in ("auto", "never"):
            raise ValueError(f"sparsify: fallback must be 'auto' or 'never', got {self.fallback!r}")
        if self.memory not in MEMORY_MODES:
            raise ValueError(f"sparsify: memory must be 'compact' or 'fast', got {self.memory!r}")
        if isinstance(self.include, str) or isinstance(self.exclude, str):
            raise TypeError("sparsify: include/exclude take a list of name patterns, not a single string")
        if not self.expected_tokens or any(int(m) < 1 for m in self.expected_tokens):
            raise ValueError(f"sparsify: expected_tokens must be positive token counts, got {self.expected_tokens}")
        if self.blocksize < 4 or self.blocksize % 4:
            raise ValueError(f"sparsify: blocksize must be a positive multiple of 4, got {self.blocksize}")
        if not 0 <= self.percdamp < 1:
            raise ValueError(f"sparsify: percdamp must be in [0, 1), got {self.percdamp}")


class SparsifyError(RuntimeError):
    """sparsify failed; ``converted`` lists the layers still converted (empty when fully restored)."""

    def __init__(self, message: str, converted: list[str]) -> None:
        super().__init__(message)
        self.converted = converted


def report(model: nn.Module) -> SparsifyReport:
    """The report of the last :func:`sparsify` on ``model`` (``.layers``, ``.to_dict()``, ``.table()``)."""
    rep = getattr(model, _REPORT_ATTR, None)
    if rep is None:
        raise ValueError("sparseflow.report: this model has not been through sparseflow.sparsify")
    return rep


def _input_device(model: nn.Module) -> torch.device | None:
    get_in = getattr(model, "get_input_embeddings", None)
    try:
        emb = get_in() if callable(get_in) else None
    except (AttributeError, NotImplementedError):
        emb = None
    for t in (*(emb.parameters() if emb is not None else ()), *model.parameters()):
        if t.device.type != "meta":
            return t.device
    return None


def _groups(targets: Iterable[Target]) -> dict[int, list[Target]]:
    """Selected targets keyed by their shared weight (one entry per weight to prune)."""
    out: dict[int, list[Target]] = {}
    for t in targets:
        out.setdefault(t.tie_key, []).append(t)
    return out


class _PrunedStandIn(nn.Module):
    """Takes a layer's place during its block's second pass: y = x W'^T + b with the pruned dense
    weight W'; on batches with ``measure`` set it also runs the original layer for rel_error."""

    def __init__(self, original: nn.Module, weight: torch.Tensor) -> None:
        super().__init__()
        self.__dict__["original"] = original  # not a submodule: .to() and named_modules skip it
        self.weight, self.bias = weight, original.bias
        self.measure = False
        self.sums: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x.to(self.weight.device), self.weight, self.bias)
        if self.measure:
            ref = self.original(x).float().to(y.device)
            self.sums.append(torch.stack([(y.float() - ref).square().sum(), ref.square().sum()]))
        return y

    def rel_error(self) -> float | None:
        if not self.sums:
            return None
        err, ref = (float(v) for v in torch.stack(self.sums).sum(0).cpu())
        return math.sqrt(err / ref) if ref > 0 else 0.0


class _Run:
    """One sparsify call: prunes ``targets`` marked "sparse", recording every swap in ``journal``."""

    def __init__(self, model: nn.Module, cfg: SparsifyConfig, targets: list[Target], journal: Journal) -> None:
        self.model, self.cfg, self.targets, self.journal = model, cfg, targets, journal
        self.device = torch.device(cfg.device) if cfg.device is not None else None
        self.calibration = "none"

    # -- converting -----------------------------------------------------------------------
    def convert(self, group: list[Target], new_weight: torch.Tensor) -> None:
        ref = group[0].module.weight
        compressed = compress_2_4(new_weight.to(device=ref.device, dtype=ref.dtype))
        for t in group:
            t.new = build_sparse(t, compressed)
            for parent, attr, name in t.sites:
                self.journal.swap(parent, attr, t.new, name)

    def release(self, targets: Iterable[Target]) -> None:
        """With rollback=False, drop the originals of finished layers (frees their memory)."""
        if not self.cfg.rollback:
            for t in targets:
                t.module = None
            self.journal.forget()

    def run_magnitude(self) -> None:
        groups = _groups(t for t in self.targets if t.action == "sparse")
        for group in tqdm(groups.values(), desc="sparsify[magnitude]", unit="layer", disable=not self.cfg.progress):
            self.convert(group, magnitude(group[0].weight()))
        self.release([t for g in groups.values() for t in g])

    # -- data methods -----------------------------------------------------------------------
    def gather(self, groups: dict[int, list[Target]], runs: Iterable[Callable[[], Any]]) -> dict[int, InputStats]:
        """Input statistics of every group, from forward hooks while ``runs`` execute. Layers fed
        the very same tensor (q/k/v, gate/up) share one InputStats instead of recomputing it."""
        hessian = self.cfg.method == "sparsegpt"
        stats: dict[int, InputStats] = {}
        seen: dict[int, tuple[torch.Tensor, InputStats]] = {}

        def hook_for(key: int, in_features: int, device: torch.device):
            def hook(module: nn.Module, args: tuple, output: Any) -> None:
                x = args[0]
                s = stats.get(key)
                if s is None:
                    hit = seen.get(id(x))
                    if hit is not None and hit[0] is x and hit[1].in_features == in_features:
                        stats[key] = hit[1]
                        return
                    s = stats[key] = InputStats(in_features, device, hessian)
                elif s.last is x:
                    return
                s.add(x)
                s.last = x
                seen[id(x)] = (x, s)

            return hook

        handles = [
            t.module.register_forward_hook(hook_for(key, t.in_features, t.module.weight.device))
            for key, group in groups.items()
            for t in group
        ]
        try:
            for run in runs:
                seen.clear()
                run()
        finally:
            for h in handles:
                h.remove()
            seen.clear()
            for s in stats.values():
                s.last = None
        return stats

    def prune(self, groups: dict[int, list[Target]], stats: dict[int, InputStats]) -> dict[int, torch.Tensor]:
        """The new 2:4 weight of every group (model dtype, on the weight's device)."""
        factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        out = {}
        for key, group in groups.items():
            s = stats.get(key)
            w = group[0].weight()
            if s is None or s.tokens == 0:
                new = magnitude(w)
                for t in group:
                    t.reason += "; no calibration tokens reached it, so magnitude"
            elif self.cfg.method == "wanda":
                new = wanda(w, s)
            else:
                if id(s) not in factors:
                    factors[id(s)] = sparsegpt_factor(s.hessian(), self.cfg.percdamp)
                new = sparsegpt(w, None, self.cfg.blocksize, self.cfg.percdamp, factor=factors[id(s)])
            out[key] = new.to(device=w.device, dtype=w.dtype)
        stats.clear()
        return out

    def second_pass(
        self, groups: dict[int, list[Target]], weights: dict[int, torch.Tensor], runs: list[Callable[[], Any]]
    ) -> None:
        """Run ``runs`` with every pruned layer computing with its new weight (a plain dense matmul,
        so calibration never builds GPU sparse plans or dense caches), measuring rel_error on the
        first ``error_batches``; the original modules are back in place afterwards."""
        temps = [(t, _PrunedStandIn(t.module, weights[key])) for key, group in groups.items() for t in group]
        try:
            for t, temp in temps:
                for parent, attr, _ in t.sites:
                    setattr(parent, attr, temp)
            for i, run in enumerate(runs):
                for _, temp in temps:
                    temp.measure = i < self.cfg.error_batches
                run()
        finally:
            for t, _ in temps:
                for parent, attr, _ in t.sites:
                    setattr(parent, attr, t.module)
        for t, temp in temps:
            t.rel_error = temp.rel_error()

    def convert_all(self, groups: dict[int, list[Target]], weights: dict[int, torch.Tensor]) -> None:
        for key, group in groups.items():
            self.convert(group, weights.pop(key))

    def run_data(self, batches: list[Batch]) -> None:
        selected = [t for t in self.targets if t.action == "sparse"]
        tokens = sum(int((b.get("input_ids", first_tensor(b)) if isinstance(b, dict) else b).numel()) for b in batches)
        self.calibration = f"{len(batches)} batches, ~{tokens} tokens"
        if not selected:
            return
        rest = selected
        found = find_blocks(self.model, {id(t.module) for t in selected}) if self.cfg.sequential else None
        if found is not None:
            name, blocks = found
            captured = capture_block_inputs(self.model, list(blocks), batches, self.device)
            if captured.chained:
                per_block, rest = self._assign(selected, blocks)
                self._sequential(blocks, captured, per_block)
                self.calibration += f"; sequential over {name} ({len(blocks)} blocks)"
            else:
                warnings.warn(
                    f"sparsify: the blocks of {name} are not called one after another on each other's outputs; "
                    "calibrating all layers at once on the dense model's activations",
                    RuntimeWarning,
                    stacklevel=3,
                )
        if rest:
            self._all_at_once(rest, batches)
            self.calibration += f"; {len(rest)} layers calibrated at once on the full model"

    @staticmethod
    def _assign(selected: list[Target], blocks: nn.ModuleList) -> tuple[dict[int, list[Target]], list[Target]]:
        """Targets per block index; a weight used in several blocks (or outside them) goes to ``rest``."""
        where: dict[int, set[int]] = {}
        members = [{id(m) for m in b.modules()} for b in blocks]
        for t in selected:
            where.setdefault(t.tie_key, set()).update(j for j, ids in enumerate(members) if id(t.module) in ids)
        per_block: dict[int, list[Target]] = {}
        rest = []
        for t in selected:
            js = where[t.tie_key]
            if len(js) == 1 and any(id(t.module) in ids for ids in members):
                per_block.setdefault(next(iter(js)), []).append(t)
            else:
                rest.append(t)
        return per_block, rest

    def _step(self, block: nn.Module, calls: list, hidden: list, b: int, store: bool) -> None:
        out = run_block(block, hidden[b], calls[b], self.device)
        if store:
            hidden[b] = out

    def _sequential(self, blocks: nn.ModuleList, captured: Any, per_block: dict[int, list[Target]]) -> None:
        hidden = captured.hidden
        n = len(hidden)
        bar = tqdm(
            range(max(per_block) + 1), desc=f"sparsify[{self.cfg.method}]", unit="block", disable=not self.cfg.progress
        )
        for j in bar:
            block, calls, mine = blocks[j], captured.calls[j], per_block.get(j, [])
            home = None
            if self.device is not None:
                home = module_device(block)
                block.to(self.device)
            try:
                groups = _groups(mine)
                if groups:
                    stats = self.gather(groups, [partial(self._step, block, calls, hidden, b, False) for b in range(n)])
                    weights = self.prune(groups, stats)
                    self.second_pass(
                        groups, weights, [partial(self._step, block, calls, hidden, b, True) for b in range(n)]
                    )
                    self.convert_all(groups, weights)
                else:
                    for b in range(n):
                        self._step(block, calls, hidden, b, True)
            finally:
                if home is not None:  # the block and the originals it held go back home, even on failure
                    block.to(home)
                    for t in mine:
                        if t.module is not None:
                            t.module.to(home)
            self.release(mine)
        bar.close()

    def _all_at_once(self, rest: list[Target], batches: list[Batch]) -> None:
        groups = _groups(rest)
        runs = [lambda b=b: call_model(self.model, b) for b in batches]
        bar = tqdm(runs, desc=f"sparsify[{self.cfg.method}] all layers", unit="batch", disable=not self.cfg.progress)
        weights = self.prune(groups, self.gather(groups, bar))
        self.second_pass(groups, weights, runs[: self.cfg.error_batches])
        self.convert_all(groups, weights)
        self.release(rest)


def sparsify(
    model: nn.Module,
    method: str = "magnitude",
    calibration: Iterable[Any] | None = None,
    tokenizer: Any = None,
    fallback: str = "auto",
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    **options: Any,
) -> nn.Module:
    """Prune ``model``'s linears to 2:4, compress them into ``SparseLinear`` and swap them in place.

    Layers: every ``nn.Linear`` and GPT-2 ``Conv1D`` except the output embeddings (``lm_head``)
    and weights tied to embeddings; ``include``/``exclude`` name patterns and
    ``filter_fn(module, name) -> bool`` change the selection (see :mod:`sparseflow.convert.walker`).

    method: ``"magnitude"`` (no data), ``"wanda"`` or ``"sparsegpt"``. The data methods need
    ``calibration``: token-id tensors (1xL or BxL), tokenizer outputs, or strings with
    ``tokenizer=``. They run block by block: each decoder block is calibrated on the outputs of
    the already-pruned blocks before it; layers outside the blocks (or all, for models without
    a stack of blocks) are calibrated together on full-model forwards at the end.

    fallback: ``"auto"`` keeps a layer as its original, unpruned module where 2:4 would not be
    faster: measured with the core dispatcher on the layer's GPU at every M in
    ``expected_tokens`` (default (16, 2048)), sparse only if it is at least ``min_speedup`` times
    dense at all of them. Without a GPU there is nothing to measure: every layer the 2:4
    kernels accept (both dims multiples of 32, :func:`sparseflow.convert.walker.shape_rule`)
    stays sparse, and the GPU the model is served on picks 2:4 or dense per shape at run time.
    ``"never"`` converts every selected layer. If layers were selected but fallback would
    convert none of them, :class:`SparsifyError` is raised (the model is left unchanged) rather
    than returning a dense model; a model with no convertible layer at all only warns.

    Other options (:class:`SparsifyConfig`): ``blocksize``/``percdamp`` (SparseGPT),
    ``sequential`` (False: calibrate all layers at once), ``device`` (calibrate a CPU-resident
    model block by block on this device), ``error_batches`` (batches used for the reported
    reconstruction error), ``rollback`` (keep originals until the end so a failure restores the
    model exactly; False frees them as it goes and a failure lists the converted layers),
    ``fuse_mlp`` (default True: SwiGLU MLPs whose gate and up became 2:4 run both as one fused
    decode kernel at M <= 64, :class:`sparseflow.nn.SparseGatedMLP`), ``fuse_projections`` (default
    True: an attention's 2:4 q/k/v projections, and an MLP's gate/up, run as one GEMM of one
    layout in the compact mode on a GPU, :func:`sparseflow.nn.fuse_projections`), ``memory`` (the 2:4 layers'
    memory mode, ``SparseLinear``: "compact", the default, builds each GPU layer's one layout
    here; "fast"), ``progress``, ``verbose`` (default False: print the report table; :func:`report` gives it
    either way).

    Returns ``model`` (in eval mode); :func:`report` gives what was done per layer.
    """
    if not isinstance(model, nn.Module):
        hint = " (load it first, e.g. AutoModelForCausalLM.from_pretrained(name))" if isinstance(model, str) else ""
        raise TypeError(f"sparsify: expected an nn.Module, got {type(model).__name__}{hint}")
    cfg = SparsifyConfig(method=method, fallback=fallback, filter_fn=filter_fn, **_known(options))
    if cfg.method != "magnitude" and calibration is None:
        raise ValueError(
            f"sparsify: method={cfg.method!r} needs calibration data: pass calibration=[token-id tensors] "
            "(or a list of strings with tokenizer=), or use method='magnitude'"
        )
    device = torch.device(cfg.device) if cfg.device is not None else None
    if device is not None and len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1:
        raise ValueError("sparsify: device= is for models on one device; a device_map model is calibrated in place")
    start = time.perf_counter()
    targets = collect_targets(model, cfg.include, cfg.exclude, cfg.filter_fn)
    decide_fallback(targets, cfg.fallback, cfg.expected_tokens, cfg.min_speedup, device, cfg.memory)
    _check_something_converts(targets)
    batches = prepare_batches(calibration, tokenizer, _input_device(model)) if cfg.method != "magnitude" else None
    was_training = model.training
    model.eval()
    journal = Journal()
    run = _Run(model, cfg, targets, journal)
    try:
        with torch.no_grad():
            if batches is None:
                run.run_magnitude()
            else:
                run.run_data(batches)
    except BaseException as exc:
        restored = journal.restore()
        model.train(was_training)
        left = [] if restored else [e[3] for e in journal.entries if e[2] is None]
        if not isinstance(exc, Exception):
            raise
        what = (
            "the model was restored: no layer was changed"
            if restored
            else f"{len(left)} layers stay converted to SparseLinear (rollback=False), the rest were restored: {left}"
        )
        raise SparsifyError(
            f"sparsify(method={cfg.method!r}) failed: {type(exc).__name__}: {exc}; {what}", left
        ) from exc
    journal.forget()
    if cfg.fuse_mlp:
        fuse_gated_mlps(model)
    if cfg.fuse_projections:
        fuse_projections(model)
    # On a GPU each compact layer keeps one layout from now on (built here, not at the first call)
    kept = {}
    for name, mod in model.named_modules():
        if isinstance(mod, SparseLinear):
            mod.memory = cfg.memory
            if mod.make_resident() is not None:
                kept[name] = (mod.resident, mod.memory_bytes()["total"])
    rep = SparsifyReport(
        cfg.method,
        cfg.fallback,
        [
            LayerReport(
                t.name,
                t.kind,
                (t.out_features, t.in_features),
                t.action,
                t.reason.lstrip("; "),
                t.speedup,
                t.rel_error,
                [s[2] for s in t.sites[1:]],
                *kept.get(t.name, (None, None)),
            )
            for t in targets
        ],
        time.perf_counter() - start,
        run.calibration,
    )
    object.__setattr__(model, _REPORT_ATTR, rep)
    if cfg.verbose:
        print(rep.table())
    return model


def _check_something_converts(targets: list[Target]) -> None:
    """Refuse (before anything is pruned) when fallback would turn every selected layer dense:
    the result would be the dense model under a 2:4 name. No convertible layer at all only warns."""
    if any(t.action == "sparse" for t in targets):
        return
    kept = [t for t in targets if t.action == "dense-fallback"]
    if kept:
        raise SparsifyError(
            f"sparsify: fallback='auto' keeps all {len(kept)} selected layers dense, so nothing would be converted "
            f"(e.g. {kept[0].name}: {kept[0].reason}); pass fallback='never' (CLI: --fallback never) to convert "
            "them anyway. The model was not changed",
            [],
        )
    why = sorted({t.reason for t in targets})
    warnings.warn(
        f"sparsify: the model has no layer that can be converted to 2:4 ({len(targets)} Linear/Conv1D layers"
        + (f"; {'; '.join(why[:3])}" if why else "")
        + "); it is returned unchanged",
        RuntimeWarning,
        stacklevel=3,
    )


def _known(options: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(SparsifyConfig)} - {"method", "fallback", "filter_fn"}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"sparsify: unknown option(s) {unknown}; valid: {sorted(names)}")
    return options
