"""``sparse_mm``: ``F.linear`` with a compressed 2:4 weight, registered as a ``torch.library`` op.

The op ``sparseflow::sparse_linear`` is opaque to ``torch.compile`` (a fake implementation gives
output shapes) and safe under CUDA-graph capture once each shape has been run eagerly. Its CUDA
implementation looks the weight (and so its cached kernel layouts) up by an integer handle, so
compiled graphs carry no Python objects. Four kernels (``sparseflow.kernels.KERNELS``) can serve a
call: dense cuBLAS, cuSPARSELt (M >= 16), CUTLASS's sm90 kernels (Hopper, any M) and our decode
kernel (M <= 64); ``sparseflow.kernels.dispatch`` measures which is fastest per shape.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from sparseflow._ext import sparse_unavailable_reason, warn_once
from sparseflow.format import Sparse24Weight
from sparseflow.kernels import KERNELS
from sparseflow.kernels.cusparselt import CSLT_ALIGN, cslt_layout, cslt_unsupported
from sparseflow.kernels.cusparselt import cache_key as cslt_cache_key
from sparseflow.kernels.cutlass import PaddedRun, PlannedRun
from sparseflow.kernels.decode import DECODE_MAX_M, portable_ok, portable_view
from sparseflow.kernels.dispatch import DISPATCHER, cutlass_steps, default_sparse, m_bucket

__all__ = ["BACKENDS", "sparse_mm"]

# auto: fastest measured (never slower than dense); sparse: fastest measured 2:4 kernel; the
# others force one kernel.
BACKENDS = {"auto": 0, "sparse": 1, "dense": 2, "cusparselt": 3, "decode": 4, "cutlass": 5}
_SPARSE_DTYPES = (torch.float16, torch.bfloat16)

_lib = torch.library.Library("sparseflow", "DEF")
_lib.define("sparse_linear(Tensor x, Tensor values, Tensor meta, Tensor? bias, int handle, int backend) -> Tensor")

_handles: dict[int, weakref.ref] = {}
_next_handle = itertools.count(1)


class Route(NamedTuple):
    """How one weight runs at one M-bucket: ``run(x, layout, cfg, bias)``."""

    version: int  # the weight's values._version when resolved (an in-place change re-resolves)
    run: Callable[..., torch.Tensor]  # the kernel's run
    layout: Any  # the kernel's layout of the weight
    cfg: Any  # the kernel's configuration for this M-bucket


# Hot-path routes: (handle, M-bucket, backend) -> Route. One dict lookup and one call per forward
# instead of the dispatcher's keyed search; dropped with the weight.
_routes: dict[tuple[int, int, int], Route] = {}


def forget_routes(h: int) -> None:
    """Drop the resolved routes of the weight with handle ``h`` (its layouts are changing)."""
    for key in [key for key in _routes if key[0] == h]:
        _routes.pop(key, None)


def _forget(h: int) -> None:
    _handles.pop(h, None)
    forget_routes(h)


def _handle(weight: Sparse24Weight) -> int:
    h = weight._handle
    if h is None:
        h = next(_next_handle)
        _handles[h] = weakref.ref(weight, lambda _, h=h: _forget(h))
        weight._handle = h
    return h


def _lookup(values: torch.Tensor, meta: torch.Tensor, handle: int) -> Sparse24Weight:
    ref = _handles.get(handle)
    w = ref() if ref is not None else None
    if w is not None and w.values.data_ptr() == values.data_ptr() and w.meta.data_ptr() == meta.data_ptr():
        return w
    # Not the registered tensors (e.g. a graph replayed with other buffers): correct, but uncached.
    return Sparse24Weight(values, meta, (values.shape[0], values.shape[1] * 2))


def _reference(x: torch.Tensor, w: Sparse24Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """The CPU path: decompress + matmul in float32 (exact for fp32, one rounding for fp16/bf16)."""
    out = F.linear(x.float(), w.decompress().float(), None if bias is None else bias.float())
    return out.to(x.dtype)


@torch.library.impl(_lib, "sparse_linear", "CPU")
def _sparse_linear_cpu(x, values, meta, bias, handle, backend):
    return _reference(x, _lookup(values, meta, handle), bias)


def _cutlass_route(w: Sparse24Weight, d, m: int) -> tuple:
    """(run, cfg) for CUTLASS at M's bucket: the configuration measured fastest there per M
    (``cutlass_steps``; else 0, which runs at every M), with x padded to whole token tiles where
    that measured faster."""
    if d is None or d.cutlass_ms is None:
        return KERNELS["cutlass"].run, KERNELS["cutlass"].readback_cfg
    steps = cutlass_steps(d, m_bucket(m), w.dtype)
    if len(steps) > 1:
        return PlannedRun(steps), steps[-1].cfg
    step = steps[0]
    return (PaddedRun(step.tile) if step.tile else KERNELS["cutlass"].run), step.cfg


def _resident_route(w: Sparse24Weight, m: int) -> Route:
    """The route of a weight that keeps one kernel's layout only (``keep_only``): that kernel at
    every M, with the configuration measured fastest for it at this M-bucket."""
    kernel, run = w.resident, KERNELS[w.resident].run
    layout = w.layout(kernel)
    if kernel == "dense":
        return Route(w.values._version, run, layout, None)
    capturing = torch.cuda.is_current_stream_capturing()
    if capturing:
        d = DISPATCHER.lookup(w.device, w.dtype, *w.shape, m, only=kernel)
    else:
        d = DISPATCHER.decide(w, m, only=kernel)
    if kernel == "cutlass":
        run, cfg = _cutlass_route(w, d, m)
    elif kernel == "cusparselt":
        same_buffer = d is not None and d.sparse_ms is not None and cslt_cache_key(d.layout) == cslt_cache_key(1)
        cfg = (d.cfg, d.layout) if same_buffer else KERNELS[kernel].readback_cfg
    else:  # decode: the layer's backend is "decode", which refuses M > 64 before this
        cfg = (d.decode_split, d.decode_ring) if d is not None and d.decode_ms is not None else (0, False)
    return Route(w.values._version, run, layout, cfg)


_FORCED = {BACKENDS[name]: name for name in ("dense", "cusparselt", "decode", "cutlass")}


def _route(w: Sparse24Weight, m: int, backend: int) -> Route:
    if w.resident is not None and _FORCED.get(backend, w.resident) == w.resident:
        return _resident_route(w, m)
    if backend == BACKENDS["dense"]:
        kernel = "dense"
    elif backend == BACKENDS["cusparselt"]:
        kernel = "cusparselt"
    elif backend == BACKENDS["decode"]:
        kernel = "decode"
    elif backend == BACKENDS["cutlass"]:
        kernel = "cutlass"
    elif torch.cuda.is_current_stream_capturing() and DISPATCHER.lookup(w.device, w.dtype, *w.shape, m) is None:
        kernel = default_sparse(m) if backend == BACKENDS["sparse"] else DISPATCHER.decide(w, m).choice
    else:
        d = DISPATCHER.decide(w, m)
        kernel = d.choice
        if backend == BACKENDS["sparse"]:
            kernel = d.best_sparse if (d.decode_ms or d.sparse_ms) else default_sparse(m)
    d = DISPATCHER.lookup(w.device, w.dtype, *w.shape, m)
    run = KERNELS[kernel].run
    if kernel == "dense":
        return Route(w.values._version, run, w.layout("dense"), None)
    if kernel == "decode":
        if d is not None and d.decode_portable and portable_ok(w):  # in place: (values, meta), no packed copy
            return Route(w.values._version, run, portable_view(w), (d.decode_split, d.decode_ring))
        return Route(w.values._version, run, w.layout("decode"), (d.decode_split, d.decode_ring) if d else (0, False))
    if kernel == "cutlass":
        why = KERNELS["cutlass"].refusal(w.device, w.dtype, *w.shape)
        if why:  # reached only by backend='cutlass'
            raise ValueError(f"sparseflow: backend='cutlass' cannot run {w}: {why}; use backend='auto'")
        run, cfg = _cutlass_route(w, d, m)
        return Route(w.values._version, run, w.layout("cutlass"), cfg)
    why = cslt_unsupported(*w.shape)
    if why:  # reached only by a forced 2:4 backend at an M the decode kernel cannot take
        raise ValueError(
            f"sparseflow: cuSPARSELt cannot run this weight at M={m}: {why} (N and K must be multiples of "
            f"{CSLT_ALIGN}, and the decode kernel takes M <= {DECODE_MAX_M} only); use backend='auto' or 'dense'"
        )
    searched = d is not None and d.sparse_ms is not None
    layout = d.layout if searched else cslt_layout(m_bucket(m))
    cfg = d.cfg if searched else [-1, 1, 0, 0]
    return Route(w.values._version, run, w.layout("cusparselt", layout), (cfg, layout))


def cuda_forward(x: torch.Tensor, w: Sparse24Weight, bias: torch.Tensor | None, handle: int, backend: int):
    """The CUDA implementation, called directly in eager mode (no dispatcher hop) and by the op."""
    n, k = w.shape
    flat = x.dim() == 2  # the common case skips two view ops (~1 us of host time each)
    x2 = x if flat else x.reshape(-1, k)
    m = x2.shape[0]
    key = (handle, m_bucket(m), backend)
    r = _routes.get(key)
    if r is None or r.version != w.values._version:
        r = _routes[key] = _route(w, m, backend)
        if backend in (BACKENDS["auto"], BACKENDS["sparse"]) and not (
            w.resident == "dense" or DISPATCHER.lookup(w.device, w.dtype, n, k, m, only=w.resident)
        ):
            _routes.pop(key)  # a default taken during capture: decide again once measuring is possible
    y = r.run(x2, r.layout, r.cfg, bias)
    return y if flat else y.view(*x.shape[:-1], n)


@torch.library.impl(_lib, "sparse_linear", "CUDA")
def _sparse_linear_cuda(x, values, meta, bias, handle, backend):
    return cuda_forward(x, _lookup(values, meta, handle), bias, handle, backend)


@torch.library.register_fake("sparseflow::sparse_linear")
def _sparse_linear_fake(x, values, meta, bias, handle, backend):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


def _validate(x, w, bias) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"sparse_mm: x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(w, Sparse24Weight):
        raise TypeError(f"sparse_mm: weight must be a Sparse24Weight (from compress_2_4), got {type(w).__name__}")
    n, k = w.shape
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"sparse_mm: x has shape {tuple(x.shape)}, its last dim must equal in_features K={k}")
    if not x.is_floating_point():
        raise TypeError(f"sparse_mm: x must be floating point, got {x.dtype}")
    if x.dtype != w.dtype:
        raise TypeError(f"sparse_mm: dtype mismatch: x is {x.dtype} but the weight is {w.dtype}")
    if x.device != w.device:
        raise ValueError(f"sparse_mm: device mismatch: x is on {x.device} but the weight is on {w.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,):
            raise ValueError(f"sparse_mm: bias must have shape ({n},), got {getattr(bias, 'shape', bias)}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise TypeError(f"sparse_mm: bias is {bias.dtype} on {bias.device}, expected {x.dtype} on {x.device}")


def _cuda_backend(x: torch.Tensor, w: Sparse24Weight, backend: str) -> str:
    """Resolve the backend to what can really run here; raise where the user forced the impossible."""
    n, k = w.shape
    m = x.numel() // k if k else 0
    reason = sparse_unavailable_reason(x.device)
    if reason is None and x.dtype not in _SPARSE_DTYPES:
        reason = f"{x.dtype} inputs have no 2:4 tensor-core path (use float16 or bfloat16)"
    cslt_reason = cslt_unsupported(n, k)
    decode_reason = None if m <= DECODE_MAX_M else f"M={m} rows exceed the decode kernel's limit of {DECODE_MAX_M}"
    if reason is None and backend == "cusparselt":
        reason = cslt_reason
    elif reason is None and backend == "decode":
        reason = decode_reason
    elif reason is None and backend == "cutlass":
        reason = KERNELS["cutlass"].refusal(x.device, x.dtype, n, k)
    elif reason is None and backend in ("auto", "sparse") and cslt_reason and decode_reason:
        reason = f"{cslt_reason}, and {decode_reason}"
    if reason is None:
        return backend
    if backend != "auto" and backend != "dense":
        raise ValueError(f"sparse_mm(backend={backend!r}): cannot run the 2:4 kernel: {reason}")
    warn_once(f"fallback:{reason}", f"sparseflow: running dense instead of 2:4 because {reason}")
    return "dense"


def resolve_backend(x: torch.Tensor, w: Sparse24Weight, backend: str) -> str:
    """The backend a call will really use (shared by ``sparse_mm`` and ``SparseLinear``): on the
    CPU the reference path serves "auto"/"dense" (with a one-time warning) and a forced GPU
    kernel is an error; on CUDA see ``_cuda_backend``."""
    if x.device.type == "cuda":
        return _cuda_backend(x, w, backend)
    if backend not in ("auto", "dense"):
        raise ValueError(f"sparse_mm(backend={backend!r}): the 2:4 kernels need CUDA tensors, these are on {x.device}")
    warn_once("cpu", "sparseflow: 2:4 weights on the CPU run through a dense reference path (correct, not fast)")
    return backend


def sparse_mm(
    x: torch.Tensor, weight: Sparse24Weight, bias: torch.Tensor | None = None, backend: str = "auto"
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with W (out_features x in_features) given compressed.

    ``x`` is (..., in_features). ``backend``: ``"auto"`` (per-shape measured choice among dense
    cuBLAS and the 2:4 kernels: never slower than dense), ``"sparse"`` (the faster 2:4 kernel;
    errors where none can run), ``"dense"``, or one kernel: ``"cusparselt"``, ``"cutlass"``
    (Hopper only) or ``"decode"`` (ours, M <= 64). On the CPU the result comes from an exact
    reference (decompress + matmul in float32).
    """
    if backend not in BACKENDS:
        raise ValueError(f"sparse_mm: backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    _validate(x, weight, bias)
    backend = resolve_backend(x, weight, backend)
    if x.numel() == 0:
        return x.new_zeros((*x.shape[:-1], weight.shape[0])) + (0 if bias is None else bias)
    if x.is_cuda and not torch.compiler.is_compiling():
        return cuda_forward(x, weight, bias, _handle(weight), BACKENDS[backend])
    return torch.ops.sparseflow.sparse_linear(x, weight.values, weight.meta, bias, _handle(weight), BACKENDS[backend])
