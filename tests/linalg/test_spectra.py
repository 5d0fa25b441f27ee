"""Tests of rankscope.linalg.spectra against matrices built with a chosen spectrum."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rankscope.errors import InputError
from rankscope.linalg.spectra import (
    check_finite,
    dense_svd,
    entropy_rank,
    factorized_svd,
    factorized_svdvals,
    gaussian_energy_rank,
    gavish_donoho_omega,
    gd_rank,
    mp_energy_rank,
    numerical_rank,
    rank_at_energy,
    spectrum_metrics,
    stable_rank,
    truncate,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthonormal(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return q  # (n, k)


def _with_spectrum(s: list[float], d_out: int, d_in: int, seed: int = 0) -> torch.Tensor:
    """U diag(s) Vᵀ with random orthonormal U, V: a matrix whose singular values are s."""
    gen = _gen(seed)
    k = len(s)
    u, v = _orthonormal(d_out, k, gen), _orthonormal(d_in, k, gen)
    return (u * torch.tensor(s, dtype=torch.float64)) @ v.T  # (d_out, d_in)


S_CHOSEN = [5.0, 3.0, 1.0, 0.0, 0.0, 0.0]


def test_dense_and_factorized_recover_chosen_spectrum():
    delta = _with_spectrum(S_CHOSEN, 40, 30)
    s_dense = dense_svd(delta, dtype=torch.float64, compute_uv=False)
    assert torch.allclose(s_dense[:6], torch.tensor(S_CHOSEN, dtype=torch.float64), atol=1e-10)
    assert s_dense[3:].abs().max() < 1e-10
    # The same ΔW as factors B (40, 6), A (6, 30) with scale 2: B·A = ΔW / 2.
    gen = _gen(1)
    u, v = _orthonormal(40, 6, gen), _orthonormal(30, 6, gen)
    b = u * torch.tensor(S_CHOSEN, dtype=torch.float64) / 2
    s_fact = factorized_svdvals(b, v.T, scale=2.0)
    assert torch.allclose(s_fact, torch.tensor(S_CHOSEN, dtype=torch.float64), atol=1e-10)
    _, s_full, _ = factorized_svd(b, v.T, scale=2.0)
    assert torch.allclose(s_full, s_fact, atol=1e-12)


def test_metrics_on_chosen_spectrum_match_hand_values():
    s = np.array(S_CHOSEN)
    assert stable_rank(s) == pytest.approx((25 + 9 + 1) / 25)
    p = np.array([5, 3, 1]) / 9
    assert entropy_rank(s) == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    # Energy shares: 25/35 = .714, 34/35 = .971, 35/35 = 1.
    assert rank_at_energy(s, 0.5) == 1
    assert rank_at_energy(s, 0.9) == 2
    assert rank_at_energy(s, 0.99) == 3
    assert rank_at_energy(s, 1.0) == 3
    assert numerical_rank(s, shape=(40, 30)) == 3
    metrics = spectrum_metrics(torch.tensor(s), shape=(40, 30))
    assert set(metrics) == {
        "fro_norm", "spectral_norm", "stable_rank", "entropy_rank",
        "energy_rank_50", "energy_rank_90", "energy_rank_99", "numerical_rank",
    }
    assert metrics["fro_norm"] == pytest.approx(math.sqrt(35))
    assert metrics["spectral_norm"] == 5.0
    assert (metrics["energy_rank_50"], metrics["energy_rank_90"], metrics["energy_rank_99"]) == (
        1, 2, 3)


@pytest.mark.parametrize("k", [1, 2, 5, 7, 13])
def test_equal_values_give_energy_rank_k_just_below_one(k):
    s = np.concatenate([np.full(k, 0.3), np.zeros(20)])
    assert rank_at_energy(s, 1 - 1e-12) == k
    assert rank_at_energy(s, 1.0) == k
    assert stable_rank(s) == pytest.approx(k)
    assert entropy_rank(s) == pytest.approx(k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_planted_rank_k_matrix(k, dtype):
    gen = _gen(k)
    delta = torch.randn(120, k, generator=gen) @ torch.randn(k, 80, generator=gen)  # rank k
    s = dense_svd(delta, dtype=dtype, compute_uv=False)
    assert numerical_rank(s, shape=(120, 80)) == k
    assert rank_at_energy(s, 0.99) <= k
    assert rank_at_energy(s, 1 - 1e-9) == k


SHAPES = [(576, 576, 1), (576, 576, 4), (576, 576, 8), (576, 576, 64),
          (1536, 576, 8), (576, 1536, 16), (64, 32, 48)]


@pytest.mark.parametrize("d_out,d_in,r", SHAPES)
@pytest.mark.parametrize("scale", [2.0, -0.5])
def test_factorized_matches_dense(d_out, d_in, r, scale):
    gen = _gen(d_out + d_in + r)
    b = torch.randn(d_out, r, generator=gen)
    a = torch.randn(r, d_in, generator=gen)
    m = min(d_out, d_in, r)
    s_dense = dense_svd(scale * b @ a, compute_uv=False)[:m].double()  # float32 reference
    s_fact = factorized_svdvals(b, a, scale=scale)
    assert s_fact.shape == (m,)
    assert torch.allclose(s_fact, s_dense, rtol=0, atol=1e-5 * float(s_dense[0]))
    u, s, vh = factorized_svd(b, a, scale=scale)
    assert u.shape == (d_out, m) and vh.shape == (m, d_in) and s.dtype == torch.float64
    assert torch.allclose(s, s_fact, atol=1e-10 * float(s[0]))
    target = scale * b.double() @ a.double()
    assert torch.allclose((u * s) @ vh, target, atol=1e-10 * float(s[0]))
    assert torch.allclose(u.T @ u, torch.eye(m, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(vh @ vh.T, torch.eye(m, dtype=torch.float64), atol=1e-10)


def test_factorized_float32_dtype():
    gen = _gen(3)
    b, a = torch.randn(50, 4, generator=gen), torch.randn(4, 40, generator=gen)
    u, s, vh = factorized_svd(b.bfloat16(), a.bfloat16(), dtype=torch.float32)
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    assert factorized_svdvals(b, a, dtype=torch.float32).dtype == torch.float32
    with pytest.raises(InputError, match="float32 or float64"):
        factorized_svd(b, a, dtype=torch.bfloat16)


def test_zero_b_lora_at_init_gives_zeros_without_nan():
    b = torch.zeros(64, 8)
    a = torch.randn(8, 48, generator=_gen(4))
    u, s, vh = factorized_svd(b, a, scale=2.0)
    assert torch.isfinite(u).all() and torch.isfinite(vh).all()
    assert torch.equal(s, torch.zeros(8, dtype=torch.float64))
    assert torch.equal(factorized_svdvals(b, a), torch.zeros(8, dtype=torch.float64))
    metrics = spectrum_metrics(s, shape=(64, 48))
    assert all(v == 0 and not math.isnan(v) for v in metrics.values())
    assert rank_at_energy(s, 0.9) == 0 and numerical_rank(s, shape=(64, 48)) == 0


def test_dense_svd_reconstructs_and_upcasts():
    delta = _with_spectrum([4.0, 2.0, 1.0], 30, 20).to(torch.bfloat16)
    u, s, vh = dense_svd(delta)
    assert s.dtype == torch.float32 and u.shape == (30, 20) and vh.shape == (20, 20)
    assert torch.allclose((u * s) @ vh, delta.float(), atol=1e-5)


def test_dense_svd_of_a_wide_matrix_is_that_of_its_transpose():
    """A wide ΔW is decomposed as ΔWᵀ: same triplets, U and Vh in ΔW's own orientation."""
    wide = _with_spectrum([4.0, 2.0, 1.0], 20, 30)  # (20, 30)
    u, s, vh = dense_svd(wide, dtype=torch.float64)
    assert u.shape == (20, 20) and s.shape == (20,) and vh.shape == (20, 30)
    assert torch.allclose((u * s) @ vh, wide, atol=1e-12)
    assert torch.allclose(u.T @ u, torch.eye(20, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(vh @ vh.T, torch.eye(20, dtype=torch.float64), atol=1e-12)
    ut, st, vht = dense_svd(wide.T.contiguous(), dtype=torch.float64)
    assert torch.equal(s, st) and torch.equal(u, vht.T) and torch.equal(vh, ut.T)
    assert torch.allclose(dense_svd(wide, dtype=torch.float64, compute_uv=False), s, atol=1e-12)


@pytest.mark.parametrize("k", [1, 4])
def test_truncate_restores_planted_rank_k(k):
    gen = _gen(10 + k)
    b = torch.randn(60, k, generator=gen, dtype=torch.float64)
    a = torch.randn(k, 45, generator=gen, dtype=torch.float64)
    delta = b @ a
    u, s, vh = dense_svd(delta, dtype=torch.float64)
    assert torch.allclose(truncate(u, s, vh, k), delta, atol=1e-10)
    assert torch.equal(truncate(u, s, vh, 0), torch.zeros_like(delta))
    # Factors padded to r = 8 with rows of A that B's zero columns cancel: the factorized SVD
    # truncated at k drops nothing real.
    b_pad = torch.cat([b, torch.zeros(60, 8 - k, dtype=torch.float64)], dim=1)
    a_pad = torch.cat([a, torch.randn(8 - k, 45, generator=gen, dtype=torch.float64)], dim=0)
    assert torch.allclose(truncate(*factorized_svd(b_pad, a_pad, scale=3.0), k), 3.0 * delta,
                          atol=1e-10)


def test_truncate_is_best_rank_k():
    delta = _with_spectrum([6.0, 4.0, 2.0, 1.0], 25, 20, seed=5)
    u, s, vh = dense_svd(delta, dtype=torch.float64)
    err = torch.linalg.matrix_norm(delta - truncate(u, s, vh, 2))
    assert float(err) == pytest.approx(math.sqrt(4 + 1))


def test_bad_inputs_raise_input_error():
    b, a = torch.randn(10, 3), torch.randn(3, 8)
    b_nan = b.clone()
    b_nan[0, 0] = float("nan")
    with pytest.raises(InputError, match="B contains NaN or Inf"):
        factorized_svd(b_nan, a)
    with pytest.raises(InputError, match="A contains NaN or Inf"):
        factorized_svdvals(b, a.fill_(float("inf")))
    with pytest.raises(InputError, match="delta contains NaN or Inf"):
        dense_svd(b_nan)
    with pytest.raises(InputError, match="shared rank"):
        factorized_svd(b, torch.randn(4, 8))
    with pytest.raises(InputError, match="x contains NaN or Inf"):
        check_finite(torch.tensor([1.0, float("-inf")]), what="x")
    with pytest.raises(InputError, match="tau"):
        rank_at_energy([1.0], 0.0)
    with pytest.raises(InputError, match="NaN"):
        stable_rank(np.array([1.0, np.nan]))
    with pytest.raises(InputError, match=">= 0"):
        entropy_rank([1.0, -1.0])
    u, s, vh = dense_svd(torch.randn(6, 5))
    with pytest.raises(InputError, match="k=6"):
        truncate(u, s, vh, 6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dense_svd_on_cuda_matches_cpu_and_returns_cpu():
    delta = _with_spectrum([4.0, 2.0, 1.0], 300, 200)
    s_gpu = dense_svd(delta, dtype=torch.float64, compute_uv=False, device="cuda")
    u, s, vh = dense_svd(delta, dtype=torch.float64, device="cuda")
    assert s_gpu.device.type == u.device.type == vh.device.type == "cpu"
    assert torch.allclose(s_gpu[:3], torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64), atol=1e-10)
    assert torch.allclose((u * s) @ vh, delta, atol=1e-10)


def test_negative_scale_is_folded_into_u():
    gen = _gen(20)
    b, a = torch.randn(30, 5, generator=gen), torch.randn(5, 25, generator=gen)
    u_pos, s_pos, vh_pos = factorized_svd(b, a, scale=1.5)
    u_neg, s_neg, vh_neg = factorized_svd(b, a, scale=-1.5)
    assert torch.equal(s_pos, s_neg) and torch.equal(vh_pos, vh_neg)
    assert torch.equal(u_neg, -u_pos)


# ------------------------------------------------------------------ noise floors

def test_gavish_donoho_omega_at_known_aspect_ratios():
    assert gavish_donoho_omega(1.0) == pytest.approx(0.56 - 0.95 + 1.82 + 1.43)   # 2.86
    assert gavish_donoho_omega(0.5) == pytest.approx(0.07 - 0.2375 + 0.91 + 1.43)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(InputError, match="beta must be in"):
            gavish_donoho_omega(bad)


@pytest.mark.parametrize("d_out, d_in", [(300, 300), (400, 150)])
def test_gd_rank_recovers_the_rank_of_low_rank_plus_white_noise(d_out, d_in):
    """X = U diag(s) Vᵀ of rank 5 plus Z with iid N(0, 1/d_out) entries: Z's singular values
    fill a bulk up to 1 + √β (Marchenko–Pastur), and s = 3..7 stands well above it, while
    s = 0.3 (far inside the bulk) is not recoverable: GD keeps exactly the 5 strong ones."""
    gen = _gen(3)
    signal = _with_spectrum([7.0, 6.0, 5.0, 4.0, 3.0, 0.3], d_out, d_in, seed=4)
    noise = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) / math.sqrt(d_out)
    s = torch.linalg.svdvals(signal + noise)
    assert gd_rank(s, shape=(d_out, d_in)) == 5
    assert gd_rank(torch.linalg.svdvals(noise), shape=(d_out, d_in)) == 0   # pure noise


def test_gd_rank_pads_a_factorized_spectrum_and_counts_a_noise_free_rank():
    # a rank-3 update given by its 3 non-zero σ only: the median of all 30 is 0
    assert gd_rank([5.0, 3.0, 1.0], shape=(40, 30)) == 3
    assert gd_rank(torch.zeros(30), shape=(40, 30)) == 0
    with pytest.raises(InputError, match="31 singular values for a 40×30 matrix"):
        gd_rank(torch.ones(31), shape=(40, 30))
    with pytest.raises(InputError, match="shape must be two positive ints"):
        gd_rank([1.0], shape=(0, 3))


@pytest.mark.parametrize("shape, want", [((576, 576), 294), ((1536, 576), 410),
                                         ((576, 1536), 410)])
def test_the_gaussian_energy_rank_matches_the_documented_noise_floor(shape, want):
    """docs/science.md: a Gaussian matrix's k₉₀ is ≈ 294 for 576×576 and ≈ 410 for 1536×576."""
    k = gaussian_energy_rank(shape)
    assert abs(k - want) <= 3
    assert gaussian_energy_rank(shape) == k                       # seeded: the same every time
    assert abs(gaussian_energy_rank(shape, seed=1) - want) <= 3   # and stable across seeds


@pytest.mark.parametrize("shape", [(64, 64), (100, 10), (576, 576), (1536, 576), (300, 700)])
def test_the_marchenko_pastur_rank_equals_a_gaussian_draw(shape):
    """The large-matrix law and a seeded draw of the same shape give the same k₉₀ (to 1)."""
    assert abs(mp_energy_rank(shape) - gaussian_energy_rank(shape)) <= 1
    assert mp_energy_rank(shape) == mp_energy_rank(shape[::-1])


def test_the_marchenko_pastur_rank_at_its_limits():
    assert mp_energy_rank((4096, 4096)) == 2089 and mp_energy_rank((14336, 4096)) == 3058
    assert mp_energy_rank((5, 1)) == 1 and mp_energy_rank((50, 50), tau=1.0) == 50
    with pytest.raises(InputError, match="tau must be in"):
        mp_energy_rank((5, 5), tau=0.0)
    with pytest.raises(InputError, match="shape must be two positive ints"):
        mp_energy_rank((0, 5))


def test_energy_rank_of_the_top_of_a_spectrum():
    """With ‖·‖_F given, the top values reach k_τ when they hold τ of the energy, else None."""
    s = [4.0, 2.0, 1.0, 1.0, 1.0, 1.0]                  # energy 16, 4, 1, 1, 1, 1 of 24
    fro = math.sqrt(24.0)
    for tau in (0.5, 0.8, 0.9, 0.99):
        assert rank_at_energy(s[:4], tau, fro=fro) == (
            rank_at_energy(s, tau) if rank_at_energy(s, tau) <= 4 else None)
    assert rank_at_energy(s[:2], 0.8, fro=fro) == 2 and rank_at_energy(s[:2], 0.9, fro=fro) is None
    assert rank_at_energy(s[:2], 0.9, fro=0.0) == 0
    with pytest.raises(InputError, match="fro must be finite"):
        rank_at_energy(s, 0.9, fro=float("nan"))


def test_spectrum_metrics_of_the_top_of_a_spectrum():
    """Measures the top K values determine are those of the whole spectrum; the others None."""
    s = np.array([4.0, 2.0, 1.0] + [0.1] * 37)                     # 40 values: shape (50, 40)
    whole = spectrum_metrics(s, shape=(50, 40))
    top = spectrum_metrics(s[:5], shape=(50, 40), fro=whole["fro_norm"])
    for key in ("fro_norm", "spectral_norm", "stable_rank", "energy_rank_50", "energy_rank_90"):
        assert top[key] == pytest.approx(whole[key]), key
    assert whole["energy_rank_99"] > 5 and top["energy_rank_99"] is None
    assert top["entropy_rank"] is None and top["numerical_rank"] is None
    # a rank-2 matrix's top 5 reach the tolerance: its numerical rank is known
    low = spectrum_metrics([3.0, 1.0, 0.0, 0.0, 0.0], shape=(50, 40), fro=math.sqrt(10.0))
    assert low["numerical_rank"] == 2 and low["energy_rank_99"] == 2
    # the whole spectrum given with fro is read as the whole spectrum
    assert spectrum_metrics(s, shape=(50, 40), fro=whole["fro_norm"]) == whole
