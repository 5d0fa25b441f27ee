"""Top-k singular values of a big matrix, and the choice between them and a dense SVD.

A dense SVD of a 4096 × 14336 update costs O(m²n): minutes on a CPU. The energy ranks only
need the largest singular values and the exact ‖ΔW‖_F: k_τ is the first k whose top-k values
hold a share τ of ‖ΔW‖_F², so top-K values reach every k_τ ≤ K, and a k_τ above K is known
to be "> K". Pure functions of tensors.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from rankscope.errors import InputError
from rankscope.linalg.spectra import check_finite

# ``auto`` decomposes a matrix whose smaller side is above this with top-k values. Measured
# in benchmarks/svd_topk.py (1 thread): top-256 is slower than dense svdvals at 1024, 1.7×
# faster at 2048 (dense 5.8 s) and 4–23× faster from 3072 on.
AUTO_TOPK_ABOVE = 2048
AUTO_TOPK_K = 256            # values kept by ``auto`` above that size
POWER_ITERATIONS = 6         # subspace iterations (Halko et al. 2011, Alg. 4.4)
OVERSAMPLE = 32              # extra columns of the sketch beyond K


@dataclass(frozen=True)
class SvdChoice:
    """Which SVD ``rankscope analyze`` takes: ``exact``, ``topk:K``, or ``auto`` (exact when
    the smaller side is at most ``AUTO_TOPK_ABOVE``, else top-``AUTO_TOPK_K``)."""

    mode: str                  # "exact" | "topk" | "auto"
    k: int | None = None       # K for "topk"

    def topk_for(self, shape: tuple[int, int]) -> int | None:
        """K for a matrix of ``shape``, or None for the dense SVD (also when K ≥ min(shape))."""
        m = min(shape)
        if self.mode == "exact" or (self.mode == "auto" and m <= AUTO_TOPK_ABOVE):
            return None
        k = self.k if self.mode == "topk" else AUTO_TOPK_K
        return None if k >= m else k

    def __str__(self) -> str:
        return f"topk:{self.k}" if self.mode == "topk" else self.mode


def parse_svd(text: str | None) -> SvdChoice:
    """``exact``, ``auto`` (or None) or ``topk:K`` with K ≥ 1, as an SvdChoice.

    Raises:
        InputError: anything else.
    """
    text = (text or "auto").strip().lower()
    if text in ("exact", "auto"):
        return SvdChoice(text)
    hit = re.fullmatch(r"topk:(\d+)", text)
    if not hit or int(hit.group(1)) < 1:
        raise InputError(f"--svd: expected exact, auto or topk:K with K >= 1, got {text!r}")
    return SvdChoice("topk", int(hit.group(1)))


def topk_svdvals(x: Tensor, k: int, *, seed: int = 0, niter: int = POWER_ITERATIONS,
                 device: str | torch.device | None = None) -> Tensor:
    """The k largest singular values of x by a randomized range finder with power iterations.

    ``torch.svd_lowrank`` (Halko, Martinsson & Tropp 2011) with q = k + ``OVERSAMPLE``
    columns and ``niter`` subspace iterations, its Gaussian sketch drawn from ``seed``. The
    values are those of QᵀX for an orthonormal Q (d_out, q), so each is at most the true σ_i.
    With ``niter`` = 6 and k = 256 the values agree with a dense SVD to 1e-4 relative on a
    low-rank-plus-noise update and to 1.5e-2 at worst on a flat σ ∝ 1/√i spectrum, and the
    energy ranks they reach are the dense ones (benchmarks/svd_topk.py, tests/linalg/test_topk.py).

    Args:
        x: (d_out, d_in), float32 or float64 (lower precisions are upcast to float32).
        k: 1 ≤ k ≤ min(d_out, d_in).
        seed: the sketch's seed (the same seed gives the same values on one machine).
        niter: subspace iterations, ≥ 0.
        device: where to run (None: where x is); the values come back on the CPU.

    Returns:
        (k,) descending, in x's dtype.

    Raises:
        InputError: a non-2-D x, NaN/Inf, k outside [1, min(shape)], or niter < 0.
    """
    if x.ndim != 2:
        raise InputError(f"matrix must be 2-D, got shape {tuple(x.shape)}")
    m = min(x.shape)
    if not 1 <= k <= m:
        raise InputError(f"top-k: k={k} is outside [1, {m}] for a {x.shape[0]}×{x.shape[1]} matrix")
    if niter < 0:
        raise InputError(f"niter must be >= 0, got {niter}")
    check_finite(x, what="matrix")
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    x = x.to(device or x.device)
    if x.shape[0] < x.shape[1]:
        x = x.T                          # tall: the sketch has the smaller side's length
    q = min(k + OVERSAMPLE, m)
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        _, s, _ = torch.svd_lowrank(x, q=q, niter=niter)
    return s[:k].cpu()
