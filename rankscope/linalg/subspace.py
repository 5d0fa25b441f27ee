"""How updates' singular subspaces relate: to each other, to random ones, and to W itself.

Pure functions of tensors: subspace similarity φ (Hu et al. 2021 eq. 4), principal angles, the
random-subspace null (single cells and whole φ(i, j) grids), ΔW-versus-W projections (§7.3,
Table 7) with their random baseline, and intruder dimensions (Shuttleworth et al. 2024,
Def. 3.1); W0 + ΔW's top singular vectors without its SVD are in ``linalg.davidson``. Overlaps
are computed in float64; SVDs in float32/64. Definitions: docs/science.md.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from rankscope.errors import InputError
from rankscope.linalg.spectra import check_finite, dense_svd

# The intruder thresholds ε swept (Shuttleworth et al. use ε = 0.5; docs/science.md: sweep it).
INTRUDER_EPS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _frame(U: Tensor, what: str) -> Tensor:
    """Validated float64 copy of a matrix whose columns span a subspace."""
    if U.ndim != 2:
        raise InputError(f"{what} must be 2-D, got shape {tuple(U.shape)}")
    check_finite(U, what=what)
    return U.detach().to(torch.float64)


def _pair(U1: Tensor, U2: Tensor) -> tuple[Tensor, Tensor]:
    u1, u2 = _frame(U1, "U1"), _frame(U2, "U2")
    if u1.shape[0] != u2.shape[0]:
        raise InputError(f"U1 {tuple(u1.shape)} and U2 {tuple(u2.shape)} differ in rows")
    return u1, u2


def _check_count(value: int, upper: int, name: str) -> None:
    if not 1 <= value <= upper:
        raise InputError(f"{name}={value} is outside [1, {upper}]")


def phi(U1: Tensor, U2: Tensor, i: int, j: int) -> float:
    """Subspace similarity of Hu et al. (eq. 4) between top-i and top-j singular directions.

    φ = ‖U1[:, :i]ᵀ U2[:, :j]‖_F² / min(i, j) ∈ [0, 1], the mean squared cosine of the
    min(i, j) principal angles between the two spans.

    Args:
        U1: (n, ≥ i) orthonormal columns, most important first.
        U2: (n, ≥ j) orthonormal columns.
        i: 1 ≤ i ≤ U1's columns.
        j: 1 ≤ j ≤ U2's columns.

    Returns:
        φ as a float.

    Raises:
        InputError: non-2-D or NaN/Inf inputs, different n, or i/j out of range.
    """
    u1, u2 = _pair(U1, U2)
    _check_count(i, u1.shape[1], "i")
    _check_count(j, u2.shape[1], "j")
    overlap = u1[:, :i].T @ u2[:, :j]  # (i, j)
    return float(overlap.square().sum()) / min(i, j)


def phi_grid(U1: Tensor, U2: Tensor, *, imax: int, jmax: int) -> np.ndarray:
    """φ(i, j) for all 1 ≤ i ≤ imax, 1 ≤ j ≤ jmax from one overlap matrix.

    With O = (U1[:, :imax]ᵀ U2[:, :jmax])², ‖U1^iᵀ U2^j‖_F² = Σ_{a≤i, b≤j} O_ab is a 2-D
    cumulative sum, so the grid costs one matmul.

    Args:
        U1: (n, ≥ imax) orthonormal columns.
        U2: (n, ≥ jmax) orthonormal columns.
        imax: rows of the grid.
        jmax: columns of the grid.

    Returns:
        (imax, jmax) float64 array; entry [i-1, j-1] is φ(U1, U2, i, j).

    Raises:
        InputError: as :func:`phi`.
    """
    u1, u2 = _pair(U1, U2)
    _check_count(imax, u1.shape[1], "imax")
    _check_count(jmax, u2.shape[1], "jmax")
    sq = (u1[:, :imax].T @ u2[:, :jmax]).square().numpy()  # (imax, jmax)
    cum = sq.cumsum(axis=0).cumsum(axis=1)  # (imax, jmax)
    mins = np.minimum.outer(np.arange(1, imax + 1), np.arange(1, jmax + 1))  # (imax, jmax)
    return cum / mins


def principal_angles(U1: Tensor, U2: Tensor) -> Tensor:
    """Principal angles between span(U1) and span(U2), in radians, ascending.

    cos θ_k = σ_k(U1ᵀU2), clamped to [0, 1]. arccos loses precision near θ = 0, so angles whose
    cosine exceeds 1/√2 are taken from the sines instead: sin θ_k = σ(U_b − U_a U_aᵀU_b), with
    U_a the wider frame (Knyazev & Argentati 2002, as ``scipy.linalg.subspace_angles``).

    Args:
        U1: (n, p) orthonormal columns.
        U2: (n, q) orthonormal columns.

    Returns:
        (min(p, q),) float64 angles in [0, π/2], ascending.

    Raises:
        InputError: non-2-D or NaN/Inf inputs, or different n.
    """
    u1, u2 = _pair(U1, U2)
    wide, narrow = (u1, u2) if u1.shape[1] >= u2.shape[1] else (u2, u1)
    cross = wide.T @ narrow  # (p, q), p ≥ q
    cos = torch.linalg.svdvals(cross).clamp(0.0, 1.0)  # (q,) descending
    sin = torch.linalg.svdvals(narrow - wide @ cross).clamp(0.0, 1.0).flip(0)  # (q,) ascending
    return torch.where(cos.square() > 0.5, torch.arcsin(sin), torch.arccos(cos))


def random_orthonormal(n: int, k: int, *, generator: torch.Generator) -> Tensor:
    """A uniformly (Haar) random k-frame of R^n: QR of an n×k Gaussian.

    The columns of Q are fixed to sign(diag R) so the result is exactly Haar-distributed.

    Args:
        n: ambient dimension.
        k: 1 ≤ k ≤ n columns.
        generator: torch random generator (the only source of randomness).

    Returns:
        (n, k) float64 with orthonormal columns.

    Raises:
        InputError: k outside [1, n].
    """
    _check_count(k, n, "k")
    return _haar_frames(1, n, k, generator)[0]


def _haar_frames(batch: int, n: int, k: int, generator: torch.Generator) -> Tensor:
    """(batch, n, k) independent Haar k-frames, from one batched QR."""
    g = torch.randn(batch, n, k, generator=generator, dtype=torch.float64)  # (batch, n, k)
    q, r = torch.linalg.qr(g)  # (batch, n, k), (batch, k, k)
    signs = torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0)  # never 0
    return q * signs[:, None, :]


def phi_null_mean(n: int, i: int, j: int) -> float:
    """E[φ] = max(i, j)/n for independent uniformly random i- and j-dim subspaces of R^n.

    E‖U1ᵀU2‖_F² = i·j/n, divided by min(i, j). Raises InputError for i or j outside [1, n].
    """
    _check_count(i, n, "i")
    _check_count(j, n, "j")
    return max(i, j) / n


def phi_null_draws(
    n: int, i: int, j: int, *, n_draws: int = 100, generator: torch.Generator
) -> np.ndarray:
    """φ between independent random i- and j-dim subspaces of R^n, n_draws times.

    The empirical null (mean ≈ max(i, j)/n, and its spread) to compare measured φ with.

    Args:
        n: ambient dimension.
        i: 1 ≤ i ≤ n.
        j: 1 ≤ j ≤ n.
        n_draws: number of independent pairs, ≥ 1.
        generator: torch random generator.

    Returns:
        (n_draws,) float64 array of φ values.

    Raises:
        InputError: i, j outside [1, n] or n_draws < 1.
    """
    if n_draws < 1:
        raise InputError(f"n_draws must be >= 1, got {n_draws}")
    _check_count(i, n, "i")
    _check_count(j, n, "j")
    # Batched QRs and bmm rather than n_draws small calls; chunks cap memory at ~128 MiB a side.
    chunk = max(1, 2**24 // (n * max(i, j)))
    out = []
    for start in range(0, n_draws, chunk):
        size = min(chunk, n_draws - start)
        u1 = _haar_frames(size, n, i, generator)  # (size, n, i)
        u2 = _haar_frames(size, n, j, generator)  # (size, n, j)
        out.append((u1.mT @ u2).square().sum(dim=(1, 2)) / min(i, j))  # (size,)
    return torch.cat(out).numpy()


def phi_null_quantiles(n: int, i: int, j: int, qs: tuple[float, ...] = (0.95, 0.99), *,
                       n_draws: int = 200, generator: torch.Generator) -> np.ndarray:
    """Quantiles of φ between independent uniformly random i- and j-dim subspaces of R^n.

    With min(i, j) = 1, φ is the squared norm of a random unit vector's projection onto a fixed
    m-dim subspace, m = max(i, j): φ ~ Beta(m/2, (n − m)/2), exact (heavy-tailed: its 99%
    quantile is ≈ 6.6/n for m = 1, against a mean of 1/n). Otherwise the empirical quantiles of
    ``n_draws`` seeded Haar draws (:func:`phi_null_draws`).

    Args:
        n: ambient dimension.
        i: 1 ≤ i ≤ n.
        j: 1 ≤ j ≤ n.
        qs: the probabilities, each in (0, 1).
        n_draws: draws when min(i, j) > 1, ≥ 1.
        generator: torch random generator (used only for the draws).

    Returns:
        (len(qs),) float64 array of quantiles.

    Raises:
        InputError: i, j outside [1, n], a probability outside (0, 1), or n_draws < 1.
    """
    _check_probs(qs)
    _check_count(i, n, "i")
    _check_count(j, n, "j")
    if min(i, j) == 1:
        return _beta_quantiles(n, max(i, j), qs)
    draws = phi_null_draws(n, i, j, n_draws=n_draws, generator=generator)
    return np.quantile(draws, qs)


def _check_probs(qs: tuple[float, ...]) -> None:
    if not all(0.0 < q < 1.0 for q in qs):
        raise InputError(f"quantile probabilities must be in (0, 1), got {list(qs)}")


def _beta_quantiles(n: int, m: int, qs: tuple[float, ...]) -> np.ndarray:
    """Quantiles of φ(1, m) (or φ(m, 1)) in R^n: Beta(m/2, (n − m)/2), exactly 1 when m = n."""
    from scipy.stats import beta

    return np.ones(len(qs)) if m == n else beta.ppf(qs, m / 2, (n - m) / 2)


def phi_null_grid_quantiles(n: int, imax: int, jmax: int, qs: tuple[float, ...] = (0.95, 0.99),
                            *, n_draws: int = 200, generator: torch.Generator) -> np.ndarray:
    """Quantiles of φ(i, j) between independent random subspaces, for a whole grid at once.

    The top-i columns of a Haar imax-frame form a Haar i-frame, so one pair of frames per draw
    gives a null draw of every cell (``phi_grid``'s cumulative sums): ``n_draws`` draws of
    (n, imax) and (n, jmax) frames instead of one set per cell. Cells with min(i, j) = 1 take
    the exact Beta(m/2, (n − m)/2) quantiles, m = max(i, j), as :func:`phi_null_quantiles`.

    Args:
        n: ambient dimension.
        imax: 1 ≤ imax ≤ n rows of the grid.
        jmax: 1 ≤ jmax ≤ n columns.
        qs: the probabilities, each in (0, 1).
        n_draws: ≥ 1.
        generator: torch random generator.

    Returns:
        (len(qs), imax, jmax) float64 array; entry [q, i-1, j-1] is the quantile qs[q] of φ(i, j).

    Raises:
        InputError: imax, jmax outside [1, n], a probability outside (0, 1), or n_draws < 1.
    """
    _check_probs(qs)
    _check_count(imax, n, "imax")
    _check_count(jmax, n, "jmax")
    if n_draws < 1:
        raise InputError(f"n_draws must be >= 1, got {n_draws}")
    chunk = max(1, 2**24 // (n * max(imax, jmax)))
    mins = np.minimum.outer(np.arange(1, imax + 1), np.arange(1, jmax + 1))  # (imax, jmax)
    draws = []
    for start in range(0, n_draws, chunk):
        size = min(chunk, n_draws - start)
        u1 = _haar_frames(size, n, imax, generator)  # (size, n, imax)
        u2 = _haar_frames(size, n, jmax, generator)  # (size, n, jmax)
        sq = (u1.mT @ u2).square().numpy()  # (size, imax, jmax)
        draws.append(sq.cumsum(axis=1).cumsum(axis=2) / mins)
    out = np.quantile(np.concatenate(draws), qs, axis=0)  # (len(qs), imax, jmax)
    for m in range(1, max(imax, jmax) + 1):  # the exact null where min(i, j) = 1
        exact = _beta_quantiles(n, m, qs)  # (len(qs),)
        if m <= jmax:
            out[:, 0, m - 1] = exact
        if m <= imax:
            out[:, m - 1, 0] = exact
    return out


def energy_in_subspace(U_sub: Tensor, U: Tensor, S: Tensor) -> float:
    """Share of an update's energy ‖ΔW‖_F² lying in the column span of U_sub.

    For ΔW = U diag(S) Vh, ‖P ΔW‖_F² / ‖ΔW‖_F² = ‖U_subᵀ U diag(S)‖_F² / Σ S², P = U_sub U_subᵀ
    the orthogonal projector (U_sub orthonormal); Vh has orthonormal rows and leaves the norm
    unchanged, so it is not needed.

    Args:
        U_sub: (d_out, p) orthonormal columns.
        U: (d_out, m) left singular vectors of ΔW.
        S: (m,) its singular values.

    Returns:
        The share, in [0, 1].

    Raises:
        InputError: mismatched shapes, NaN/Inf, or a zero update (the share is undefined).
    """
    u_sub, u = _pair(U_sub, U)
    if S.ndim != 1 or S.shape[0] != u.shape[1]:
        raise InputError(f"S {tuple(S.shape)} does not match U {tuple(U.shape)}")
    check_finite(S, what="S")
    s = S.detach().double()  # (m,)
    total = float(s.square().sum())
    if total == 0.0:
        raise InputError("the update is zero: its energy share is undefined")
    inside = (u_sub.T @ u) * s  # (p, m)
    return float(inside.square().sum()) / total


def relative_fro_distance(X: Tensor, Y: Tensor) -> float:
    """Relative Frobenius distance ‖X − Y‖_F / ‖Y‖_F of two equal-shape tensors, in float64.

    Raises:
        InputError: different shapes, NaN/Inf, or Y = 0.
    """
    if X.shape != Y.shape:
        raise InputError(f"X {tuple(X.shape)} and Y {tuple(Y.shape)} differ in shape")
    check_finite(X, what="X")
    check_finite(Y, what="Y")
    x, y = X.detach().double(), Y.detach().double()
    ref = float(torch.linalg.vector_norm(y))
    if ref == 0.0:
        raise InputError("Y is zero: the relative distance is undefined")
    return float(torch.linalg.vector_norm(x - y)) / ref


def projection_norms(
    W: Tensor,
    U: Tensor,
    Vh: Tensor,
    *,
    dtype: torch.dtype = torch.float64,
    s_w: Tensor | None = None,
) -> dict:
    """‖UᵀWV‖_F for ΔW's and W's own top-r directions, and its exact random baseline (Table 7).

    delta_dirs = ‖Uᵀ W Vhᵀ‖_F with (U, Vh) ΔW's top-r singular vectors; w_dirs the same with
    W's own top-r vectors, = sqrt(Σ_{i≤r} σ_i(W)²); random_expected the root of its mean over
    independent Haar frames (:func:`random_projection_expected`), in place of one random draw.

    Args:
        W: (d_out, d_in) the weight.
        U: (d_out, r) ΔW's top-r left singular vectors.
        Vh: (r, d_in) ΔW's top-r right singular vectors (rows).
        dtype: float32 or float64 for W's SVD.
        s_w: W's singular values when already known (descending), to skip its SVD.

    Returns:
        {"delta_dirs", "w_dirs", "random_expected", "w_fro": ‖W‖_F}, floats.

    Raises:
        InputError: mismatched shapes, r > min(d_out, d_in), or NaN/Inf.
    """
    w = _frame(W, "W")  # (d_out, d_in)
    u, v = _frame(U, "U"), _frame(Vh, "Vh").T  # (d_out, r), (d_in, r)
    r = u.shape[1]
    if u.shape[0] != w.shape[0] or v.shape[0] != w.shape[1] or v.shape[1] != r:
        raise InputError(f"U {tuple(U.shape)}, Vh {tuple(Vh.shape)} do not fit W {tuple(W.shape)}")
    _check_count(r, min(w.shape), "r")
    if s_w is None:
        s_w = dense_svd(W, dtype=dtype, compute_uv=False)
    s_w = s_w.double()  # (min(d_out, d_in),)
    w_fro = float(torch.linalg.matrix_norm(w))
    return {
        "delta_dirs": float(torch.linalg.matrix_norm(u.T @ w @ v)),
        "w_dirs": float(torch.linalg.vector_norm(s_w[:r])),
        "random_expected": random_projection_expected(w_fro, r, shape=tuple(w.shape)),
        "w_fro": w_fro,
    }


def random_projection_expected(w_fro: float, r: int, *, shape: tuple[int, int]) -> float:
    """The random baseline of Table 7: r·‖W‖_F / √(d_out·d_in).

    For independent Haar frames U ∈ R^{d_out×r}, V ∈ R^{d_in×r}, E[UUᵀ] = (r/d_out)·I and
    E[VVᵀ] = (r/d_in)·I, so E‖UᵀWV‖_F² = tr(E[UUᵀ] W E[VVᵀ] Wᵀ) = r²‖W‖_F²/(d_out·d_in)
    exactly; this is its root (Hu et al.'s 0.02 at r = 4 and 0.33 at r = 64, ‖W‖_F = 61.95,
    d = 12288). By Jensen it is ≥ E‖UᵀWV‖_F, and close to it once r·min(d) is large.

    Args:
        w_fro: ‖W‖_F, ≥ 0.
        r: 1 ≤ r ≤ min(shape).
        shape: (d_out, d_in).

    Returns:
        The baseline.

    Raises:
        InputError: a negative or non-finite norm, or r out of range.
    """
    if not np.isfinite(w_fro) or w_fro < 0:
        raise InputError(f"w_fro must be finite and >= 0, got {w_fro}")
    _check_count(r, min(shape), "r")
    return r * w_fro / float(np.sqrt(shape[0] * shape[1]))


def random_projection_draws(s_w: Tensor, r: int, *, shape: tuple[int, int], n_draws: int = 200,
                            generator: torch.Generator) -> np.ndarray:
    """‖UᵀWV‖_F for n_draws independent Haar frames U (d_out, r), V (d_in, r).

    With W = P diag(s) Qᵀ (thin SVD), UᵀWV = (PᵀU)ᵀ diag(s) (QᵀV), and PᵀU is distributed as
    the first m = min(d_out, d_in) rows of a Haar frame of R^{d_out} (likewise QᵀV): so only
    W's singular values are needed, and each draw costs O(m·r²), not a product with W.

    Args:
        s_w: (m,) W's singular values.
        r: 1 ≤ r ≤ m.
        shape: (d_out, d_in) of W.
        n_draws: ≥ 1.
        generator: torch random generator (the only source of randomness).

    Returns:
        (n_draws,) float64 array.

    Raises:
        InputError: s_w not of length min(shape), NaN/Inf, r out of range or n_draws < 1.
    """
    m = min(shape)
    if s_w.ndim != 1 or s_w.shape[0] != m:
        raise InputError(f"s_w {tuple(s_w.shape)} is not the {m} singular values of {shape}")
    check_finite(s_w, what="s_w")
    _check_count(r, m, "r")
    if n_draws < 1:
        raise InputError(f"n_draws must be >= 1, got {n_draws}")
    s = s_w.detach().double()  # (m,)
    chunk = max(1, 2**24 // (max(shape) * r))  # ~128 MiB of frames a side
    out = []
    for start in range(0, n_draws, chunk):
        size = min(chunk, n_draws - start)
        u = _haar_frames(size, shape[0], r, generator)[:, :m]  # (size, m, r)
        v = _haar_frames(size, shape[1], r, generator)[:, :m]  # (size, m, r)
        out.append(torch.linalg.matrix_norm((u * s[:, None]).mT @ v))  # (size,)
    return torch.cat(out).numpy()


def amplification(delta_fro: float, proj: float) -> float:
    """Amplification factor ‖ΔW‖_F / ‖UᵀWV‖_F (Hu et al. §7.3).

    Args:
        delta_fro: ‖ΔW‖_F.
        proj: ‖UᵀWV‖_F, the ``delta_dirs`` of :func:`projection_norms`.

    Returns:
        The ratio.

    Raises:
        InputError: proj = 0, or a negative or non-finite input.
    """
    if not (np.isfinite(delta_fro) and np.isfinite(proj)) or delta_fro < 0 or proj < 0:
        raise InputError(f"norms must be finite and >= 0, got {delta_fro} and {proj}")
    if proj == 0:
        raise InputError("proj is 0: W has no component along ΔW's directions")
    return delta_fro / proj


def intruder_max_cos(Y: Tensor, U0: Tensor) -> np.ndarray:
    """max_i |cos(y_j, x_i)| of each column y_j of Y against every column x_i of U0.

    Args:
        Y: (d_out, k) unit columns: the fine-tuned weight's top-k left singular vectors.
        U0: (d_out, m) unit columns: all of W0's left singular vectors.

    Returns:
        (k,) float64 array; y_j is an intruder at threshold ε when its entry is < ε.
    """
    cos = (Y.T.to(U0.dtype) @ U0).abs()  # (k, m); unit columns, so these are |cosines|
    return cos.max(dim=1).values.double().numpy()


def counts_below(max_cos: np.ndarray, eps_values: tuple[float, ...]) -> dict[float, int]:
    """{ε: #{j : max_cos_j < ε}}: intruder counts for a sweep of thresholds.

    Raises:
        InputError: a threshold outside (0, 1].
    """
    bad = [e for e in eps_values if not 0.0 < e <= 1.0]
    if bad:
        raise InputError(f"eps values must be in (0, 1], got {bad}")
    return {float(e): int(np.sum(max_cos < e)) for e in eps_values}


def count_intruders(
    W0: Tensor,
    W_ft: Tensor,
    *,
    k: int = 10,
    eps_values: tuple[float, ...] = INTRUDER_EPS,
    dtype: torch.dtype = torch.float64,
    U0: Tensor | None = None,
) -> dict[float, int]:
    """Intruder dimensions of a fine-tuned weight (Shuttleworth et al. 2024, Def. 3.1), per ε.

    A top-k left singular vector y_j of W_ft (columns of U, as in their paper and peft) is an
    intruder at ε if max_i |cos(y_j, x_i)| < ε over all m = min(d_out, d_in) left singular
    vectors x_i of W0 (the thin SVD: those with a singular value). One SVD of each matrix serves
    every ε.

    Args:
        W0: (d_out, d_in) pretrained weight.
        W_ft: (d_out, d_in) fine-tuned weight.
        k: 1 ≤ k ≤ m top vectors of W_ft to test.
        eps_values: thresholds ε, each in (0, 1].
        dtype: float32 or float64 for the SVDs.
        U0: W0's left singular vectors (d_out, m) when already known, to skip its SVD.

    Returns:
        {ε: #{j ≤ k : max_i |cos(y_j, x_i)| < ε}}.

    Raises:
        InputError: different or non-2-D shapes, k out of range, an ε outside (0, 1], NaN/Inf.
    """
    counts_below(np.zeros(0), eps_values)  # checks ε before any SVD
    if W0.ndim != 2 or W0.shape != W_ft.shape:
        raise InputError(f"W0 {tuple(W0.shape)} and W_ft {tuple(W_ft.shape)} must be equal 2-D")
    _check_count(k, min(W0.shape), "k")
    x = dense_svd(W0, dtype=dtype)[0] if U0 is None else U0  # (d_out, m): all of W0's vectors
    y = dense_svd(W_ft, dtype=dtype)[0][:, :k]  # (d_out, k)
    return counts_below(intruder_max_cos(y, x), eps_values)
