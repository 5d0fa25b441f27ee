"""Noise floors of the energy rank k₉₀ (docs/science.md, "Nulls and noise floors").

Two floors a measured k₉₀ is read against: a Gaussian matrix of the same shape (pure noise,
``noise_rank_90``, computed once per shape) and the update that two seeds of full fine-tuning
disagree on, ΔW_seed a − ΔW_seed b (``seed_diff_ranks``). The Gavish–Donoho rank
(``spectra.gd_rank``) is the third column beside them in the modules table.
"""
from __future__ import annotations

from functools import lru_cache

from rankscope.linalg.spectra import (dense_svd, gaussian_energy_rank, mp_energy_rank,
                                      rank_at_energy, svd_device)

NOISE_SEED = 0          # the Gaussian matrix of each shape is drawn from this seed
DRAWN_UP_TO = 2048      # a smaller side above this takes the Marchenko–Pastur k₉₀, not a draw


@lru_cache(maxsize=None)
def _noise_rank_90(tall: int, wide: int) -> int:
    if wide > DRAWN_UP_TO:      # a draw's SVD would cost more than the update's own top-k
        return mp_energy_rank((tall, wide), tau=0.9)
    return gaussian_energy_rank((tall, wide), tau=0.9, seed=NOISE_SEED)


def noise_rank_90(shape: tuple[int, int]) -> int:
    """k₉₀ of a seeded standard Gaussian matrix of ``shape`` (≈ 294 for 576×576, ≈ 410 for
    1536×576), cached per shape up to a transpose: one svdvals per distinct shape a process
    sees. Above ``DRAWN_UP_TO`` on the smaller side, the Marchenko–Pastur limit
    (``spectra.mp_energy_rank``; 2089 for 4096², 3058 for 14336 × 4096), which equals the
    draws wherever both were computed."""
    return _noise_rank_90(max(shape), min(shape))


def seed_pair(sets: list) -> tuple | None:
    """The two full runs (``deltas.DeltaSet``) of the lowest distinct seeds, or None with fewer
    than two seeds."""
    full = sorted((s for s in sets if s.method == "full" and s.seed is not None),
                  key=lambda s: s.seed)
    for b in full[1:]:
        if b.seed != full[0].seed:
            return full[0], b
    return None


def seed_diff_ranks(sets: list, *, device: str | None = "auto") -> dict[str, int]:
    """k₉₀ of ΔW_a − ΔW_b per module, a and b the full runs of the two lowest seeds.

    The part of a full update that two seeds disagree on: if a module's own k₉₀ is not below
    it, its energy rank measures seed noise. Both runs are streamed side by side (one module
    of each in memory); a module missing from one of them, or of another shape, is skipped.

    Args:
        sets: the sweep's runs (``deltas.DeltaSet``s from ``deltas.from_runs``); only full
            runs are read.
        device: where the SVDs run ("auto": CUDA when present).

    Returns:
        {module name: k₉₀}, empty when the sweep has fewer than two seeds of full runs.
    """
    pair = seed_pair(sets)
    if pair is None:
        return {}
    dev = svd_device(device)
    out = {}
    for da, db in zip(*pair):
        if da.name != db.name or (da.d_out, da.d_in) != (db.d_out, db.d_in):
            continue
        s = dense_svd(da.materialize() - db.materialize(), compute_uv=False, device=dev)
        out[da.name] = rank_at_energy(s, 0.9)
    return out
