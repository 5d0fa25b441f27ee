"""Singular values of weight updates ΔW and the effective-rank measures built on them.

Pure functions of tensors: no files, prints or models. SVDs run in float32 or float64 only;
lower-precision inputs are upcast first.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from rankscope.errors import InputError

_SVD_DTYPES = (torch.float32, torch.float64)


def check_finite(t: Tensor, *, what: str) -> None:
    """Raise ``InputError("{what} contains NaN or Inf")`` unless every entry of t is finite.

    One pass of ``aminmax`` (NaN and ±Inf propagate into the min or max) instead of a boolean
    tensor from ``isfinite``: about 17× cheaper on a 1536×576 matrix.
    """
    if t.numel() == 0:
        return
    lo, hi = torch.aminmax(t.detach())
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
        raise InputError(f"{what} contains NaN or Inf")


def _check_shape(shape) -> None:
    if len(shape) != 2 or min(shape) < 1:
        raise InputError(f"shape must be two positive ints, got {shape}")


def _check_svd_dtype(dtype: torch.dtype) -> None:
    if dtype not in _SVD_DTYPES:
        raise InputError(f"SVD dtype must be float32 or float64, got {dtype}")


def _check_factors(B: Tensor, A: Tensor, scale: float) -> None:
    if B.ndim != 2 or A.ndim != 2:
        raise InputError(f"B and A must be 2-D, got shapes {tuple(B.shape)} and {tuple(A.shape)}")
    if B.shape[1] != A.shape[0] or B.shape[1] == 0:
        raise InputError(f"B {tuple(B.shape)} and A {tuple(A.shape)} need a shared rank r >= 1")
    if not math.isfinite(scale):
        raise InputError(f"scale must be finite, got {scale}")
    check_finite(B, what="B")
    check_finite(A, what="A")


def _factor_cores(B: Tensor, A: Tensor, scale: float, dtype: torch.dtype, mode: str):
    """QR both factors; return (Q_b, Q_a, M), M = |scale|·R_b R_aᵀ (Q's empty for mode='r')."""
    _check_svd_dtype(dtype)
    _check_factors(B, A, scale)
    q_b, r_b = torch.linalg.qr(B.to(dtype), mode=mode)  # (d_out, p), (p, r), p = min(d_out, r)
    q_a, r_a = torch.linalg.qr(A.to(dtype).T, mode=mode)  # (d_in, q), (q, r), q = min(d_in, r)
    core = abs(scale) * (r_b @ r_a.T)  # (p, q); the sign of scale is the caller's to place
    return q_b, q_a, core


def factorized_svd(
    B: Tensor, A: Tensor, *, scale: float = 1.0, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact thin SVD of ΔW = scale·B·A without materialising ΔW.

    B = Q_b R_b and Aᵀ = Q_a R_a (reduced QR), so ΔW = sign·Q_b M Q_aᵀ with the small core
    M = |scale|·R_b R_aᵀ. Its SVD M = U_m S V_mᵀ gives ΔW = (sign·Q_b U_m) S (Q_a V_m)ᵀ, at
    cost O((d_out + d_in)·r²) instead of O(d_out·d_in·min(d_out, d_in)); the sign of scale is
    folded into U, so Vh does not depend on it. When r > min(d_out, d_in) the reduced QRs
    shrink the core, so m = min(d_out, d_in, r) triplets come back.

    Args:
        B: (d_out, r) LoRA "up" factor.
        A: (r, d_in) LoRA "down" factor.
        scale: the LoRA scaling (α/r, or α/√r for rsLoRA).
        dtype: float32 or float64; the computation and the results use it.

    Returns:
        U (d_out, m), S (m,) descending and ≥ 0, Vh (m, d_in), with U diag(S) Vh = scale·B·A.

    Raises:
        InputError: non-2-D or mismatched factors, r = 0, NaN/Inf, non-finite scale, or a
            dtype other than float32/float64.
    """
    q_b, q_a, core = _factor_cores(B, A, scale, dtype, "reduced")
    u_m, s, vh_m = torch.linalg.svd(core, full_matrices=False)  # (p, m), (m,), (m, q)
    u = (q_b @ u_m) * (-1.0 if scale < 0 else 1.0)  # (d_out, m)
    vh = vh_m @ q_a.T  # (m, d_in)
    return u, s, vh


def factorized_svdvals(
    B: Tensor, A: Tensor, *, scale: float = 1.0, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Singular values of ΔW = scale·B·A from the R factors alone (no Q, no vectors).

    σ(ΔW) = σ(|scale|·R_b R_aᵀ) with B = Q_b R_b, Aᵀ = Q_a R_a, since Q_b and Q_a have
    orthonormal columns.

    Args:
        B: (d_out, r).
        A: (r, d_in).
        scale: the LoRA scaling.
        dtype: float32 or float64.

    Returns:
        S (m,) descending, m = min(d_out, d_in, r), in ``dtype``.

    Raises:
        InputError: as :func:`factorized_svd`.
    """
    _, _, core = _factor_cores(B, A, scale, dtype, "r")
    return torch.linalg.svdvals(core)  # (m,)


def svd_device(device: str | None = "auto") -> str:
    """Where dense SVDs run: ``auto`` (or None) is CUDA when present, else the CPU.

    Raises:
        InputError: an unknown device name, or ``cuda`` without a CUDA device.
    """
    name = (device or "auto").lower()
    if name not in ("auto", "cpu", "cuda"):
        raise InputError(f"device: expected auto, cpu or cuda, got {device!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device: cuda was asked for but no CUDA device is available")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def dense_svd(
    delta: Tensor,
    *,
    dtype: torch.dtype = torch.float32,
    compute_uv: bool = True,
    device: str | torch.device | None = None,
) -> tuple[Tensor, Tensor, Tensor] | Tensor:
    """Thin SVD of a materialised matrix (ΔW or a weight), upcast to float32/float64 first.

    ΔW = U diag(S) Vh with U (d_out, m), Vh (m, d_in), m = min(d_out, d_in). A wide matrix is
    decomposed as its transpose, ΔWᵀ = Vhᵀ diag(S) Uᵀ: LAPACK's SVD of a row-major wide matrix
    is ~2× slower than of its transpose (576×1536: 164 vs 118 ms, one thread).

    Args:
        delta: (d_out, d_in) in any float dtype (bf16/fp16 are upcast).
        dtype: float32 or float64, the SVD's precision.
        compute_uv: False returns only S (``torch.linalg.svdvals``, cheaper).
        device: where to run it (e.g. ``"cuda"``); results always come back on the CPU.

    Returns:
        (U, S, Vh), or S (m,) descending when ``compute_uv`` is False.

    Raises:
        InputError: a non-2-D input, NaN/Inf, or a dtype other than float32/float64.
    """
    _check_svd_dtype(dtype)
    if delta.ndim != 2:
        raise InputError(f"delta must be 2-D, got shape {tuple(delta.shape)}")
    check_finite(delta, what="delta")
    wide = delta.shape[0] < delta.shape[1]
    x = (delta.T if wide else delta).to(device=device or delta.device, dtype=dtype)  # tall
    if not compute_uv:
        return torch.linalg.svdvals(x).cpu()
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    if wide:
        u, vh = vh.T, u.T  # (d_out, m), (m, d_in)
    return u.cpu(), s.cpu(), vh.cpu()


def _spectrum(S) -> np.ndarray:
    """Validated float64 copy of a spectrum, sorted descending."""
    s = S.detach().cpu().double().numpy() if isinstance(S, Tensor) else np.asarray(S, float)
    if s.ndim != 1:
        raise InputError(f"singular values must be 1-D, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise InputError("singular values contain NaN or Inf")
    if (s < 0).any():
        raise InputError("singular values must be >= 0")
    return np.sort(s)[::-1]


def _energy_shares(s: np.ndarray) -> np.ndarray:
    """Cumulative shares Σ_{i≤k}σ_i²/Σσ_i², k = 1..n; last entry exactly 1 (s sorted, > 0)."""
    cum = np.cumsum((s / s[0]) ** 2)  # normalised first: no overflow/underflow in σ²
    # Dividing by cum[-1] (not a separate sum) makes the share exactly 1 once the tail is 0.
    return cum / cum[-1]


def rank_at_energy(S, tau: float, *, fro: float | None = None) -> int | None:
    """Smallest k whose top-k singular values hold a share τ of the energy ‖ΔW‖_F².

    k_τ = min{k : Σ_{i≤k} σ_i² / ‖ΔW‖_F² ≥ τ}, ‖ΔW‖_F² = Σ_i σ_i² over the whole spectrum. A
    share within n·ε₆₄ of τ counts as reaching it, n·ε₆₄ being the rounding error of the
    cumulative sum (n = len(S)). Given ``fro``, S may be only the top values of a spectrum
    (``topk.topk_svdvals``); when they hold less than τ·fro², k_τ > len(S) and None comes back.

    Args:
        S: (n,) singular values, ≥ 0 (sorted here if not descending).
        tau: the energy share, in (0, 1].
        fro: ‖ΔW‖_F of the whole matrix, when S is not its whole spectrum.

    Returns:
        k_τ in 1..n, 0 for a zero matrix, or None (only with ``fro``) when k_τ > n.

    Raises:
        InputError: τ outside (0, 1], fro negative or not finite, or S not 1-D, negative, NaN
            or Inf.
    """
    if not 0.0 < tau <= 1.0:
        raise InputError(f"tau must be in (0, 1], got {tau}")
    s = _spectrum(S)
    if fro is not None and not (math.isfinite(fro) and fro >= 0):
        raise InputError(f"fro must be finite and >= 0, got {fro}")
    if s.size == 0 or s[0] == 0.0 or fro == 0.0:
        return 0
    slack = s.size * np.finfo(np.float64).eps
    if fro is None:
        shares = _energy_shares(s)
    else:   # normalised by fro before squaring: no overflow/underflow in σ²
        shares = np.cumsum((s / fro) ** 2)
    hit = np.nonzero(shares >= tau - slack)[0]
    return int(hit[0]) + 1 if hit.size else None


def stable_rank(S) -> float:
    """Stable rank ‖ΔW‖_F² / ‖ΔW‖_2² = Σσ_i² / σ_max².

    Args:
        S: (n,) singular values, ≥ 0.

    Returns:
        A float in [1, n], or 0.0 for a zero matrix.

    Raises:
        InputError: S not 1-D, negative, NaN or Inf.
    """
    s = _spectrum(S)
    return float(np.sum((s / s[0]) ** 2)) if s.size and s[0] > 0 else 0.0


def entropy_rank(S) -> float:
    """Entropy effective rank (Roy & Vetterli 2007) exp(−Σ p_i log p_i), p_i = σ_i / Σ_j σ_j.

    Terms with p_i = 0 contribute 0 (the limit of p log p).

    Args:
        S: (n,) singular values, ≥ 0.

    Returns:
        A float in [1, n], or 0.0 for a zero matrix.

    Raises:
        InputError: S not 1-D, negative, NaN or Inf.
    """
    s = _spectrum(S)
    if s.size == 0 or s[0] == 0.0:
        return 0.0
    p = s[s > 0] / s.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def numerical_rank(S, *, shape: tuple[int, int], rtol: float | None = None) -> int:
    """Number of singular values above a tolerance (numpy ``matrix_rank`` convention).

    #{i : σ_i > tol}, tol = σ_max·rtol, with rtol = max(shape)·ε(float32) by default.

    Args:
        S: (n,) singular values, ≥ 0.
        shape: (d_out, d_in) of the matrix S came from.
        rtol: relative tolerance; None for the default above.

    Returns:
        The rank, 0 for a zero matrix.

    Raises:
        InputError: a bad shape, a negative rtol, or S not 1-D, negative, NaN or Inf.
    """
    _check_shape(shape)
    if rtol is None:
        rtol = max(shape) * float(np.finfo(np.float32).eps)
    if rtol < 0:
        raise InputError(f"rtol must be >= 0, got {rtol}")
    s = _spectrum(S)
    if s.size == 0:
        return 0
    return int(np.sum(s > s[0] * rtol))


def spectrum_metrics(S, *, shape: tuple[int, int], fro: float | None = None) -> dict:
    """All spectrum summaries of one ΔW at once.

    With ``fro`` (‖ΔW‖_F) and fewer values than min(shape), S is the top of the spectrum
    (``topk.topk_svdvals``): the measures it determines are exact functions of it, those it
    does not are None — the entropy rank (it needs every σ), an energy rank above len(S),
    and the numerical rank when the last value given is still above the tolerance.

    Args:
        S: (n,) singular values, ≥ 0.
        shape: (d_out, d_in) of the matrix.
        fro: ‖ΔW‖_F, when S is only the top of the spectrum.

    Returns:
        {"fro_norm": ‖ΔW‖_F, "spectral_norm": σ_max, "stable_rank", "entropy_rank",
        "energy_rank_50", "energy_rank_90", "energy_rank_99", "numerical_rank"}: Python
        floats and ints (or None as above), all 0 for a zero matrix.

    Raises:
        InputError: as the individual metrics.
    """
    s = _spectrum(S)
    if fro is None or s.size >= min(shape):
        return {
            "fro_norm": float(np.linalg.norm(s)),
            "spectral_norm": float(s[0]) if s.size else 0.0,
            "stable_rank": stable_rank(s),
            "entropy_rank": entropy_rank(s),
            "energy_rank_50": rank_at_energy(s, 0.5),
            "energy_rank_90": rank_at_energy(s, 0.9),
            "energy_rank_99": rank_at_energy(s, 0.99),
            "numerical_rank": numerical_rank(s, shape=shape),
        }
    top = float(s[0]) if s.size else 0.0
    numerical = numerical_rank(s, shape=shape) if s.size else 0
    tol = top * max(shape) * float(np.finfo(np.float32).eps)
    return {
        "fro_norm": float(fro),
        "spectral_norm": top,
        "stable_rank": float((fro / top) ** 2) if top > 0 else 0.0,
        "entropy_rank": None,
        "energy_rank_50": rank_at_energy(s, 0.5, fro=fro),
        "energy_rank_90": rank_at_energy(s, 0.9, fro=fro),
        "energy_rank_99": rank_at_energy(s, 0.99, fro=fro),
        "numerical_rank": numerical if top == 0 or s[-1] <= tol else None,
    }


def gavish_donoho_omega(beta: float) -> float:
    """The Gavish–Donoho optimal hard-threshold coefficient for an unknown noise level.

    ω(β) ≈ 0.56β³ − 0.95β² + 1.82β + 1.43 (Gavish & Donoho 2014, eq. 5), β = min/max aspect
    ratio of the matrix; ω(1) ≈ 2.86, ω(β → 0) → 1.43.

    Args:
        beta: the aspect ratio min(d_out, d_in) / max(d_out, d_in), in (0, 1].

    Returns:
        ω(β).

    Raises:
        InputError: β outside (0, 1].
    """
    if not 0.0 < beta <= 1.0:
        raise InputError(f"beta must be in (0, 1], got {beta}")
    return 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43


def gd_rank(S, *, shape: tuple[int, int]) -> int:
    """The Gavish–Donoho rank: singular values above the optimal hard threshold.

    #{i : σ_i > ω(β)·σ_med}, β = min(shape)/max(shape), σ_med the median of all min(shape)
    singular values; S is padded with zeros to min(shape) first (a LoRA update's factorized
    SVD returns only r of them). For X + Z, Z white noise, it keeps the components of X that
    stand above the noise bulk; a noise-free low-rank matrix (σ_med = 0) keeps its non-zero σ.

    Args:
        S: (n,) singular values, ≥ 0, n ≤ min(shape).
        shape: (d_out, d_in) of the matrix S came from.

    Returns:
        The rank, 0 for a zero matrix.

    Raises:
        InputError: a bad shape, more values than min(shape), or S not 1-D, negative, NaN, Inf.
    """
    _check_shape(shape)
    s = _spectrum(S)
    m = min(shape)
    if s.size > m:
        raise InputError(f"{s.size} singular values for a {shape[0]}×{shape[1]} matrix")
    full = np.concatenate([s, np.zeros(m - s.size)])  # (m,)
    tau = gavish_donoho_omega(m / max(shape)) * float(np.median(full))
    return int(np.sum(full > tau))


def gaussian_energy_rank(shape: tuple[int, int], *, tau: float = 0.9, seed: int = 0) -> int:
    """k_τ of a standard Gaussian matrix of the given shape: the energy rank of pure noise.

    A Gaussian matrix's spectrum is the Marchenko–Pastur bulk, so its k₉₀ is large (294 for
    576×576, 410 for 1536×576, docs/science.md): the floor a measured k₉₀ is read against.
    The matrix is drawn from ``seed`` in float32 (one svdvals); k_τ only depends on the shape
    up to a transpose and varies by at most a few between seeds.

    Args:
        shape: (d_out, d_in), both ≥ 1.
        tau: the energy share, in (0, 1].
        seed: the generator's seed.

    Returns:
        k_τ in 1..min(shape).

    Raises:
        InputError: a bad shape or τ outside (0, 1].
    """
    _check_shape(shape)
    gen = torch.Generator().manual_seed(seed)
    tall = (max(shape), min(shape))  # LAPACK's SVD of a tall matrix is the faster one
    return rank_at_energy(torch.linalg.svdvals(torch.randn(*tall, generator=gen)), tau)


def mp_energy_rank(shape: tuple[int, int], *, tau: float = 0.9) -> int:
    """k_τ of a Gaussian matrix of ``shape`` in the large-matrix limit: the Marchenko–Pastur law.

    The eigenvalues of XᵀX/n (X n × m Gaussian, n ≥ m, β = m/n) have the density
    f(x) = √((b − x)(x − a)) / (2πβx) on [a, b] = [(1 − √β)², (1 + √β)²]. The top share p of
    them holds the energy E(p) = ∫_{x_p}^b x f(x) dx (the mean of f is 1); k_τ = ⌈m·p⌉ with
    E(p) = τ. Integrated on x = a + (b − a)(1 − cos θ)/2, which removes the square-root edges.
    It equals ``gaussian_energy_rank``'s draw at 64², 100 × 10, 576² and 1536 × 576
    (tests/linalg/test_spectra.py), without an SVD of the matrix.

    Args:
        shape: (d_out, d_in), both ≥ 1.
        tau: the energy share, in (0, 1].

    Returns:
        k_τ in 1..min(shape).

    Raises:
        InputError: a bad shape or τ outside (0, 1].
    """
    _check_shape(shape)
    if not 0.0 < tau <= 1.0:
        raise InputError(f"tau must be in (0, 1], got {tau}")
    n, m = max(shape), min(shape)
    beta = m / n
    a, b = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
    theta = np.linspace(math.pi, 0.0, 200_001)            # from the top edge x = b down to a
    x = a + (b - a) * (1 - np.cos(theta)) / 2
    mass = ((b - a) / 2) ** 2 * np.sin(theta) ** 2 / (2 * math.pi * beta * np.maximum(x, 1e-300))
    step = math.pi / (theta.size - 1)

    def cumulative(y):                                    # trapezoid rule, from the top
        return np.concatenate([[0.0], np.cumsum((y[1:] + y[:-1]) / 2 * step)])

    share, energy = cumulative(mass), cumulative(mass * x)
    i = min(int(np.searchsorted(energy / energy[-1], tau)), theta.size - 1)
    return min(m, max(1, math.ceil(m * share[i] / share[-1] - 1e-9)))


def truncate(U: Tensor, S: Tensor, Vh: Tensor, k: int) -> Tensor:
    """Rank-k reconstruction trunc_k(ΔW) = U[:, :k] diag(S[:k]) Vh[:k].

    By Eckart–Young this is the best rank-k approximation when (U, S, Vh) is ΔW's SVD.

    Args:
        U: (d_out, m).
        S: (m,) descending.
        Vh: (m, d_in).
        k: 0 ≤ k ≤ m.

    Returns:
        (d_out, d_in) in the dtype of U/S/Vh (zeros for k = 0).

    Raises:
        InputError: inconsistent shapes or k outside [0, m].
    """
    m = S.shape[0] if S.ndim == 1 else -1
    if U.ndim != 2 or Vh.ndim != 2 or U.shape[1] != m or Vh.shape[0] != m:
        raise InputError(
            f"U {tuple(U.shape)}, S {tuple(S.shape)}, Vh {tuple(Vh.shape)} are not one SVD"
        )
    if not 0 <= k <= m:
        raise InputError(f"k={k} is outside [0, {m}] (the number of singular values)")
    return (U[:, :k] * S[:k]) @ Vh[:k]  # (d_out, k) @ (k, d_in)

