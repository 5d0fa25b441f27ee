"""Tests of rankscope.linalg.subspace against subspaces and matrices built with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rankscope.errors import InputError
from rankscope.linalg.spectra import dense_svd
from rankscope.linalg.subspace import (
    INTRUDER_EPS,
    amplification,
    count_intruders,
    counts_below,
    energy_in_subspace,
    intruder_max_cos,
    phi,
    phi_grid,
    phi_null_draws,
    phi_null_grid_quantiles,
    phi_null_mean,
    phi_null_quantiles,
    principal_angles,
    projection_norms,
    random_orthonormal,
    random_projection_draws,
    random_projection_expected,
    relative_fro_distance,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rotation(n: int, seed: int) -> torch.Tensor:
    return random_orthonormal(n, n, generator=_gen(seed))  # (n, n) orthogonal


THETAS = torch.tensor([1e-7, 0.3, 0.7, 1.1, math.pi / 2], dtype=torch.float64)


def _pair_at_angles(thetas: torch.Tensor, n: int = 30, seed: int = 0):
    """U1 = Q[e_1..e_m], U2 = Q[cos θ_k e_k + sin θ_k e_{m+k}]: principal angles exactly θ."""
    m = thetas.shape[0]
    eye = torch.eye(n, dtype=torch.float64)
    u1 = eye[:, :m]  # (n, m)
    u2 = eye[:, :m] * thetas.cos() + eye[:, m:2 * m] * thetas.sin()  # (n, m)
    q = _rotation(n, seed)
    return q @ u1, q @ u2


def test_phi_identical_and_orthogonal():
    q = _rotation(20, 1)
    assert phi(q[:, :5], q[:, :5], 5, 5) == pytest.approx(1.0, abs=1e-12)
    assert phi(q[:, :5], q[:, :8], 3, 8) == pytest.approx(1.0, abs=1e-12)
    assert phi(q[:, :5], q[:, 5:10], 5, 5) == pytest.approx(0.0, abs=1e-12)


def test_phi_is_mean_cos2_of_chosen_angles():
    u1, u2 = _pair_at_angles(THETAS)
    cos2 = THETAS.cos().square()
    assert phi(u1, u2, 5, 5) == pytest.approx(float(cos2.mean()), abs=1e-12)
    for i in range(1, 6):
        for j in range(1, 6):
            expected = float(cos2[: min(i, j)].mean())
            assert phi(u1, u2, i, j) == pytest.approx(expected, abs=1e-12)


def test_principal_angles_recover_chosen_angles():
    u1, u2 = _pair_at_angles(THETAS)
    angles = principal_angles(u1, u2)
    assert torch.allclose(angles, THETAS, rtol=1e-6, atol=1e-12)
    assert torch.allclose(principal_angles(u1[:, :2], u2), THETAS[:2], rtol=1e-6, atol=1e-12)
    # Unequal widths: U1's 2 columns lie inside U2's 4, so both angles are 0.
    q = _rotation(12, 2)
    assert torch.allclose(principal_angles(q[:, :2], q[:, :4]), torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("n, p, q", [(30, 5, 5), (40, 3, 7), (64, 8, 2), (12, 6, 6)])
def test_principal_angles_and_phi_agree_with_scipy(n, p, q):
    """φ(i, j) is the mean squared cosine of the principal angles between the top-i and top-j
    spans, as ``scipy.linalg.subspace_angles`` gives them, on random frames with overlap."""
    from scipy.linalg import subspace_angles

    gen = _gen(n + p + q)
    shared = random_orthonormal(n, 2, generator=gen)  # a common part: angles away from π/2
    u1 = torch.linalg.qr(torch.cat([shared, torch.randn(n, p - 2, generator=gen,
                                                        dtype=torch.float64)], dim=1))[0]
    u2 = torch.linalg.qr(torch.cat([shared + 0.3 * torch.randn(n, 2, generator=gen, dtype=torch.float64),
                                    torch.randn(n, max(q - 2, 0), generator=gen,
                                                dtype=torch.float64)], dim=1)[:, :q])[0]
    reference = np.sort(subspace_angles(u1.numpy(), u2.numpy()))  # ascending, (min(p, q),)
    np.testing.assert_allclose(principal_angles(u1, u2).numpy(), reference, atol=1e-12)
    for i in range(1, p + 1):
        for j in range(1, q + 1):
            angles = subspace_angles(u1[:, :i].numpy(), u2[:, :j].numpy())
            assert phi(u1, u2, i, j) == pytest.approx(float(np.mean(np.cos(angles) ** 2)),
                                                      abs=1e-12)


def test_phi_grid_equals_phi_elementwise():
    gen = _gen(3)
    u1, u2 = random_orthonormal(40, 8, generator=gen), random_orthonormal(40, 6, generator=gen)
    grid = phi_grid(u1, u2, imax=8, jmax=5)
    assert grid.shape == (8, 5)
    expected = np.array([[phi(u1, u2, i, j) for j in range(1, 6)] for i in range(1, 9)])
    np.testing.assert_allclose(grid, expected, atol=1e-14)


def test_random_orthonormal_has_orthonormal_columns():
    q = random_orthonormal(50, 7, generator=_gen(4))
    assert q.shape == (50, 7) and q.dtype == torch.float64
    assert torch.allclose(q.T @ q, torch.eye(7, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, random_orthonormal(50, 7, generator=_gen(4)))


@pytest.mark.parametrize("n,i,j", [(50, 3, 5), (64, 8, 8), (30, 1, 10)])
def test_random_baseline_mean_matches_max_ij_over_n(n, i, j):
    draws = phi_null_draws(n, i, j, n_draws=1500, generator=_gen(n + i + j))
    assert draws.shape == (1500,) and ((draws >= 0) & (draws <= 1)).all()
    se = draws.std(ddof=1) / math.sqrt(draws.size)
    assert abs(draws.mean() - phi_null_mean(n, i, j)) < 4 * se
    assert phi_null_mean(n, i, j) == max(i, j) / n


@pytest.mark.parametrize("i, j", [(1, 1), (1, 5), (4, 1)])
def test_null_quantiles_with_one_direction_are_the_exact_beta(i, j):
    """min(i, j) = 1: φ ~ Beta(m/2, (n − m)/2), m = max(i, j); Haar draws agree with it."""
    from scipy.stats import beta

    n, m = 40, max(i, j)
    q = phi_null_quantiles(n, i, j, (0.5, 0.95, 0.99), generator=_gen(1))
    np.testing.assert_allclose(q, beta.ppf([0.5, 0.95, 0.99], m / 2, (n - m) / 2), rtol=1e-12)
    draws = phi_null_draws(n, i, j, n_draws=20000, generator=_gen(2))
    np.testing.assert_allclose(np.quantile(draws, [0.5, 0.95, 0.99]), q, rtol=0.06)


def test_null_quantiles_of_the_top_direction_are_heavy_tailed():
    """The 99% quantile of φ(1, 1) is ≈ 6.6/n, far above its mean 1/n (d_in = 576)."""
    q99 = phi_null_quantiles(576, 1, 1, (0.99,), generator=_gen())[0]
    assert q99 * 576 == pytest.approx(6.6, abs=0.05)
    assert phi_null_quantiles(8, 1, 8, generator=_gen()).tolist() == [1.0, 1.0]  # the whole space


def test_null_quantiles_of_wider_subspaces_come_from_seeded_draws():
    q = phi_null_quantiles(30, 3, 5, (0.95, 0.99), n_draws=300, generator=_gen(3))
    draws = phi_null_draws(30, 3, 5, n_draws=300, generator=_gen(3))
    np.testing.assert_array_equal(q, np.quantile(draws, [0.95, 0.99]))
    assert phi_null_mean(30, 3, 5) < q[0] < q[1] <= 1.0
    with pytest.raises(InputError, match=r"in \(0, 1\)"):
        phi_null_quantiles(30, 3, 5, (0.5, 1.0), generator=_gen())
    with pytest.raises(InputError, match="j=31"):
        phi_null_quantiles(30, 3, 31, generator=_gen())


def _w_with_spectrum(sigmas: torch.Tensor, d_out: int, d_in: int, seed: int):
    """W = X diag(σ) Yᵀ with random orthonormal X (d_out, m), Y (d_in, m)."""
    gen = _gen(seed)
    m = sigmas.shape[0]
    x = random_orthonormal(d_out, m, generator=gen)
    y = random_orthonormal(d_in, m, generator=gen)
    return (x * sigmas) @ y.T, x, y


def test_projection_norms_and_amplification_known_by_construction():
    sig = torch.arange(30, 0, -1, dtype=torch.float64)  # σ_1..σ_30 = 30..1
    w, x, y = _w_with_spectrum(sig, 40, 30, seed=5)
    # ΔW = 3·u1 v1ᵀ + 1·u2 v2ᵀ with u1 = x_5, v1 = (y_5 + y_6)/√2, u2 = x_10, v2 = y_10.
    # Then UᵀWV = diag(σ_5/√2, σ_10) exactly (the cross terms vanish).
    u = torch.stack([x[:, 4], x[:, 9]], dim=1)  # (40, 2)
    v = torch.stack([(y[:, 4] + y[:, 5]) / math.sqrt(2), y[:, 9]], dim=1)  # (30, 2)
    delta = (u * torch.tensor([3.0, 1.0], dtype=torch.float64)) @ v.T
    du, ds, dvh = dense_svd(delta, dtype=torch.float64)
    norms = projection_norms(w, du[:, :2], dvh[:2])
    proj = math.sqrt(sig[4] ** 2 / 2 + sig[9] ** 2)
    assert norms["delta_dirs"] == pytest.approx(proj, rel=1e-10)
    assert norms["w_dirs"] == pytest.approx(math.sqrt(30**2 + 29**2), rel=1e-10)
    assert norms["w_fro"] == pytest.approx(float(sig.square().sum().sqrt()), rel=1e-10)
    w_fro = float(sig.square().sum().sqrt())
    assert norms["random_expected"] == pytest.approx(2 * w_fro / math.sqrt(40 * 30), rel=1e-12)
    delta_fro = float(ds.square().sum().sqrt())
    assert delta_fro == pytest.approx(math.sqrt(10))
    assert amplification(delta_fro, norms["delta_dirs"]) == pytest.approx(math.sqrt(10) / proj)


def test_the_random_baseline_is_the_exact_root_mean_square_over_haar_frames():
    """E‖UᵀWV‖_F² = r²‖W‖_F²/(d_out·d_in) for independent Haar U, V: the formula's square
    against the mean over 1,000 seeded draws (within 4 standard errors), and its root against
    the mean of the root (Jensen: slightly above it, by well under 2% here)."""
    sig = torch.linspace(5, 0.5, 30, dtype=torch.float64)
    w, _, _ = _w_with_spectrum(sig, 40, 30, seed=7)
    r, n_draws = 4, 1000
    w_fro = float(sig.square().sum().sqrt())
    expected = random_projection_expected(w_fro, r, shape=(40, 30))
    assert expected == pytest.approx(r * w_fro / math.sqrt(40 * 30))
    gen = _gen(8)
    u = torch.stack([random_orthonormal(40, r, generator=gen) for _ in range(n_draws)])
    v = torch.stack([random_orthonormal(30, r, generator=gen) for _ in range(n_draws)])
    literal = torch.linalg.matrix_norm(u.mT @ w @ v).numpy()  # (n_draws,) ‖UᵀWV‖_F
    shortcut = random_projection_draws(sig, r, shape=(40, 30), n_draws=n_draws, generator=_gen(9))
    for sample in (literal, shortcut):                # W's singular values alone suffice
        sq = sample**2
        assert abs(sq.mean() - expected**2) < 4 * sq.std(ddof=1) / math.sqrt(n_draws)
        assert sample.mean() == pytest.approx(expected, rel=0.02)
        assert sample.mean() < expected
    # Hu et al. Table 7 (‖Wq‖_F = 61.95, d = 12288) report 0.02 at r = 4 and 0.33 at r = 64
    # for one random draw; the baseline gives 0.0202 and 0.3227
    assert random_projection_expected(61.95, 4, shape=(12288, 12288)) == pytest.approx(0.02, abs=1e-3)
    assert random_projection_expected(61.95, 64, shape=(12288, 12288)) == pytest.approx(0.33, abs=0.01)


def test_random_projection_inputs_are_checked():
    with pytest.raises(InputError, match="r=5 is outside"):
        random_projection_expected(1.0, 5, shape=(4, 6))
    with pytest.raises(InputError, match="w_fro must be finite"):
        random_projection_expected(-1.0, 1, shape=(4, 6))
    with pytest.raises(InputError, match="is not the 4 singular values"):
        random_projection_draws(torch.ones(3), 1, shape=(4, 6), generator=_gen())
    with pytest.raises(InputError, match="n_draws must be >= 1"):
        random_projection_draws(torch.ones(4), 1, shape=(4, 6), n_draws=0, generator=_gen())


def test_the_grid_null_matches_the_per_cell_null():
    """Every cell of the grid null is the null of φ(i, j): exact Beta where min(i, j) = 1,
    and within sampling error of per-cell draws elsewhere."""
    n, imax, jmax = 64, 6, 5
    grid = phi_null_grid_quantiles(n, imax, jmax, (0.5, 0.95, 0.99), n_draws=600,
                                   generator=_gen(11))
    assert grid.shape == (3, imax, jmax)
    for m in range(1, jmax + 1):
        np.testing.assert_allclose(grid[:, 0, m - 1], phi_null_quantiles(n, 1, m, (0.5, 0.95, 0.99),
                                                                        generator=_gen()))
    for i, j in ((2, 2), (4, 5), (6, 3)):
        cell = phi_null_quantiles(n, i, j, (0.5, 0.95, 0.99), n_draws=600, generator=_gen(12))
        np.testing.assert_allclose(grid[:, i - 1, j - 1], cell, rtol=0.15)
        assert grid[0, i - 1, j - 1] < grid[1, i - 1, j - 1] < grid[2, i - 1, j - 1]
    assert (np.abs(grid[0] - max(imax, jmax) / n) < 1).all()
    with pytest.raises(InputError, match="imax=65 is outside"):
        phi_null_grid_quantiles(n, 65, 2, generator=_gen())
    with pytest.raises(InputError, match="quantile probabilities"):
        phi_null_grid_quantiles(n, 2, 2, (1.0,), generator=_gen())


def test_energy_in_subspace():
    delta = _w_with_spectrum(torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64), 20, 15, 9)[0]
    u, s, vh = dense_svd(delta, dtype=torch.float64)
    u3 = u[:, :3]
    assert energy_in_subspace(u3, u, s) == pytest.approx(1.0, abs=1e-12)
    full = random_orthonormal(20, 20, generator=_gen(10))
    complement = full - u3 @ (u3.T @ full)  # project out span(u3), then orthonormalise
    comp_u, comp_s, _ = torch.linalg.svd(complement)
    assert energy_in_subspace(comp_u[:, :17], u, s) == pytest.approx(0.0, abs=1e-12)
    assert energy_in_subspace(u[:, :1], u, s) == pytest.approx(16 / 21, abs=1e-12)


def test_relative_fro_distance():
    y = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    assert relative_fro_distance(y, y) == 0.0
    assert relative_fro_distance(torch.zeros(2, 2), y) == pytest.approx(1.0)
    assert relative_fro_distance(y + torch.tensor([[0.0, 0.5], [0.0, 0.0]]), y) == 0.1


def test_planted_intruder_found_and_none_in_unchanged_matrix():
    sig = torch.linspace(10, 1, 150, dtype=torch.float64)
    w0, _, _ = _w_with_spectrum(sig, 200, 150, seed=11)
    gen = _gen(12)
    u = random_orthonormal(200, 1, generator=gen)  # a random direction in high dimension
    v = random_orthonormal(150, 1, generator=gen)
    w_ft = w0 + 50.0 * u @ v.T
    u0 = dense_svd(w0, dtype=torch.float64)[0]
    max_cos = intruder_max_cos(dense_svd(w_ft, dtype=torch.float64)[0][:, :10], u0)
    assert max_cos.shape == (10,) and max_cos[0] < 0.5  # the planted one is the top direction
    assert abs(float(u[:, 0] @ dense_svd(w_ft, dtype=torch.float64)[0][:, 0])) > 0.99
    counts = count_intruders(w0, w_ft, k=10)
    assert counts[0.5] == int((max_cos < 0.5).sum()) >= 1
    assert list(counts.values()) == sorted(counts.values())  # more intruders as ε grows
    assert count_intruders(w0, w_ft, k=10, U0=u0) == counts
    np.testing.assert_allclose(intruder_max_cos(u0[:, :10], u0), 1.0, atol=1e-10)
    assert count_intruders(w0, w0.clone(), k=10, eps_values=(0.5,)) == {0.5: 0}
    assert count_intruders(w0, w0.float(), dtype=torch.float32) == {
        e: 0 for e in INTRUDER_EPS}


def test_bad_inputs_raise_input_error():
    q = _rotation(10, 13)
    with pytest.raises(InputError, match="i=0"):
        phi(q[:, :3], q[:, :3], 0, 2)
    with pytest.raises(InputError, match="j=4"):
        phi(q[:, :3], q[:, :3], 2, 4)
    with pytest.raises(InputError, match="rows"):
        phi(q[:, :3], q[:5, :3], 1, 1)
    with pytest.raises(InputError, match="imax=11"):
        phi_grid(q, q, imax=11, jmax=2)
    nan = q.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(InputError, match="U1 contains NaN or Inf"):
        principal_angles(nan, q)
    with pytest.raises(InputError, match="proj is 0"):
        amplification(1.0, 0.0)
    with pytest.raises(InputError, match="k=11"):
        count_intruders(q, q, k=11)
    with pytest.raises(InputError, match="eps"):
        count_intruders(q, q, eps_values=(0.0,))
    with pytest.raises(InputError, match="equal 2-D"):
        count_intruders(q, q[:, :5])
    with pytest.raises(InputError, match="zero"):
        energy_in_subspace(q[:, :2], q[:, :2], torch.zeros(2))
    with pytest.raises(InputError, match="Y is zero"):
        relative_fro_distance(q, torch.zeros(10, 10))
    with pytest.raises(InputError, match="k=12"):
        random_orthonormal(10, 12, generator=_gen())


def test_counts_below_counts_each_threshold_and_refuses_bad_ones():
    assert counts_below(np.array([0.2, 0.45, 0.9]), (0.3, 0.5, 1.0)) == {0.3: 1, 0.5: 2, 1.0: 3}
    with pytest.raises(InputError, match="eps"):
        counts_below(np.array([0.2]), (0.5, 1.5))
