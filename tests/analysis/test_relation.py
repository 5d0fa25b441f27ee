"""``rankscope.analysis.relation.relation_to_w``: Table 7's exact random baseline and the flag
that says when an amplification is that of a random direction, on updates built by hand."""
from __future__ import annotations

import math

import pytest
import torch

from rankscope.analysis.decompose import RunDecomp, decompose
from rankscope.analysis.deltas import ModuleDelta
from rankscope.analysis.relation import relation_to_w
from rankscope.linalg.spectra import dense_svd
from rankscope.linalg.subspace import random_orthonormal

NAME = "model.layers.0.self_attn.q_proj"


def _w_and_runs():
    """W = P diag(σ) Qᵀ (60×50, σ = 50..1) and two rank-1 LoRA runs: ΔW = 3·p_0 q_0ᵀ along W's
    top direction (‖UᵀWV‖_F = σ_1 = 50, far above chance) and ΔW = 3·p_49 q_49ᵀ along its
    weakest (‖UᵀWV‖_F = σ_50 = 1, below the random baseline ‖W‖_F/√3000 ≈ 3.7)."""
    gen = torch.Generator().manual_seed(0)
    p, q = random_orthonormal(60, 50, generator=gen), random_orthonormal(50, 50, generator=gen)
    sig = torch.arange(50, 0, -1, dtype=torch.float64)
    w = (p * sig) @ q.T
    runs = []
    for seed, col in ((0, 0), (1, 49)):
        delta = ModuleDelta(NAME, 0, "q_proj", 60, 50, B=3 * p[:, col:col + 1],
                            A=q[:, col:col + 1].T, scale=1.0)
        runs.append(RunDecomp(f"lora-r1-s{seed}", "lora", 1, seed, {}, {NAME: decompose(delta)}))
    return w, sig, runs


def test_the_random_baseline_is_exact_and_the_noise_flag_follows_its_quantile():
    w, sig, runs = _w_and_runs()
    rel = relation_to_w(runs, {NAME: w}, svds={NAME: dense_svd(w, dtype=torch.float64)},
                        n_draws=400).set_index("run")
    w_fro = float(sig.square().sum().sqrt())
    assert rel["random_expected"].tolist() == pytest.approx([w_fro / math.sqrt(3000)] * 2)
    assert rel.loc["lora-r1-s0", "delta_dirs"] == pytest.approx(50.0)
    assert rel.loc["lora-r1-s1", "delta_dirs"] == pytest.approx(1.0)
    # the 99% quantile of a random direction's ‖UᵀWV‖_F lies above its root mean square
    assert (rel["random_q99"] > rel["random_expected"]).all() and (rel["random_q99"] < 50).all()
    assert rel["amplification_within_noise"].tolist() == [False, True]
    assert rel["amplification"].tolist() == pytest.approx([3 / 50, 3.0])
    assert "random_dirs" not in rel
    cols = list(rel.reset_index().columns)
    assert cols[:8] == ["run", "method", "rank", "seed", "layer", "module", "name", "r_dirs"]
