"""``SparseLinear``: a drop-in ``nn.Linear`` whose weight is stored 2:4-compressed.

The compressed tensors are buffers (``weight_values``, ``weight_meta``), so they travel through
``state_dict``/``load_state_dict`` and ``.to(device/dtype)`` like any weight.
"""

from __future__ import annotations

import torch
from torch import nn

from sparseflow.format import Sparse24Weight, compress_2_4, prune_2_4
from sparseflow.kernels.dispatch import DISPATCHER
from sparseflow.ops import BACKENDS, _handle, _validate, cuda_forward, resolve_backend


class SparseLinear(nn.Module):
    """y = x W^T + b with W (out_features x in_features) in the portable 2:4 form.

    ``backend``: "auto" (measured per shape and M-bucket: dense cuBLAS, cuSPARSELt, CUTLASS's sm90
    kernels or our decode kernel, whichever is fastest), "sparse" (the fastest 2:4 kernel),
    "dense", "cusparselt", "cutlass" or "decode". Inference only (no backward).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if in_features % 4:
            raise ValueError(f"SparseLinear: in_features={in_features} must be a multiple of 4 for 2:4 groups")
        dtype = dtype or torch.get_default_dtype()
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        self.register_buffer("weight_values", torch.zeros(out_features, in_features // 2, device=device, dtype=dtype))
        self.register_buffer(
            "weight_meta",
            torch.full((out_features, (in_features + 7) // 8), 0b0100_0100, device=device, dtype=torch.uint8),
        )
        b = torch.zeros(out_features, device=device, dtype=dtype) if bias else None
        self.register_parameter("bias", None if b is None else nn.Parameter(b, requires_grad=False))
        self._w: Sparse24Weight | None = None
        self._route: tuple | None = None  # (values, meta, x dtype, device) -> (handle, backend code)

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
        self._backend = value
        self._route = None

    @classmethod
    def from_dense(cls, linear: nn.Linear, prune: bool = False, backend: str = "auto") -> SparseLinear:
        """Compress ``linear`` (already 2:4 unless ``prune=True``, which applies ``prune_2_4``)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseLinear.from_dense: expected nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        compressed = compress_2_4(prune_2_4(w) if prune else w)
        return cls.from_compressed(compressed, None if linear.bias is None else linear.bias.detach(), backend)

    @classmethod
    def from_compressed(
        cls, weight: Sparse24Weight, bias: torch.Tensor | None = None, backend: str = "auto"
    ) -> SparseLinear:
        n, k = weight.shape
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod.in_features, mod.out_features, mod.backend = k, n, backend
        mod.register_buffer("weight_values", weight.values)
        mod.register_buffer("weight_meta", weight.meta)
        mod.register_parameter(
            "bias", None if bias is None else nn.Parameter(bias.to(weight.values), requires_grad=False)
        )
        mod._w, mod._route = None, None
        return mod

    @property
    def weight_2_4(self) -> Sparse24Weight:
        """The compressed weight (rebuilt when the buffers were replaced by .to() or loading)."""
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
        return self.weight_2_4.nbytes

    def memory_bytes(self) -> dict[str, int]:
        """Device bytes this layer holds now: the portable form, the kernel layouts derived from it
        (cuSPARSELt's buffer, CUTLASS's sm90 form, the decode kernel's fragments) for the kernels
        the dispatcher chose, and a dense copy where it chose dense for some M (the price of never
        being slower)."""
        held = self.weight_2_4.layout_bytes()
        return {
            "portable": self.weight_nbytes,
            "cusparselt": held.get("cusparselt", 0),
            "cutlass": held.get("cutlass", 0),
            "decode": held.get("decode", 0),
            "dense_fallback": held.get("dense", 0),
        }

    @torch.compiler.disable
    def _prepare(self, x: torch.Tensor) -> tuple:
        w = self.weight_2_4
        _validate(x, w, self.bias)
        backend = resolve_backend(x, w, self.backend)
        self._route = (w.values, w.meta, x.dtype, x.device, _handle(w), BACKENDS[backend], w)
        return self._route

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Hot path: identity checks against the checked route, no Module.__getattr__ lookups.
        r, bufs = self._route, self._buffers
        if (
            r is None
            or r[0] is not bufs["weight_values"]
            or r[1] is not bufs["weight_meta"]
            or r[2] is not x.dtype
            or r[3] != x.device
            or x.shape[-1] != self.in_features
        ):
            r = self._prepare(x)
        bias = self._parameters["bias"]
        if x.numel() == 0:
            return x.new_zeros((*x.shape[:-1], self.out_features))
        if x.is_cuda and not torch.compiler.is_compiling():  # eager: skip the dispatcher hop
            return cuda_forward(x, r[6], bias, r[4], r[5])
        return torch.ops.sparseflow.sparse_linear(x, r[0], r[1], bias, r[4], r[5])

    def dispatch_info(self) -> list[dict]:
        """Measured per-M-bucket decisions for this layer's shape on its device (empty on CPU)."""
        if self.weight_values.device.type != "cuda":
            return []
        return DISPATCHER.table(
            self.weight_values.device, self.weight_values.dtype, self.out_features, self.in_features
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"2:4, backend={self.backend}"
        )
