"""Which weights to zero: the lowest scores per module, per row or per N:M group, and SparseGPT's OBS pass with
error compensation (Frantar & Alistarh 2023; details in the package docstring)."""
from __future__ import annotations

import logging

import torch

from ..errors import LopperError
from .settings import Spec

log = logging.getLogger("lopper")

BLOCK = 128
DAMP = 0.01


# ---- mask selection ---------------------------------------------------------------------------------------------
def lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (shape of `score`) of exactly the k lowest entries; ties broken by position."""
    flat = score.reshape(-1)
    out = torch.zeros_like(flat, dtype=torch.bool)
    k = max(0, min(int(k), flat.numel()))
    if k == 0:
        return out.view_as(score)
    t = flat.kthvalue(k).values
    out = flat < t
    need = k - int(out.sum())
    if need > 0:
        out[(flat == t).nonzero().flatten()[:need]] = True
    return out.view_as(score)


def lowest_per_row(score: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.zeros_like(score, dtype=torch.bool)
    k = max(0, min(int(k), score.shape[1]))
    if k:
        out.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True)
    return out


def lowest_nm(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune mask with M - N pruned in every group of M consecutive columns; a final group of r < M columns
    keeps at most N."""
    rows, cols = score.shape
    out = torch.zeros_like(score, dtype=torch.bool)
    full = cols // m * m
    if full:
        g = score[:, :full].reshape(rows, -1, m)
        idx = torch.topk(g, m - n, dim=2, largest=False).indices
        out[:, :full] = torch.zeros_like(g, dtype=torch.bool).scatter_(2, idx, True).reshape(rows, full)
    if cols - full > n:
        out[:, full:] = lowest_per_row(score[:, full:], cols - full - n)
    return out


def prune_mask(score: torch.Tensor, frac: float, spec: Spec) -> torch.Tensor:
    """Which weights of one module to zero, by score (row / layer scope or N:M)."""
    nm = spec.nm
    if nm:
        return lowest_nm(score, *nm)
    if spec.scope == "row":
        return lowest_per_row(score, round(frac * score.shape[1]))
    return lowest(score, round(frac * score.numel()))


def score(w: torch.Tensor, criterion: str, sq: torch.Tensor | None) -> torch.Tensor:
    s = w.detach().float().abs()
    if criterion == "wanda" and sq is not None:
        s = s * sq.to(s.device).sqrt()[None, :]
    return s


# ---- SparseGPT --------------------------------------------------------------------------------------------------
@torch.no_grad()
def sparsegpt(w: torch.Tensor, hessian: torch.Tensor, frac: float, spec: Spec, keep: torch.Tensor | None = None,
              block: int = BLOCK, damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune w [out, in] (float32) with the Hessian H = 2 X^T X / N [in, in]; returns (new weights, keep mask).
    With `keep` given, that mask is used instead of choosing one (replays) and only the updates are computed."""
    w = w.detach().float().clone()
    rows, cols = w.shape
    h = hessian.float().clone()
    diag = h.diagonal()
    diag[diag == 0] = 1.0  # inputs that were always zero: no information, no coupling
    u = _inverse_cholesky(h, damp)
    nm = spec.nm
    chosen = keep is None
    keep = torch.ones_like(w, dtype=torch.bool) if chosen else keep.to(w.device).clone()
    if nm:
        block = max(nm[1], block // nm[1] * nm[1])
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        u1 = u[i1:i2, i1:i2]
        d1 = u1.diagonal()
        w1 = w[:, i1:i2].T.contiguous()  # [columns of the block, rows]: one column of w per contiguous row
        if chosen and not nm:
            score = (w1.pow(2) / d1[:, None].pow(2)).T
            if spec.scope == "row":
                gone = lowest_per_row(score, round(frac * i2) - round(frac * i1))
            else:
                gone = lowest(score, round(frac * rows * i2) - round(frac * rows * i1))
            keep[:, i1:i2] = ~gone
        scale = (~keep[:, i1:i2]).T.float() / d1[:, None]  # err_c = w_c * pruned_c / U_cc
        err1 = torch.empty_like(w1)
        for i in range(i2 - i1):
            if chosen and nm and i % nm[1] == 0:
                c, g = i1 + i, min(nm[1], i2 - i1 - i)
                if g > nm[0]:
                    score = (w1[i:i + g].pow(2) / d1[i:i + g, None].pow(2)).T
                    keep[:, c:c + g] = ~lowest_per_row(score, g - nm[0])
                    scale[i:i + g] = (~keep[:, c:c + g]).T.float() / d1[i:i + g, None]
            torch.mul(w1[i], scale[i], out=err1[i])
            # spread the error over the block's later columns (a rank-1 matmul: BLAS, not an elementwise op)
            w1[i:].addmm_(u1[i, i:, None], err1[i, None], alpha=-1)
        w[:, i1:i2] = (w1 * keep[:, i1:i2].T).T  # pruned entries exactly zero (w - w/d*d may not be)
        w[:, i2:] -= err1.T @ u[i1:i2, i2:]  # lazy batch update of the later blocks
    return w, keep


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) I)^-1, raising the damping until H is positive definite."""
    mean = h.diagonal().mean()
    eye = torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
    for _ in range(6):
        lower, info = torch.linalg.cholesky_ex(h + damp * mean * eye)
        if info == 0:
            inv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if info == 0:
                return upper
        damp *= 10
    raise LopperError("the calibration Hessian of a layer is singular even after damping: use more "
                      "--calib-samples or --sparsity-criterion wanda")
