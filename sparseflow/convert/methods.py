"""How one layer's 2:4 weight is chosen: magnitude, Wanda or SparseGPT.

Every rule takes the weight in ``F.linear`` layout (out_features x in_features), works in float32
on the weight's device and returns a new float32 weight that is 2:4 along the input dim. The data
rules also take :class:`InputStats`, accumulated from the layer's inputs by forward hooks.

* magnitude: keep the 2 largest |w| of every 4 (no data).
* Wanda (Sun et al. 2023): keep the 2 largest |w_ij| * ||X_j||_2 of every 4 in a row; the
  kept weights are not changed.
* SparseGPT (Frantar & Alistarh 2023): one-shot OBS. Walks the columns left to right; at the
  start of each group of 4 it chooses the mask from w^2 / [H^-1]_jj^2 (the OBS saliency), zeroes
  the pruned weights and spreads their error over the not-yet-visited columns through the
  Cholesky factor of H^-1; updates outside the current column block are applied lazily, once
  per block, as one matmul.
"""

from __future__ import annotations

import torch

__all__ = ["METHODS", "InputStats", "magnitude", "mask_2_4", "sparsegpt", "sparsegpt_factor", "wanda"]

METHODS = ("magnitude", "wanda", "sparsegpt")


def mask_2_4(score: torch.Tensor) -> torch.Tensor:
    """Boolean mask keeping the 2 highest scores of every group of 4 along the last dim."""
    n, k = score.shape
    groups = score.reshape(n, k // 4, 4)
    keep = groups.topk(2, dim=-1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True).reshape(n, k)


class InputStats:
    """Statistics of a layer's inputs X (tokens x in_features), summed over calibration batches.

    ``sumsq[j]`` = sum_t x_tj^2 (Wanda's ||X_j||^2); ``xtx`` = X^T X (SparseGPT's Hessian up to
    scale), kept only when ``hessian`` is set because it costs in_features^2 floats.
    """

    def __init__(self, in_features: int, device: torch.device, hessian: bool) -> None:
        self.in_features = in_features
        self.tokens = 0
        self.sumsq = torch.zeros(in_features, device=device, dtype=torch.float32)
        self.xtx = torch.zeros(in_features, in_features, device=device, dtype=torch.float32) if hessian else None
        self.last: torch.Tensor | None = None  # the last tensor added (layers sharing an input add it once)

    def add(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, self.in_features).to(device=self.sumsq.device, dtype=torch.float32)
        self.tokens += x2.shape[0]
        self.sumsq += x2.square().sum(0)
        if self.xtx is not None:
            self.xtx.addmm_(x2.T, x2)

    def hessian(self) -> torch.Tensor:
        """H = 2/n X^T X, the Hessian of the layer-wise squared error."""
        if self.xtx is None:
            raise RuntimeError("InputStats was built without hessian=True")
        return self.xtx * (2.0 / max(self.tokens, 1))


def magnitude(weight: torch.Tensor) -> torch.Tensor:
    w = weight.detach().float()
    return w * mask_2_4(w.abs())


def wanda(weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
    w = weight.detach().float()
    score = w.abs() * stats.sumsq.to(w.device).sqrt().unsqueeze(0)
    return w * mask_2_4(score)


def _inverse_cholesky(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp*I)^-1 (U^T U = H^-1); raises damping until it factors."""
    eye = torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
    damp = percdamp * float(h.diagonal().mean())
    for _ in range(6):
        lower, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0:
                return upper
        damp = max(damp * 10.0, 1e-8)
    raise RuntimeError("sparsegpt: the layer's Hessian is not positive definite even with heavy dampening")


def sparsegpt_factor(hessian: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U^T U = (H + damp*I)^-1 after giving never-active inputs (``dead``) a unit
    diagonal. Depends only on H, so layers that share an input (q/k/v) share it."""
    h = hessian.to(torch.float32).clone()
    dead = (h.diagonal() == 0).nonzero().squeeze(1)  # inputs that were always 0: their weights are free
    h[dead, dead] = 1.0
    return _inverse_cholesky(h, percdamp), dead


def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    factor: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """2:4 SparseGPT on one layer. ``hessian`` is in_features x in_features (see InputStats);
    ``factor`` (from :func:`sparsegpt_factor`) may be given instead to reuse it."""
    if blocksize % 4:
        raise ValueError(f"sparsegpt: blocksize={blocksize} must be a multiple of 4 so no 2:4 group spans two blocks")
    w = weight.detach().float().clone()
    hinv, dead = factor if factor is not None else sparsegpt_factor(hessian.to(w.device), percdamp)
    hinv = hinv.to(w.device)
    w[:, dead.to(w.device)] = 0.0
    k = w.shape[1]
    for b0 in range(0, k, blocksize):
        b1 = min(b0 + blocksize, k)
        w1 = w[:, b0:b1].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[b0:b1, b0:b1]
        diag = hinv1.diagonal()
        pruned = None
        for i in range(b1 - b0):
            if i % 4 == 0:  # choose this group's mask from the weights as updated so far
                score = w1[:, i : i + 4].square() / diag[i : i + 4].square().unsqueeze(0)
                pruned = ~mask_2_4(score)
            col = w1[:, i]
            q = col.masked_fill(pruned[:, i % 4], 0.0)
            err = (col - q) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = err
        w[:, b0:b1] = w1
        if b1 < k:  # lazy batched update of every column right of the block
            w[:, b1:] -= err1 @ hinv[b0:b1, b1:]
    return w
