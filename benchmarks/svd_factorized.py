"""Factorized vs dense singular values of a LoRA update ΔW = scale·B·A, side by side.

Run: python benchmarks/svd_factorized.py

For each shape and rank, times ``factorized_svdvals`` (QR of both factors + SVD of an r×r core,
float64 and float32) against ``torch.linalg.svdvals`` of the materialised float32 ΔW
(materialisation included), and reports the median times, the speed-up dense/factorized, and
the largest disagreement between the two spectra relative to σ_max.
"""

from __future__ import annotations

import statistics
import time

import pandas as pd
import torch

from rankscope.linalg.spectra import factorized_svdvals
from rankscope.store.provenance import machine_heading

SHAPES = ((576, 576), (2048, 2048), (4096, 4096), (11008, 4096))
RANKS = (8, 64)
SCALE = 2.0


def _median_seconds(fn, repeats: int) -> tuple[float, torch.Tensor]:
    """Median wall time of fn() over ``repeats`` calls, and fn()'s last result."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _row(d_out: int, d_in: int, r: int, gen: torch.Generator) -> dict:
    b = torch.randn(d_out, r, generator=gen)  # (d_out, r), float32 as LoRA stores it
    a = torch.randn(r, d_in, generator=gen) / d_in**0.5  # (r, d_in)
    factorized_svdvals(b, a, scale=SCALE)  # untimed warm-up
    t64, s64 = _median_seconds(lambda: factorized_svdvals(b, a, scale=SCALE), 7)
    t32, _ = _median_seconds(
        lambda: factorized_svdvals(b, a, scale=SCALE, dtype=torch.float32), 7)
    t_dense, s_dense = _median_seconds(
        lambda: torch.linalg.svdvals(b @ a * SCALE), 3)  # (min(d_out, d_in),)
    err = (s64[:r] - s_dense[:r].double()).abs().max() / s64[0]
    return {
        "d_out": d_out, "d_in": d_in, "r": r,
        "factorized_f64_ms": 1e3 * t64,
        "factorized_f32_ms": 1e3 * t32,
        "dense_f32_ms": 1e3 * t_dense,
        "dense/fact_f64": t_dense / t64,
        "dense/fact_f32": t_dense / t32,
        "max_rel_diff": float(err),
    }


def factorized_vs_dense_table(*, seed: int = 0) -> pd.DataFrame:
    """One row per (shape, r): median times in ms, the speed-ups, and the spectra's agreement.

    Args:
        seed: seeds the random factors.

    Returns:
        DataFrame with columns d_out, d_in, r, factorized_f64_ms, factorized_f32_ms,
        dense_f32_ms, dense/fact_f64, dense/fact_f32, max_rel_diff (max |σ_fact − σ_dense|
        over the top r, divided by σ_max).
    """
    gen = torch.Generator().manual_seed(seed)
    rows = [_row(d_out, d_in, r, gen) for d_out, d_in in SHAPES for r in RANKS]
    return pd.DataFrame(rows)


if __name__ == "__main__":
    print(machine_heading())
    with pd.option_context("display.width", 160, "display.float_format", "{:.3g}".format):
        print(factorized_vs_dense_table().to_string(index=False))
