"""Tests of rankscope.linalg.davidson: W0 + L Rᵀ's top singular vectors without its SVD, against
the dense SVD, on real-size random W0 and updates planted from tiny to dominating."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rankscope.errors import InputError
from rankscope.linalg.davidson import top_left_singular
from rankscope.linalg.subspace import intruder_max_cos, random_orthonormal


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _w_with_spectrum(sigmas: torch.Tensor, d_out: int, d_in: int, seed: int):
    """W = X diag(σ) Yᵀ with random orthonormal X (d_out, m), Y (d_in, m)."""
    gen = _gen(seed)
    m = sigmas.shape[0]
    x = random_orthonormal(d_out, m, generator=gen)
    y = random_orthonormal(d_in, m, generator=gen)
    return (x * sigmas) @ y.T, x, y


def _planted_update(d_out, d_in, r, scale, seed):
    """L (d_out, r), R (d_in, r): a rank-r update with singular values scale·(1 … 0.5)."""
    gen = _gen(seed)
    u, v = random_orthonormal(d_out, r, generator=gen), random_orthonormal(d_in, r, generator=gen)
    return u * (scale * torch.linspace(1.0, 0.5, r, dtype=torch.float64)), v


@pytest.mark.parametrize("d_out, d_in", [(576, 576), (192, 576)])
@pytest.mark.parametrize("r, scale", [(1, 0.01), (8, 0.3), (64, 0.5), (1, 2.0), (16, 3.0)])
def test_top_left_singular_equals_the_dense_svd(d_out, d_in, r, scale):
    """Real-size random W0 (clustered top spectrum: the hard case) plus planted updates from
    tiny to dominating (an intruder on top): vectors, values and intruder cosines as a float64
    dense SVD of W0 + L Rᵀ gives them."""
    w0 = torch.randn(d_out, d_in, generator=_gen(d_out + r), dtype=torch.float64)
    u0, s0, vh0 = torch.linalg.svd(w0, full_matrices=False)
    left, right = _planted_update(d_out, d_in, r, scale * float(s0[0]), seed=r)
    u, s, cos = top_left_singular(u0, s0, vh0, left, right, k=10)
    ud, sd, _ = torch.linalg.svd(w0 + left @ right.T, full_matrices=False)
    np.testing.assert_allclose(s.numpy(), sd[:10].numpy(), rtol=1e-12)
    np.testing.assert_allclose((u.T @ ud[:, :10]).abs().diagonal().numpy(), 1.0, atol=1e-10)
    np.testing.assert_allclose(intruder_max_cos(u, u0), intruder_max_cos(ud[:, :10], u0),
                               atol=1e-10)
    np.testing.assert_allclose(cos.abs().max(dim=0).values.numpy(), intruder_max_cos(u, u0),
                               atol=1e-12)
    if scale >= 2.0:  # a planted direction far above W0's spectrum is an intruder
        assert intruder_max_cos(u, u0)[0] < 0.5


def test_top_left_singular_dense_fallback_and_exact_small_cases():
    sig = torch.linspace(10, 1, 30, dtype=torch.float64)
    w0, _, _ = _w_with_spectrum(sig, 30, 40, seed=14)
    u0, s0, vh0 = torch.linalg.svd(w0, full_matrices=False)
    left, right = _planted_update(30, 40, 3, 12.0, seed=15)
    ud, sd, _ = torch.linalg.svd(w0 + left @ right.T, full_matrices=False)
    for max_iter in (0, 40):  # 0: straight to the dense eigenproblem of H
        u, s, _ = top_left_singular(u0, s0, vh0, left, right, k=30, max_iter=max_iter)
        np.testing.assert_allclose(s.numpy(), sd.numpy(), rtol=1e-10)
        np.testing.assert_allclose((u.T @ ud).abs().diagonal().numpy(), 1.0, atol=1e-8)
    zero = top_left_singular(u0, s0, vh0, left * 0, right, k=5)  # ΔW = 0: W0's own vectors
    np.testing.assert_allclose(zero[1].numpy(), sig[:5].numpy(), rtol=1e-12)
    np.testing.assert_allclose(intruder_max_cos(zero[0], u0), 1.0, atol=1e-12)


def test_top_left_singular_refuses_bad_inputs():
    w0 = torch.randn(40, 30, generator=_gen(16), dtype=torch.float64)
    u0, s0, vh0 = torch.linalg.svd(w0, full_matrices=False)  # d_out > d_in: U0 is not square
    with pytest.raises(InputError, match="d_out ≤ d_in"):
        top_left_singular(u0, s0, vh0, torch.zeros(40, 1), torch.zeros(30, 1))
    u0, s0, vh0 = torch.linalg.svd(w0.T, full_matrices=False)
    with pytest.raises(InputError, match="k=31"):
        top_left_singular(u0, s0, vh0, torch.zeros(30, 1), torch.zeros(40, 1), k=31)
