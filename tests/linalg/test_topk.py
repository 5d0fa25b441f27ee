"""Tests of rankscope.linalg.topk: top-k singular values against a dense SVD and scipy's Lanczos
``svds``, on matrices whose spectrum is chosen by construction."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import svds

from rankscope.errors import InputError
from rankscope.linalg.spectra import rank_at_energy
from rankscope.linalg.topk import AUTO_TOPK_ABOVE, AUTO_TOPK_K, SvdChoice, parse_svd, topk_svdvals


def chosen(s: torch.Tensor, d_out: int, d_in: int, *, seed: int = 0) -> torch.Tensor:
    """U diag(s) Vᵀ (d_out, d_in) with random orthonormal U, V and the chosen s (float64)."""
    g = torch.Generator().manual_seed(seed)
    m = s.numel()
    u, _ = torch.linalg.qr(torch.randn(d_out, m, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d_in, m, generator=g, dtype=torch.float64))
    return (u * s) @ v.T


# a fine-tuning-like spectrum (a few strong directions, then a slow power-law tail) and a
# planted rank-12 update under a weak noise floor
SPECTRA = {
    "power_law": torch.arange(1, 301, dtype=torch.float64) ** -0.7,
    "planted": torch.cat([torch.linspace(5.0, 1.0, 12, dtype=torch.float64),
                          torch.full((288,), 0.01, dtype=torch.float64)]),
}


@pytest.mark.parametrize("name", list(SPECTRA))
@pytest.mark.parametrize("shape", [(300, 500), (500, 300)])
def test_the_top_values_are_the_chosen_ones(name, shape):
    s = SPECTRA[name]
    x = chosen(s, *shape)
    top = topk_svdvals(x, 40)
    assert top.shape == (40,) and top.dtype == torch.float64
    torch.testing.assert_close(top, s[:40], rtol=5e-3, atol=0)
    assert (top <= s[:40] * (1 + 1e-12)).all()           # Ritz values never exceed the true σ
    # and they agree with scipy's Lanczos top-k (an independent implementation)
    lanczos = np.sort(svds(x.numpy(), k=40, random_state=0, return_singular_vectors=False))[::-1]
    np.testing.assert_allclose(top.numpy(), lanczos, rtol=5e-3)


@pytest.mark.parametrize("name", list(SPECTRA))
def test_energy_ranks_from_the_top_values_match_the_dense_ones(name):
    x = chosen(SPECTRA[name], 300, 500).float()
    fro = float(torch.linalg.vector_norm(x.double()))
    dense = torch.linalg.svdvals(x)
    top = topk_svdvals(x, 64)
    for tau in (0.5, 0.9, 0.99):
        want = rank_at_energy(dense, tau)
        assert rank_at_energy(top, tau, fro=fro) == (want if want <= 64 else None), tau


def test_seeded_and_deterministic():
    x = chosen(SPECTRA["power_law"][:200], 300, 200).float()
    a, b = topk_svdvals(x, 10, seed=3), topk_svdvals(x, 10, seed=3)
    assert torch.equal(a, b)
    torch.manual_seed(0)
    before = torch.rand(1)
    topk_svdvals(x, 10)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), before)            # the global generator is left alone


def test_k_equal_to_the_smaller_side_gives_every_value():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(topk_svdvals(chosen(s, 4, 9), 4), s, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("x, k, message", [
    (torch.ones(3), 1, "must be 2-D"),
    (torch.ones(4, 6), 0, r"k=0 is outside \[1, 4\]"),
    (torch.ones(4, 6), 5, r"k=5 is outside \[1, 4\]"),
    (torch.full((4, 6), float("nan")), 2, "NaN or Inf"),
])
def test_bad_input(x, k, message):
    with pytest.raises(InputError, match=message):
        topk_svdvals(x, k)


def test_parse_svd_and_its_choice_per_shape():
    assert parse_svd(None) == parse_svd("auto") == SvdChoice("auto")
    assert parse_svd(" TopK:64 ") == SvdChoice("topk", 64) and str(SvdChoice("topk", 64)) == "topk:64"
    exact, auto, top = parse_svd("exact"), parse_svd("auto"), parse_svd("topk:64")
    big, small = (4096, 14336), (AUTO_TOPK_ABOVE, 8192)
    assert exact.topk_for(big) is None
    assert auto.topk_for(small) is None and auto.topk_for(big) == AUTO_TOPK_K
    assert top.topk_for(big) == 64 and top.topk_for((576, 64)) is None   # K ≥ the side: exact
    for bad in ("topk", "topk:0", "topk:-3", "lanczos", "topk:8x"):
        with pytest.raises(InputError, match="--svd: expected exact, auto or topk:K"):
            parse_svd(bad)
