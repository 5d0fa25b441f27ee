"""How updates relate to the pretrained weight W_0: ‖UᵀWV‖_F against its exact random baseline,
and amplification (Hu et al. 2021 §7.3, Table 7), and intruder dimensions of W_0 + ΔW
(Shuttleworth et al. 2024, Def. 3.1).

Each table function takes the decomposed runs (``decompose.decompose_sweep``), W_0 per module
(``decompose.base_weights``) and W_0's SVDs (``decompose.base_svds``), and returns one tidy
DataFrame. Definitions: docs/science.md.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from rankscope.analysis.tables import ID_INTS, nullable_ints
from rankscope.linalg.davidson import top_left_singular
from rankscope.linalg.subspace import (INTRUDER_EPS, amplification, count_intruders, counts_below,
                                       projection_norms, random_projection_draws)


def relation_to_w(runs: list, weights: dict[str, torch.Tensor], *,
                  svds: dict[str, tuple], n_draws: int = 200) -> pd.DataFrame:
    """Hu et al. §7.3: ‖UᵀWV‖_F for ΔW's top-r and W's own directions, against random ones.

    LoRA runs use their own r; full runs every LoRA rank of the sweep (or 1, 4, 16, 64). The
    random baseline is exact, ``random_expected`` = r‖W‖_F/√(d_out·d_in) (the root of
    E‖UᵀWV‖_F² over Haar U, V); ``random_q99`` is the 99% quantile of ‖UᵀWV‖_F over
    ``n_draws`` seeded Haar draws (once per module and r), and ``amplification_within_noise``
    is True when ΔW's own ‖UᵀWV‖_F is not above it: its amplification ‖ΔW‖_F/‖UᵀWV‖_F is then
    that of a random direction (at r = 1 it often is).

    Args:
        runs: the decomposed runs (``decompose.RunDecomp``).
        weights: W_0 (d_out, d_in) per module name; modules without one are skipped.
        svds: W_0's thin SVD (U, S, Vh) per module name (``decompose.base_svds``).
        n_draws: Haar draws for the 99% quantile.

    Returns:
        One row per run, module and r: ``ID_COLS``, ``r_dirs, delta_fro, delta_dirs, w_dirs,
        random_expected, w_fro, random_q99, amplification, amplification_within_noise``.
    """
    ranks = sorted({r.rank for r in runs if r.method == "lora"}) or [1, 4, 16, 64]
    q99 = {}   # (module name, r) → the 99% quantile of the random ‖UᵀWV‖_F
    rows = []
    for r in runs:
        for name, d in r.modules.items():
            if name not in weights:
                continue
            for k in ([r.rank] if r.method == "lora" else ranks):
                k = min(k, d.S.numel())
                s_w = svds[name][1]
                p = projection_norms(weights[name], d.U[:, :k], d.Vh[:k], s_w=s_w)
                if (name, k) not in q99:
                    gen = torch.Generator().manual_seed(k)   # the same draws for every module
                    draws = random_projection_draws(s_w, k, shape=tuple(weights[name].shape),
                                                    n_draws=n_draws, generator=gen)
                    q99[(name, k)] = float(np.quantile(draws, 0.99))
                rows.append({"run": r.run, "method": r.method, "rank": r.rank, "seed": r.seed,
                             "layer": d.layer, "module": d.module, "name": name, "r_dirs": k,
                             "delta_fro": d.fro, **p, "random_q99": q99[(name, k)],
                             "amplification": amplification(d.fro, p["delta_dirs"]),
                             "amplification_within_noise": p["delta_dirs"] <= q99[(name, k)]})
    return nullable_ints(pd.DataFrame(rows), ID_INTS)


def intruders(runs: list, weights: dict[str, torch.Tensor], *, svds: dict[str, tuple],
              k: int = 10, eps_values: tuple[float, ...] = INTRUDER_EPS,
              dense: bool = False) -> pd.DataFrame:
    """Intruder-dimension counts (Shuttleworth et al. Def. 3.1) of W_0 + ΔW, per run and module.

    W_0's left singular vectors come from ``svds``. W_0 + ΔW's top-k left singular vectors: for
    LoRA (d_out ≤ d_in) from W_0's SVD and ΔW's factorized one (``davidson.top_left_singular``:
    no SVD of W_0 + ΔW); else, or with ``dense``, ``subspace.count_intruders`` on a dense
    float32 SVD of W_0 + ΔW.

    Args:
        runs: the decomposed runs (``decompose.RunDecomp``).
        weights: W_0 (d_out, d_in) per module name; modules without one are skipped.
        svds: W_0's thin SVD (U, S, Vh) per module name (``decompose.base_svds``).
        k: top vectors of W_0 + ΔW to test (at most min(d_out, d_in)).
        eps_values: the thresholds ε.
        dense: the dense SVD of W_0 + ΔW for every update (the reference of the fast path).
    """
    rows = []
    for r in runs:
        for name, d in r.modules.items():
            if name not in weights:
                continue
            kk = min(k, d.d_out, d.d_in)
            u0, s0, vh0 = svds[name]
            if d.delta.factored and d.d_out <= d.d_in and not dense:
                cos = top_left_singular(u0, s0, vh0, d.U * d.S, d.Vh.T, k=kk)[2]  # (d_out, kk)
                counts = counts_below(cos.abs().max(dim=0).values.numpy(), eps_values)
            else:
                counts = count_intruders(weights[name], weights[name] + d.dense(), k=kk,
                                         eps_values=eps_values, dtype=torch.float32, U0=u0)
            rows.extend({"run": r.run, "method": r.method, "rank": r.rank, "seed": r.seed,
                         "layer": d.layer, "module": d.module, "name": name, "k": kk,
                         "eps": e, "count": c} for e, c in counts.items())
    return nullable_ints(pd.DataFrame(rows), ID_INTS)
