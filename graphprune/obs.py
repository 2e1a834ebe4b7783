"""Structured Optimal Brain Surgeon, pure numpy (float64).

A consumer computes y = W·x (+ b). With H = E[x xᵀ] over its inputs (the last row/column being the
constant 1, so the bias is just one more column), removing the input columns M and correcting the
others optimally gives

    ΔW = −W[:, M] · (H⁻¹[M, M])⁻¹ · H⁻¹[M, :]        then drop the columns M,

and H⁻¹ ← H⁻¹ − H⁻¹[:, M] (H⁻¹[M, M])⁻¹ H⁻¹[M, :] lets columns be removed block after block. The
result equals the least-squares refit of the kept columns, W·H[:, K]·H[K, K]⁻¹, which is what the
tests pin. The bias column absorbs what removed channels carried on average.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

F64 = NDArray[np.float64]


def damped(h: F64, damping: float) -> F64:
    """H + λ·I with λ = damping × mean diagonal; dead inputs (zero diagonal) get λ = 1 alone."""
    h = np.array(h, dtype=np.float64, copy=True)
    diag = np.diagonal(h).copy()
    lam = damping * float(diag.mean()) if diag.size and diag.mean() > 0 else 1.0
    idx = np.arange(h.shape[0])
    h[idx, idx] = diag + lam
    dead = diag <= 0
    h[idx[dead], idx[dead]] = max(lam, 1e-12)
    return h


def inverse(h: F64) -> F64:
    """Symmetric positive-definite inverse by Cholesky, falling back to an eigen pseudo-inverse."""
    try:
        chol = np.linalg.cholesky(h)
        inv_chol = np.linalg.solve(chol, np.eye(h.shape[0]))
        return inv_chol.T @ inv_chol
    except np.linalg.LinAlgError:
        vals, vecs = np.linalg.eigh((h + h.T) / 2)
        keep = vals > vals.max() * 1e-12
        return (vecs[:, keep] / vals[keep]) @ vecs[:, keep].T


@dataclass
class ObsResult:
    weights: F64  # [out, kept columns] after compensation
    error: float  # E||ΔY||² predicted by OBS (sum over removal steps)


def obs_remove(w: F64, h: F64, remove: NDArray[np.int64], damping: float = 0.01,
               block: int | None = None) -> ObsResult:
    """Remove columns `remove` of W (in blocks of `block` columns, all at once by default).

    Returns the compensated kept columns in their original order and the predicted output error.
    """
    w = np.array(w, dtype=np.float64, copy=True)
    remove = np.asarray(remove, dtype=np.int64)
    if block is None or block >= remove.size:
        return _joint(w, damped(h, damping), remove)
    hinv = inverse(damped(h, damping))
    step = block
    error = 0.0
    for start in range(0, remove.size, step):
        m = remove[start : start + step]
        sub = hinv[np.ix_(m, m)]
        sub_inv = inverse(sub)
        coeff = w[:, m] @ sub_inv  # [out, |m|]
        error += float(((coeff @ sub) * coeff).sum())
        w -= coeff @ hinv[m, :]
        hinv -= hinv[:, m] @ sub_inv @ hinv[m, :]
        w[:, m] = 0.0
    kept = np.setdiff1d(np.arange(w.shape[1]), remove)
    return ObsResult(w[:, kept], error)


def _joint(w: F64, hd: F64, remove: NDArray[np.int64]) -> ObsResult:
    """All columns at once: the same result as block removal, by one solve with H[K, K] instead of a
    full inverse and its downdates (what makes ResNet-50-size layers affordable)."""
    kept = np.setdiff1d(np.arange(w.shape[1]), remove)
    if remove.size == 0:
        return ObsResult(w, 0.0)
    h_kk = hd[np.ix_(kept, kept)]
    try:
        v = np.asarray(np.linalg.solve(h_kk, hd[kept, :] @ w.T).T, dtype=np.float64)  # H_KK symmetric
    except np.linalg.LinAlgError:
        v = np.asarray(w @ hd[:, kept] @ inverse(h_kk), dtype=np.float64)
    # residual orthogonality: E||W x − V x_K||² = tr(W H Wᵀ) − tr(V H_KK Vᵀ)
    error = float(((w @ hd) * w).sum() - ((v @ h_kk) * v).sum())
    return ObsResult(v, max(error, 0.0))


def least_squares_refit(w: F64, h: F64, kept: NDArray[np.int64], damping: float = 0.01) -> F64:
    """argmin_V E||W x − V x_K||² = W·H[:, K]·H[K, K]⁻¹ (with the same damping as OBS)."""
    hd = damped(h, damping)
    return np.asarray(w @ hd[:, kept] @ inverse(hd[np.ix_(kept, kept)]), dtype=np.float64)


def energy(a: F64, h: F64) -> float:
    """E‖A·x‖² = tr(A H Aᵀ) for H = E[x xᵀ]: a layer's output energy, or its error energy for A = ΔW."""
    return float(((a @ h) * a).sum())


def removal_errors(w: F64, h: F64, blocks: list[NDArray[np.int64]], damping: float = 0.01) -> F64:
    """The OBS error of removing each column block M alone, the rest compensated:
    tr(W[:, M] (H⁻¹[M, M])⁻¹ W[:, M]ᵀ) on the damped H, i.e. `obs_remove(w, h, M, damping).error`,
    for every block at the cost of one inverse (blocks of equal size are solved as one batch)."""
    hinv = inverse(damped(h, damping))
    out = np.zeros(len(blocks))
    by_size: dict[int, list[int]] = {}
    for i, m in enumerate(blocks):
        by_size.setdefault(int(m.size), []).append(i)
    for size, idx in by_size.items():
        if size == 0:
            continue
        ms = np.stack([np.asarray(blocks[i], dtype=np.int64) for i in idx])  # [k, size]
        sub = hinv[ms[:, :, None], ms[:, None, :]]  # [k, size, size]
        wm = np.moveaxis(w[:, ms], 0, -1)  # [k, size, out]
        out[idx] = (wm * np.linalg.solve(sub, wm)).sum(axis=(1, 2))
    return np.maximum(out, 0.0)
