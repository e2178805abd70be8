"""The portable 2:4 format: kept values plus packed 2-bit positions.

A weight W (N x K, ``F.linear`` layout: out_features x in_features) is 2:4 when every group of
four consecutive elements of a row holds at most two non-zeros. We store

* ``values``: N x K/2, same dtype as W: the two kept elements of each group, in column order;
* ``meta``: N x ceil(K/8) uint8: per group a nibble ``i0 | i1 << 2`` (0 <= i0 < i1 <= 3), two
  groups per byte, the even group in the low nibble.

This form is the same bytes on every device, so it is what checkpoints hold. Each GPU kernel's
layout (``sparseflow.kernels``: cuSPARSELt's compressed buffer, our decode kernel's fragment
order, ...) is derived from it on the device and cached on the object (``Sparse24Weight.layout``).
Bytes: K/2 values + K/8 metadata per row = 0.5625x the dense fp16 bytes.

``keep_only(kernel)`` makes one kernel's layout the weight's only device copy: the portable form
is then freed and read back from that layout when asked for (``portable``,
``sparseflow.kernels.readback``), so a GPU holds one 2:4 copy of each weight, not two.
"""

from __future__ import annotations

from collections.abc import Hashable

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

    ``shape`` is the dense (N, K). Kernel layouts are built lazily and cached (``layout``);
    ``to()`` returns a new object so caches never outlive their device.
    """

    __slots__ = ("__weakref__", "_handle", "_layouts", "_layouts_version", "_resident", "meta", "shape", "values")

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
        self._layouts: dict[tuple[str, Hashable], object] = {}
        self._layouts_version = values._version
        self._handle: int | None = None  # sparseflow.ops's integer name for it (torch.library ops take no objects)
        self._resident: str | None = None  # keep_only's kernel: its layout is the only copy on the device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        """Bytes of the portable form (what checkpoints hold), whether or not it is held now."""
        n, k = self.shape
        return n * (k // 2) * self.values.element_size() + n * ((k + 7) // 8)

    @property
    def resident(self) -> str | None:
        """The kernel whose layout is this weight's only device copy (``keep_only``), or None
        while the portable form is held."""
        return self._resident

    def keep_only(self, kernel: str) -> None:
        """Make ``kernel``'s layout (a name in ``sparseflow.kernels.KERNELS``) the one copy of this
        weight on its device: build it, free every other cached layout and the portable form.
        ``values``/``meta`` become empty (N x 0) placeholders; ``portable`` reads the form back."""
        if self._resident == kernel:
            return
        from sparseflow.kernels import KERNELS

        built = self.layout(kernel)
        n = self.shape[0]
        if self._handle is not None:  # routes resolved before point at layouts about to be freed
            from sparseflow.ops import forget_routes

            forget_routes(self._handle)
        self._layouts = {(kernel, KERNELS[kernel].cache_key(None)): built}
        self.values, self.meta = self.values.new_empty((n, 0)), self.meta.new_empty((n, 0))
        self._layouts_version = self.values._version
        self._resident = kernel

    def portable(self, device=None, rows: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, meta) on ``device`` (default: the weight's): the held tensors, or, after
        ``keep_only``, new ones read back from the resident layout (one identity GEMM per
        1024 columns; see ``sparseflow.kernels.readback``). ``rows`` (a, b): rows a..b-1 only."""
        if rows is not None and not (len(rows) == 2 and 0 <= rows[0] <= rows[1] <= self.shape[0]):
            raise ValueError(
                f"Sparse24Weight.portable: rows must be (a, b) with 0 <= a <= b <= {self.shape[0]}, got {rows!r}"
            )
        if self._resident is None:
            values, meta = (
                (self.values, self.meta) if rows is None else (self.values[slice(*rows)], self.meta[slice(*rows)])
            )
            return values.to(device or self.device), meta.to(device or self.device)
        from sparseflow.kernels import KERNELS
        from sparseflow.kernels.readback import portable_from_layout

        kernel = KERNELS[self._resident]
        layout = self._layouts[(self._resident, kernel.cache_key(None))]
        with torch.no_grad():
            return portable_from_layout(kernel, layout, self.shape, self.dtype, self.device, device, rows)

    def materialized(self) -> Sparse24Weight:
        """This weight with its portable form held (``self`` unless ``keep_only`` freed it; then
        a new object, on the same device, read back from the resident layout)."""
        if self._resident is None:
            return self
        return Sparse24Weight(*self.portable(), self.shape)

    def to(self, device=None, dtype: torch.dtype | None = None) -> Sparse24Weight:
        if self._resident is not None:
            dev = self.device if device is None else torch.device(device)
            same_device = dev.type == self.device.type and dev.index in (None, self.device.index)
            if same_device and (dtype is None or dtype == self.dtype):
                return self
            return self.materialized().to(device, dtype)
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

    # -- kernel layouts, derived from the portable form and cached ---------------------------
    def layout(self, kernel: str, key: Hashable = None, keep: bool = True):
        """The layout ``kernel`` (a name in ``sparseflow.kernels.KERNELS``) reads this weight in,
        built by its ``pack`` on first use and cached (when ``keep``; a measurement builds
        temporaries with ``keep=False``). ``key`` picks a variant (cuSPARSELt's GEMM layout).
        Editing ``values`` in place drops every cached layout."""
        from sparseflow.kernels import KERNELS

        k = KERNELS.get(kernel)
        if k is None:
            raise KeyError(f"Sparse24Weight.layout: unknown kernel {kernel!r}; one of {sorted(KERNELS)}")
        slot = (kernel, k.cache_key(key))
        layouts = self._fresh_layouts()
        built = layouts.get(slot)
        if built is None:
            built = k.pack(self.materialized(), key)
            if keep:
                layouts[slot] = built
        return built

    def cached_layouts(self) -> set[tuple[str, Hashable]]:
        """The (kernel, cache key) pairs of the layouts built and kept so far."""
        return set(self._fresh_layouts())

    def drop_layouts(self, *which) -> None:
        """Free cached layouts: each of ``which`` is a kernel name (all its layouts) or a
        (kernel, cache key) pair from ``cached_layouts``. Rebuilt if ever asked for again."""
        for slot in [s for s in self._layouts if s in which or s[0] in which]:
            del self._layouts[slot]

    def layout_bytes(self) -> dict[str, int]:
        """Device bytes of the cached layouts, per kernel (the portable form is ``nbytes``)."""
        from sparseflow.kernels import KERNELS

        out: dict[str, int] = {}
        for (kernel, _), built in self._fresh_layouts().items():
            out[kernel] = out.get(kernel, 0) + KERNELS[kernel].nbytes(built)
        return out

    def _fresh_layouts(self) -> dict:
        if self._layouts_version != self.values._version:  # values edited in place
            self._layouts, self._layouts_version = {}, self.values._version
        return self._layouts

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
        meta = self.meta if self._resident is None else self.portable()[1]
        return _unpack_indices(meta, self.shape[1])

    def __repr__(self) -> str:
        only = f", only {self._resident}'s layout" if self._resident else ""
        return f"Sparse24Weight(shape={self.shape}, dtype={self.dtype}, device={self.device}{only})"


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
    compressed = compressed.materialized()
    n, k = compressed.shape
    if compressed.device.type == "cuda":
        from sparseflow._ext import _C

        if _C is not None and compressed.dtype in (torch.float16, torch.bfloat16, torch.float32):
            return _C.decompress_24(compressed.values.contiguous(), compressed.meta.contiguous(), k)
    idx = compressed.indices().reshape(n, k // 4, 2)
    out = compressed.values.new_zeros(n, k // 4, 4)
    out.scatter_(-1, idx, compressed.values.reshape(n, k // 4, 2))
    return out.reshape(n, k)
