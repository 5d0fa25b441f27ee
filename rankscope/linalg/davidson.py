"""Top singular vectors of W0 + L Rᵀ from W0's SVD, by block Davidson on the Gram matrix.

Pure functions of tensors, in float64: the intruder test of a LoRA update (Shuttleworth et al.
2024, Def. 3.1) needs the top-k left singular vectors of W0 + ΔW and their cosines with W0's,
which this gives without an SVD of the fine-tuned weight. Definitions: docs/science.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rankscope.errors import InputError


def top_left_singular(
    U0: Tensor, S0: Tensor, Vh0: Tensor, L: Tensor, R: Tensor, *, k: int = 10,
    tol: float = 1e-12, max_iter: int = 40,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k left singular vectors and values of W = W0 + L Rᵀ from W0's SVD, without W's SVD.

    With W0 = U0 diag(S0) Vh0 and U0 square (d_out ≤ d_in), the Gram matrix of W in U0's basis
    is a diagonal plus a term of rank ≤ 2m:

        H = U0ᵀ W Wᵀ U0 = Λ + c bᵀ + b cᵀ + b (RᵀR) bᵀ,  Λ = diag(S0²), b = U0ᵀ L, c = diag(S0) Vh0 R,

    so H·X costs O(d_out·m·p) for p columns. Its top-k eigenpairs (θ_j, x_j) give σ_j = √θ_j
    and u_j = U0 x_j; the coordinates x_j are the cosines of u_j with W0's left vectors. They
    are found by block Davidson (Rayleigh–Ritz, corrections (θ − diag H)⁻¹ r with Olsen's
    projection) from W0's top k + 4 directions and L's top 2, in float64, until every residual
    ‖H x_j − θ_j x_j‖ ≤ tol·θ_1; if that fails within ``max_iter`` rounds, H is formed and
    solved densely. The eigenvectors of H are those of the SVD of W; the Gram form is solved in
    float64, so for σ_j ≥ σ_k it is as accurate as a float32 SVD of W or better.

    Args:
        U0: (d_out, d_out) W0's left singular vectors, float64.
        S0: (d_out,) its singular values, descending.
        Vh0: (d_out, d_in) its right singular vectors.
        L: (d_out, m), R: (d_in, m): the update ΔW = L Rᵀ (e.g. U·diag(S) and Vhᵀ of its SVD).
        k: 1 ≤ k ≤ d_out vectors to return.
        tol: relative residual at which an eigenpair counts as converged.
        max_iter: Davidson rounds before the dense fallback.

    Returns:
        U (d_out, k), S (k,) descending, and X = U0ᵀU (d_out, k): U's coordinates in W0's
        left singular basis, i.e. cos(u_j, u0_i) = X[i, j] (intruders: ``X.abs().max(0)``);
        all float64.

    Raises:
        InputError: shapes that do not fit (U0 not square, d_out > d_in) or k out of range.
    """
    d = U0.shape[0]
    if U0.shape != (d, d) or S0.shape != (d,) or Vh0.shape[0] != d or Vh0.shape[1] < d \
            or L.shape[0] != d or R.shape != (Vh0.shape[1], L.shape[1]):
        raise InputError(f"U0 {tuple(U0.shape)}, S0 {tuple(S0.shape)}, Vh0 {tuple(Vh0.shape)}, "
                         f"L {tuple(L.shape)}, R {tuple(R.shape)} are not W0's SVD (d_out ≤ d_in) "
                         "and an update L Rᵀ")
    if not 1 <= k <= d:
        raise InputError(f"k={k} is outside [1, {d}]")
    f64 = torch.float64
    lam = S0.to(f64).square()  # (d,) descending
    b = U0.to(f64).T @ L.to(f64)  # (d, m)
    c = S0.to(f64)[:, None] * (Vh0.to(f64) @ R.to(f64))  # (d, m)
    cf = c + b @ (R.to(f64).T @ R.to(f64))  # (d, m): H = Λ + c bᵀ + b cfᵀ

    def hx(x: Tensor) -> Tensor:  # (d, p) → (d, p)
        return lam[:, None] * x + c @ (b.T @ x) + b @ (cf.T @ x)

    diag = lam + (c * b).sum(1) + (b * cf).sum(1)  # (d,) the diagonal of H
    theta, x = _davidson(hx, diag, _start_block(d, k, b), k=k, tol=tol, max_iter=max_iter)
    if x is None:  # not converged: the dense eigenproblem of the d × d matrix H
        h = torch.diag(lam) + c @ b.T + b @ cf.T
        theta, x = torch.linalg.eigh((h + h.T) / 2)
        theta, x = theta.flip(0)[:k], x.flip(1)[:, :k]
    return U0.to(f64) @ x, theta.clamp(min=0).sqrt(), x


def _start_block(d: int, k: int, b: Tensor) -> Tensor:
    """Orthonormal (d, p): the first k + 4 coordinate vectors (W0's top) and b's first 2 columns."""
    q = min(d, k + 4)
    start = torch.cat([torch.eye(d, q, dtype=b.dtype), b[:, :min(2, b.shape[1])]], dim=1)
    return _orth(start, None)


def _orth(w: Tensor, v: Tensor | None) -> Tensor:
    """Orthonormal columns spanning w's part outside span(v), dropping dependent ones.

    Columns are normalised first and projected out twice before and once after the QR, so the
    new block stays orthogonal to v to rounding even when it was nearly inside span(v).
    """
    w = w / torch.linalg.vector_norm(w, dim=0).clamp(min=1e-300)
    for _ in range(2 if v is not None else 0):
        w = w - v @ (v.T @ w)
    q, r = torch.linalg.qr(w)
    q = q[:, torch.diagonal(r).abs() > 1e-10]
    if v is not None and q.shape[1]:
        q, _ = torch.linalg.qr(q - v @ (v.T @ q))
    return q


def _davidson(hx, diag: Tensor, v: Tensor, *, k: int, tol: float, max_iter: int):
    """Top-k eigenpairs of a symmetric operator by block Davidson; (None, None) if unconverged."""
    d = diag.shape[0]
    hv = hx(v)  # (d, p)
    for _ in range(max_iter):
        t = v.T @ hv
        theta, s = torch.linalg.eigh((t + t.T) / 2)
        theta, s = theta.flip(0)[:k], s.flip(1)[:, :k]  # (k,), (p, k) descending
        if not bool(torch.isfinite(theta).all()):
            return None, None
        x = v @ s  # (d, k) Ritz vectors
        res = hv @ s - x * theta  # (d, k)
        bad = torch.linalg.vector_norm(res, dim=0) > tol * theta[0].abs().clamp(min=1e-300)
        if theta.shape[0] == k and not bad.any():
            return theta, x
        if v.shape[1] >= d:  # the whole space: Rayleigh–Ritz is exact, up to rounding
            return (theta, x) if theta.shape[0] == k else (None, None)
        den = theta[bad][None, :] - diag[:, None]  # (d, nb)
        floor = 1e-10 * theta[0].abs().clamp(min=1e-300)
        den = torch.where(den.abs() < floor, torch.where(den < 0, -floor, floor), den)
        m_r, m_x = res[:, bad] / den, x[:, bad] / den
        eps = (x[:, bad] * m_r).sum(0) / (x[:, bad] * m_x).sum(0)
        w = m_r - eps * m_x  # Olsen: xᵀw = 0, so w is not lost against x in span(v)
        w = torch.where(torch.isfinite(w).all(0), w, m_r)  # xᵀM⁻¹x = 0: plain Davidson
        if v.shape[1] + w.shape[1] > max(d // 2, 3 * k):
            v, hv = x, hv @ s  # restart from the Ritz vectors
        q = _orth(w, v)
        if q.shape[1] == 0:
            return None, None
        v, hv = torch.cat([v, q], dim=1), torch.cat([hv, hx(q)], dim=1)
    return None, None
