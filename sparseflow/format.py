"""The portable 2:4 format: kept values plus packed 2-bit positions.

A weight W (N x K, ``F.linear`` layout: out_features x in_features) is 2:4 when every group of
four consecutive elements of a row holds at most two non-zeros. We store

* ``values``: N x K/2, same dtype as W: the two kept elements of each group, in column order;
* ``meta``: N x ceil(K/8) uint8: per group a nibble ``i0 | i1 << 2`` (0 <= i0 < i1 <= 3), two
  groups per byte, the even group in the low nibble.

This form is the same bytes on every device, so it is what checkpoints hold. GPU layouts
(cuSPARSELt's compressed buffer, our decode kernel's fragment order) are derived from it on the device and cached on the object.
Bytes: K/2 values + K/8 metadata per row = 0.5625x the dense fp16 bytes.
"""

from __future__ import annotations

import torch

__all__ = ["Sparse24Weight", "compress_2_4", "decompress_2_4", "is_2_4", "prune_2_4"]


def _check_weight(weight: torch.Tensor, what: str) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{what}: expected a 2-D weight (out_features x in_features), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"{what}: expected a floating-point weight, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"{what}: the weight is empty (shape {tuple(weight.shape)})")
    if weight.shape[1] % 4:
        raise ValueError(
            f"{what}: in_features K={weight.shape[1]} is not a multiple of 4, so it cannot be split into 2:4 groups"
        )


def prune_2_4(weight: torch.Tensor) -> torch.Tensor:
    """Magnitude 2:4: in every group of 4 along the input dim keep the 2 largest |w|.

    Runs wherever ``weight`` lives (a GPU prunes an 8B model's linears in seconds).
    """
    _check_weight(weight, "prune_2_4")
    n, k = weight.shape
    groups = weight.detach().reshape(n, k // 4, 4)
    keep = groups.abs().float().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(n, k).to(weight.dtype)


def _group_nnz(weight: torch.Tensor) -> torch.Tensor:
    n, k = weight.shape
    return (weight.reshape(n, k // 4, 4) != 0).sum(-1)


def is_2_4(weight: torch.Tensor) -> bool:
    """True when every group of 4 along the last dim has at most 2 non-zeros."""
    _check_weight(weight, "is_2_4")
    return bool((_group_nnz(weight) <= 2).all())


class Sparse24Weight:
    """A compressed 2:4 weight: ``values`` (N x K/2) and ``meta`` (N x ceil(K/8) uint8).

    ``shape`` is the dense (N, K). Device-specific layouts are cached in ``_cache`` and
    rebuilt lazily; ``to()`` returns a new object so caches never outlive their device.
    """

    __slots__ = ("__weakref__", "_cache", "meta", "shape", "values")

    def __init__(self, values: torch.Tensor, meta: torch.Tensor, shape: tuple[int, int]):
        n, k = int(shape[0]), int(shape[1])
        if k % 4 or n <= 0 or k <= 0:
            raise ValueError(f"Sparse24Weight: bad dense shape {(n, k)} (K must be a positive multiple of 4)")
        if tuple(values.shape) != (n, k // 2):
            raise ValueError(
                f"Sparse24Weight: values have shape {tuple(values.shape)}, expected {(n, k // 2)} for a {n}x{k} weight"
            )
        if tuple(meta.shape) != (n, (k + 7) // 8) or meta.dtype != torch.uint8:
            raise ValueError(
                f"Sparse24Weight: meta has shape {tuple(meta.shape)} dtype {meta.dtype}, expected {(n, (k + 7) // 8)} uint8"
            )
        if values.device != meta.device:
            raise ValueError(f"Sparse24Weight: values on {values.device} but meta on {meta.device}")
        self.values = values
        self.meta = meta
        self.shape = (n, k)
        self._cache: dict = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.meta.numel()

    def to(self, device=None, dtype: torch.dtype | None = None) -> Sparse24Weight:
        values = self.values.to(device=device, dtype=dtype)
        meta = self.meta.to(device=device)
        if values is self.values and meta is self.meta:
            return self
        return Sparse24Weight(values, meta, self.shape)

    def cuda(self, device=None) -> Sparse24Weight:
        return self.to(device if device is not None else "cuda")

    def cpu(self) -> Sparse24Weight:
        return self.to("cpu")

    def decompress(self) -> torch.Tensor:
        return decompress_2_4(self)

    # -- device layouts, derived from the portable form and cached ---------------------------
    def _fresh_cache(self) -> dict:
        if self._cache.get("version") != self.values._version:  # values edited in place
            self._cache = {"version": self.values._version, **{k: v for k, v in self._cache.items() if k == "handle"}}
        return self._cache

    def _derived(self, key: str, build):
        """The cached device layout ``key``, built by ``build()`` on first use."""
        cache = self._fresh_cache()
        layout = cache.get(key)
        if layout is None:
            layout = cache[key] = build()
        return layout

    def dense_on_device(self, keep: bool = True) -> torch.Tensor:
        """The dense weight on this device (for dense fallback); kept only if ``keep``."""
        cache = self._fresh_cache()
        dense = cache.get("dense")
        if dense is None:
            dense = decompress_2_4(self)
            if keep:
                cache["dense"] = dense
        return dense

    def cslt_packed(self, layout: int) -> torch.Tensor:
        """cuSPARSELt's compressed buffer for this weight and GEMM layout (CUDA, built once)."""
        from sparseflow._ext import _C

        return self._derived(cslt_cache_key(layout), lambda: _C.cslt_compress(self.dense_on_device(keep=False), layout))

    def decode_packed(self):
        """Our decode kernel's layout of this weight (``sparseflow.decode``; built once)."""
        from sparseflow.decode import pack_decode

        return self._derived("decode", lambda: pack_decode(self))

    def cutlass_packed(self):
        """CUTLASS's sm90 layout of this weight (``sparseflow.cutlass_gemm``; built once)."""
        from sparseflow.cutlass_gemm import pack_cutlass

        return self._derived("cutlass", lambda: pack_cutlass(self))

    def drop_cached(self, *names: str) -> None:
        """Free device layouts (e.g. one a measurement built but the dispatcher did not choose)."""
        for name in names:
            self._cache.pop(name, None)

    def validate(self) -> None:
        """Check the metadata (e.g. after loading a checkpoint): each group's two positions differ
        and are ordered; raises ``ValueError`` naming the first bad row/group."""
        n, k = self.shape
        idx = self.indices().reshape(n, k // 4, 2)
        bad = idx[..., 0] >= idx[..., 1]
        if bool(bad.any()):
            row, grp = (int(v) for v in bad.nonzero()[0])
            raise ValueError(
                f"Sparse24Weight: corrupt 2:4 metadata at row {row}, group {grp}: positions "
                f"{idx[row, grp].tolist()} (need two distinct, increasing positions in 0..3)"
            )

    def indices(self) -> torch.Tensor:
        """Column of each kept value within its group (N x K/2, int64, values 0..3)."""
        return _unpack_indices(self.meta, self.shape[1])

    def __repr__(self) -> str:
        return f"Sparse24Weight(shape={self.shape}, dtype={self.dtype}, device={self.device})"


def cslt_cache_key(layout: int) -> str:
    """Which compressed buffer a layout reads. Layouts 1, 3 and 4 describe W the same way (the
    sparse operand, row-major N x K) and share one (1 and 4 checked on an H200); layout 2 (W the
    sparse B) and the opt-in layout 0 keep their own."""
    return {0: "cslt_layout0", 2: "cslt_sparse_b"}.get(layout, "cslt")


def _pack_indices(idx: torch.Tensor) -> torch.Tensor:
    """idx: N x G x 2 (int, 0..3) -> N x ceil(G/2) uint8."""
    n, g, _ = idx.shape
    nib = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8)
    if g % 2:
        nib = torch.cat([nib, nib.new_zeros(n, 1)], dim=1)
    return nib[:, 0::2] | (nib[:, 1::2] << 4)


def _unpack_indices(meta: torch.Tensor, k: int) -> torch.Tensor:
    g = k // 4
    m = meta.to(torch.int64)
    nib = torch.stack([m & 0xF, m >> 4], dim=-1).reshape(meta.shape[0], -1)[:, :g]
    return torch.stack([nib & 3, (nib >> 2) & 3], dim=-1).reshape(meta.shape[0], g * 2)


def compress_2_4(weight: torch.Tensor) -> Sparse24Weight:
    """Compress a 2:4 weight into the portable form. Raises ``ValueError`` if it is not 2:4."""
    _check_weight(weight, "compress_2_4")
    weight = weight.detach()
    n, k = weight.shape
    groups = weight.reshape(n, k // 4, 4)
    nz = groups != 0
    bad = nz.sum(-1) > 2
    if bool(bad.any()):
        row, grp = (int(v) for v in bad.nonzero()[0])
        vals = [float(v) for v in groups[row, grp]]
        raise ValueError(
            f"compress_2_4: weight is not 2:4 sparse: row {row}, group {grp} (columns {4 * grp}..{4 * grp + 3}) "
            f"has {int(nz[row, grp].sum())} non-zeros {vals}; prune it first (sparseflow.prune_2_4)"
        )
    # Non-zeros first in column order, then zeros, take two, keep them sorted.
    order = torch.argsort((~nz).to(torch.int8), dim=-1, stable=True)[..., :2]
    idx = order.sort(dim=-1).values
    values = groups.gather(-1, idx).reshape(n, k // 2).contiguous()
    return Sparse24Weight(values, _pack_indices(idx).contiguous(), (n, k))


def decompress_2_4(compressed: Sparse24Weight) -> torch.Tensor:
    """Exact inverse of :func:`compress_2_4`."""
    if not isinstance(compressed, Sparse24Weight):
        raise TypeError(f"decompress_2_4: expected a Sparse24Weight, got {type(compressed).__name__}")
    n, k = compressed.shape
    if compressed.device.type == "cuda":
        from sparseflow._ext import _C

        if _C is not None and compressed.dtype in (torch.float16, torch.bfloat16, torch.float32):
            return _C.decompress_24(compressed.values.contiguous(), compressed.meta.contiguous(), k)
    idx = compressed.indices().reshape(n, k // 4, 2)
    out = compressed.values.new_zeros(n, k // 4, 4)
    out.scatter_(-1, idx, compressed.values.reshape(n, k // 4, 2))
    return out.reshape(n, k)
