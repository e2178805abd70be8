"""``SparseLinear``: a drop-in ``nn.Linear`` whose weight is stored 2:4-compressed.

The compressed tensors are buffers (``weight_values``, ``weight_meta``), so they travel through
``state_dict``/``load_state_dict`` and ``.to(device/dtype)`` like any weight.

On a GPU a layer keeps one 2:4 layout by default (``memory="compact"``): the first call builds
the layout of the kernel it will run (CUTLASS's on Hopper, ``autotune`` may choose another) and
frees the portable buffers (they become empty N x 0 placeholders). ``state_dict`` then reads the
portable form back from that layout into host memory, ``.to()`` and ``load_state_dict`` restore it
first, so the module behaves as if it held it. ``memory="fast"`` keeps the portable form, every
layout the dispatcher chose per M-bucket and a dense copy where dense was faster: never slower
than dense, at more GPU memory than the dense weight.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from sparseflow.format import Sparse24Weight, compress_2_4, prune_2_4
from sparseflow.kernels import KERNELS
from sparseflow.kernels.dispatch import DISPATCHER, default_resident
from sparseflow.ops import BACKENDS, _handle, _validate, cuda_forward, resolve_backend

MEMORY_MODES = ("compact", "fast")


class _Checked(NamedTuple):
    """What ``forward`` last checked x against: while the buffers, x's dtype and device are these,
    it skips validation and resolution and calls the kernel route of (``handle``, ``backend``)."""

    values: torch.Tensor
    meta: torch.Tensor
    dtype: torch.dtype
    device: torch.device
    handle: int  # the weight's key in sparseflow.ops' route table
    backend: int  # sparseflow.ops.BACKENDS code
    weight: Sparse24Weight


class SparseLinear(nn.Module):
    """y = x W^T + b with W (out_features x in_features) in the portable 2:4 form.

    ``backend``: "auto" (measured per shape and M-bucket: dense cuBLAS, cuSPARSELt, CUTLASS's sm90
    kernels or our decode kernel, whichever is fastest), "sparse" (the fastest 2:4 kernel),
    "dense", "cusparselt", "cutlass" or "decode". Inference only (no backward).

    ``memory``: "compact" (default: on a GPU, one layout of the weight, that of the kernel it
    runs at every M; see ``resident``) or "fast" (every layout the per-M choice wants, plus a
    dense copy where dense wins: the fastest per M, at more GPU memory).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str = "auto",
        memory: str = "compact",
    ) -> None:
        super().__init__()
        if in_features % 4:
            raise ValueError(f"SparseLinear: in_features={in_features} must be a multiple of 4 for 2:4 groups")
        dtype = dtype or torch.get_default_dtype()
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        self._memory, self._pinned = _check_memory(memory), None
        self.register_buffer("weight_values", torch.zeros(out_features, in_features // 2, device=device, dtype=dtype))
        self.register_buffer(
            "weight_meta",
            torch.full((out_features, (in_features + 7) // 8), 0b0100_0100, device=device, dtype=torch.uint8),
        )
        b = torch.zeros(out_features, device=device, dtype=dtype) if bias else None
        self.register_parameter("bias", None if b is None else nn.Parameter(b, requires_grad=False))
        self._w: Sparse24Weight | None = None
        self._route: _Checked | None = None

    @property
    def backend(self) -> str:
        # (a module pickled before backend was a property holds it as "backend")
        return self.__dict__.get("_backend", self.__dict__.get("backend", "auto"))

    @backend.setter
    def backend(self, value: str) -> None:
        """Settable at any time (e.g. ``"sparse"`` on every layer of a model to never build a
        dense fallback copy on the GPU); the next call routes afresh."""
        if value not in BACKENDS:
            raise ValueError(f"SparseLinear: backend must be one of {sorted(BACKENDS)}, got {value!r}")
        self._split_group()
        self._backend = value
        self._route = None

    @property
    def memory(self) -> str:
        return self.__dict__.get("_memory", "fast")  # (pickled before memory modes: it held every layout)

    @memory.setter
    def memory(self, value: str) -> None:
        """ "compact" or "fast"; switching to "fast" restores the portable form on the device."""
        self._memory = _check_memory(value)
        if value == "fast":
            self._split_group()
            self._restore()
        self._route = None

    @property
    def resident(self) -> str | None:
        """The kernel whose layout is this layer's one copy of its weight on the GPU (compact mode,
        after the first call there), or None. Set it to a kernel name ("cutlass", "cusparselt",
        "decode", "dense") to choose that layout (``sf.autotune`` does, by measurement); None
        goes back to the default (``sparseflow.kernels.dispatch.default_resident``)."""
        fused = self._fused()
        if fused is not None:
            return fused.resident
        w = self._kept()
        return None if w is None else w.resident

    @resident.setter
    def resident(self, kernel: str | None) -> None:
        if kernel is not None and kernel not in KERNELS:
            raise ValueError(f"SparseLinear.resident must be one of {sorted(KERNELS)} or None, got {kernel!r}")
        self.__dict__["_pinned"] = kernel
        self._route = None
        fused = self._fused()
        if fused is not None:  # the layout is the group's: choose it there
            fused.resident = kernel

    @classmethod
    def from_dense(
        cls, linear: nn.Linear, prune: bool = False, backend: str = "auto", memory: str = "compact"
    ) -> SparseLinear:
        """Compress ``linear`` (already 2:4 unless ``prune=True``, which applies ``prune_2_4``)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseLinear.from_dense: expected nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        compressed = compress_2_4(prune_2_4(w) if prune else w)
        return cls.from_compressed(compressed, None if linear.bias is None else linear.bias.detach(), backend, memory)

    @classmethod
    def from_compressed(
        cls, weight: Sparse24Weight, bias: torch.Tensor | None = None, backend: str = "auto", memory: str = "compact"
    ) -> SparseLinear:
        n, k = weight.shape
        weight = weight.materialized()
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod.in_features, mod.out_features, mod.backend = k, n, backend
        mod._memory, mod._pinned = _check_memory(memory), None
        mod.register_buffer("weight_values", weight.values)
        mod.register_buffer("weight_meta", weight.meta)
        mod.register_parameter(
            "bias", None if bias is None else nn.Parameter(bias.to(weight.values), requires_grad=False)
        )
        mod._w, mod._route = None, None
        return mod

    @property
    def weight_2_4(self) -> Sparse24Weight:
        """The compressed weight (rebuilt when the buffers were replaced by .to() or loading; for
        a member of a fused ``ProjectionGroup``, a copy read back from the group's layout)."""
        group = self._fused_group()
        if group is not None:
            return Sparse24Weight(*group.portable(self), (self.out_features, self.in_features))
        w = self._w
        if w is None or w.values is not self.weight_values or w.meta is not self.weight_meta:
            w = self._w = Sparse24Weight(self.weight_values, self.weight_meta, (self.out_features, self.in_features))
            self._route = None
        return w

    def dense_weight(self) -> torch.Tensor:
        """The decompressed weight (a new tensor)."""
        return self.weight_2_4.decompress()

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the portable compressed weight (what state_dict and checkpoints hold)."""
        if self._fused_group() is not None:
            n, k, item = self.out_features, self.in_features, self.weight_values.element_size()
            return n * (k // 2) * item + n * ((k + 7) // 8)
        return self.weight_2_4.nbytes

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of the weight this layer holds now where it lives (the bias not counted): the
        portable form (0 once a compact layer keeps one layout on the GPU), each kernel layout
        built from it (cuSPARSELt's buffer, CUTLASS's sm90 form, the decode kernel's fragments),
        a dense copy (compact: the layout of a layer that runs dense; fast: the fallback where
        dense won at some M), and their ``total``. A member of a fused ``ProjectionGroup``
        reports its rows' share of the group's bytes."""
        fused = self._fused()
        if fused is not None:
            share = self.out_features / fused.out_features
            return {key: int(v * share) for key, v in fused.memory_bytes().items()}
        w = self.weight_2_4
        held = w.layout_bytes()
        out = {
            "portable": w.values.numel() * w.values.element_size() + w.meta.numel(),
            "cusparselt": held.get("cusparselt", 0),
            "cutlass": held.get("cutlass", 0),
            "decode": held.get("decode", 0),
            "dense_fallback": held.get("dense", 0),
        }
        out["total"] = sum(out.values())
        return out

    # -- the compact mode's one layout --------------------------------------------------------
    def make_resident(self) -> str | None:
        """Compact mode on a GPU: build the one layout now, as the first call would, and free the
        portable form. Returns the kernel kept, or None (CPU, fast mode, inside a capture)."""
        group = self.__dict__.get("_group")
        if group is not None and group.build() is not None:
            return self.resident  # the group's one layout (q/k/v fused: sparseflow.nn.projections)
        w = self.weight_2_4
        if self.memory != "compact" or w.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return None
        self._prepare(torch.empty(1, self.in_features, dtype=w.dtype, device=w.device))
        return self.resident

    def _resident_kernel(self, w: Sparse24Weight, backend: str) -> str:
        if backend in ("dense", "cusparselt", "cutlass", "decode"):  # forced, or the fallback taken
            return backend
        pinned = self.__dict__.get("_pinned")
        usable = pinned is not None and KERNELS[pinned].refusal(w.device, w.dtype, *w.shape) is None
        if usable and (backend == "auto" or pinned != "dense"):  # "sparse" never runs dense
            return pinned
        return default_resident(w, backend)

    def _kept(self) -> Sparse24Weight | None:
        """The weight, if it keeps one layout only and its placeholders are this layer's buffers
        (not replaced since, by loading or by hand)."""
        w = self.__dict__.get("_w")
        if w is not None and w.resident is not None and w.values is self._buffers.get("weight_values"):
            return w
        return None

    def _fused_group(self):
        """The ``ProjectionGroup`` this layer runs fused in, or None."""
        group = self.__dict__.get("_group")
        return group if group is not None and group.fused is not None else None

    def _fused(self) -> SparseLinear | None:
        """The fused layer this one runs as a slice of, or None."""
        group = self._fused_group()
        return None if group is None else group.fused

    def _split_group(self) -> None:
        """Leave the fused state: every member of the group holds its portable form again."""
        group = self._fused_group()
        if group is not None:
            group.split()

    def _restore(self) -> None:
        """Hold the portable form again (read back from the one layout kept), as a plain layer."""
        w = self._kept()
        if w is not None:
            values, meta = w.portable()
            self._buffers["weight_values"], self._buffers["weight_meta"] = values, meta
            self._w, self._route = None, None

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        group = self._fused_group()
        if group is not None:  # this layer's rows of the fused layout, into host memory
            values, meta = group.portable(self, "cpu")
            destination[prefix + "weight_values"], destination[prefix + "weight_meta"] = values, meta
            return
        w = self._kept()
        if w is not None:
            # read back layer by layer into host memory: a whole model's portable form never
            # sits on the GPU beside its layouts
            values, meta = w.portable("cpu")
            destination[prefix + "weight_values"], destination[prefix + "weight_meta"] = values, meta

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self._split_group()
        self._restore()  # loading copies into full-size buffers
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse: bool = True):
        group = self._fused_group()
        if group is not None:
            if _stays(fn, self.weight_values):  # keep the group's layout
                return self._apply_to_the_rest(fn, recurse)
            group.split()  # the members move as plain layers; make_resident fuses them again
        w = self._kept()
        if w is not None:
            if _stays(fn, w.values):  # keep its layout
                return self._apply_to_the_rest(fn, recurse)
            self._restore()
        return super()._apply(fn, recurse)

    def _apply_to_the_rest(self, fn, recurse: bool):
        """``Module._apply`` on everything but the weight's placeholders: where nothing about the
        weight changes, its one layout stays as it is."""
        held = self._buffers.pop("weight_values"), self._buffers.pop("weight_meta")
        try:
            return super()._apply(fn, recurse)
        finally:
            self._buffers["weight_values"], self._buffers["weight_meta"] = held

    @torch.compiler.disable
    def _prepare(self, x: torch.Tensor) -> tuple:
        w = self.weight_2_4
        _validate(x, w, self.bias)
        backend = resolve_backend(x, w, self.backend)
        # (accelerate's offloading hooks swap the buffers in and out around each call: left alone)
        offloaded = getattr(getattr(self, "_hf_hook", None), "offload", False)
        if self.memory == "compact" and x.is_cuda and not offloaded and not torch.cuda.is_current_stream_capturing():
            kernel = self._resident_kernel(w, backend)
            if w.resident != kernel:
                w.keep_only(kernel)
                self._buffers["weight_values"], self._buffers["weight_meta"] = w.values, w.meta
        self._route = _Checked(w.values, w.meta, x.dtype, x.device, _handle(w), BACKENDS[backend], w)
        return self._route

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.__dict__.get("_group")
        if group is not None and group.fused is not None:
            return group.out(self, x)  # q/k/v fused: this layer's slice of one GEMM
        # Hot path: identity checks against the checked route, no Module.__getattr__ lookups.
        r, bufs = self._route, self._buffers
        if (
            r is None
            or r.values is not bufs["weight_values"]
            or r.meta is not bufs["weight_meta"]
            or r.dtype is not x.dtype
            or r.device != x.device
            or x.shape[-1] != self.in_features
        ):
            r = self._prepare(x)
        bias = self._parameters["bias"]
        if x.numel() == 0:
            return x.new_zeros((*x.shape[:-1], self.out_features))
        if x.is_cuda and not torch.compiler.is_compiling():  # eager: skip the dispatcher hop
            return cuda_forward(x, r.weight, bias, r.handle, r.backend)
        return torch.ops.sparseflow.sparse_linear(x, r.values, r.meta, bias, r.handle, r.backend)

    def dispatch_info(self) -> list[dict]:
        """Measured per-M-bucket decisions for this layer's shape on its device (empty on CPU)."""
        if self.weight_values.device.type != "cuda":
            return []
        return DISPATCHER.table(
            self.weight_values.device, self.weight_values.dtype, self.out_features, self.in_features
        )

    def extra_repr(self) -> str:
        kept = f", resident={self.resident}" if self.resident else ""
        if self._fused_group() is not None:
            kept += f", fused rows {self.__dict__['_group_rows']} of {self._fused().out_features}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"2:4, backend={self.backend}, memory={self.memory}{kept}"
        )


def _stays(fn, t: torch.Tensor) -> bool:
    """Whether ``fn`` (what ``Module._apply`` applies) leaves a tensor like ``t`` on its device and
    dtype. A tensor method fn (e.g. share_memory_) may refuse the probe: then it does not."""
    try:
        probe = fn(torch.empty(0, dtype=t.dtype, device=t.device))
    except (RuntimeError, TypeError, ValueError):
        return False
    return probe.device == t.device and probe.dtype == t.dtype


def _check_memory(value: str) -> str:
    if value not in MEMORY_MODES:
        raise ValueError(f"SparseLinear: memory must be one of {MEMORY_MODES}, got {value!r}")
    return value


def set_memory(model: nn.Module, memory: str) -> int:
    """Set ``memory`` ("compact" or "fast") on every ``SparseLinear`` of ``model``; returns how many."""
    _check_memory(memory)
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    for m in layers:
        m.memory = memory
    return len(layers)
