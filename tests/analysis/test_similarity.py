"""``rankscope.analysis.similarity``: φ in Hu et al.'s A/B basis and in ΔW's, the figure pairs and
grid layers, and the convergence of LoRA updates to the full one, on runs built by hand with
known answers.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rankscope.analysis import similarity as S
from rankscope.analysis.decompose import RunDecomp, decompose
from rankscope.analysis.deltas import ModuleDelta
from rankscope.errors import InputError
from rankscope.linalg.subspace import phi, random_orthonormal


# ------------------------------------------------------------ Hu et al.'s basis for φ

def _orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    return random_orthonormal(n, k, generator=torch.Generator().manual_seed(seed))


def _lora_run(seed: int, b_cols, a_rows, *, name="model.layers.0.self_attn.q_proj", a0=None,
              manifest=None) -> RunDecomp:
    """A LoRA run whose ΔW = B·A is chosen column by column and row by row (A₀: ``a0``)."""
    B, A = torch.stack(b_cols, dim=1), torch.stack(a_rows, dim=0)
    delta = ModuleDelta(name, 0, "q_proj", B.shape[0], A.shape[1], B=B, A=A, scale=1.0, A0=a0)
    r = A.shape[0]
    return RunDecomp(f"lora-r{r}-s{seed}", "lora", r, seed, manifest or {}, {name: decompose(delta)})


def test_the_row_space_training_learned_is_measured_on_a_minus_a0():
    """A = A₀ + L with A₀ = 5·[p_a; p_b] (orthonormal rows, different per seed) and L = c·[q; 0],
    q orthogonal to every p. A's top direction is mostly its initialisation: seeds 0 and 1
    (c = 1, 2) have φ_A(1, 1) = (1·2)²/(26·29); A − A₀ = L has the one direction q in both
    runs: φ = 1, and against a full update whose top row direction is q, 1 too. a_moved =
    ‖L‖/‖A₀‖ = c/(5√2): the pair carries the smaller, 1/(5√2)."""
    n, dout = 40, 12
    basis = _orthonormal(n, 5, 7)               # p0..p3 and q
    p, q = basis[:, :4], basis[:, 4]
    b = _orthonormal(dout, 2, 8)
    runs = []
    for seed, c in ((0, 1.0), (1, 2.0)):
        a0 = 5 * torch.stack([p[:, 2 * seed], p[:, 2 * seed + 1]])
        a = a0 + torch.stack([c * q, torch.zeros(n, dtype=torch.float64)])
        runs.append(_lora_run(seed, [b[:, 0], b[:, 1]], list(a), a0=a0))
    name = "model.layers.0.self_attn.q_proj"
    full = ModuleDelta(name, 0, "q_proj", dout, n, dense=3 * torch.outer(b[:, 0], q) +
                       torch.outer(b[:, 1], p[:, 0]))
    runs.append(RunDecomp("full-s0", "full", None, 0, {}, {name: decompose(full)}))
    assert runs[0].modules[name].a_moved == pytest.approx(1 / (5 * math.sqrt(2)))
    sub = S.subspace_similarity(runs, n_draws=8)
    seeds = sub[sub["pair"] == "seeds"].set_index(["basis", "i"])
    assert set(seeds.index.get_level_values(0)) == {"B", "A", "A−A₀"}
    assert seeds.loc[("A", 1), "phi"] == pytest.approx(4 / (26 * 29))
    assert seeds.loc[("A−A₀", 1), "phi"] == pytest.approx(1.0)
    assert list(seeds.loc["A−A₀"].index) == [1]          # A − A₀ has rank 1: i = 1 only
    np.testing.assert_allclose(seeds["a_moved"], 1 / (5 * math.sqrt(2)))
    against_full = sub[(sub["pair"] == "full") & (sub["basis"] == "A−A₀") & (sub["i"] == 1)]
    assert list(against_full["phi"]) == pytest.approx([1.0, 1.0], abs=1e-6)   # a float32 SVD
    assert list(sub.columns[:12]) == ["pair", "run_1", "run_2", "rank_1", "rank_2", "seed_1",
                                      "seed_2", "layer", "module", "name", "side", "basis"]
    grid = S.subspace_grids(runs[:2], layers=[0], n_draws=20)
    assert set(zip(grid["side"], grid["source"], grid["basis"])) == {
        ("left", "trained", "B"), ("right", "trained", "A"), ("right", "trained", "A−A₀"),
        ("left", "random", "random"), ("right", "random", "random")}
    moved = grid[grid["basis"] == "A−A₀"]
    assert len(moved) == 1 and moved["phi"].iloc[0] == pytest.approx(1.0)
    from scipy.stats import beta
    assert moved["null_q99"].iloc[0] == pytest.approx(beta.ppf(0.99, 0.5, (n - 1) / 2))
    assert (grid["null_q95"] < grid["null_q99"]).all() and grid["a_moved"].notna().all()


def test_a_moved_falls_back_to_the_manifest():
    """Without A₀: the manifest's value of the module, else its median over modules."""
    p, q = _orthonormal(16, 2, 1), _orthonormal(20, 2, 2)
    name = "model.layers.0.self_attn.q_proj"
    one = _lora_run(0, [p[:, 0], p[:, 1]], [q[:, 0], q[:, 1]],
                    manifest={"a_moved": {name: 0.3, "other": 9.0}})
    two = _lora_run(1, [p[:, 0], p[:, 1]], [q[:, 0], q[:, 1]],
                    manifest={"a_moved": {"x": 0.5, "y": 0.7, "z": 2.0}})
    assert S.run_a_moved(one, name) == 0.3 and S.run_a_moved(two, name) == 0.7
    assert S.pair_a_moved(one, two, name) == 0.3
    sub = S.subspace_similarity([one, two], n_draws=4)
    assert (sub["a_moved"] == 0.3).all()


def test_lora_pairs_use_a_and_b_own_singular_vectors():
    """A = diag(4, 1, 2)·Qᵀ and B = P·diag(1, 5, 3.5): ΔW = P diag(4, 5, 7) Qᵀ, so ΔW's top
    direction is (p2, q2), A's is q0 and B's is p1. Seed 1 shares A's top row q0 and B's top
    column p1 but puts its largest product elsewhere: φ(1, 1) is 1 in the bases of A and B and 0
    in ΔW's."""
    p, q = _orthonormal(16, 6, 1), _orthonormal(20, 6, 2)
    a, b = (4.0, 1.0, 2.0), (1.0, 5.0, 3.5)
    one = _lora_run(0, [b[i] * p[:, i] for i in (0, 1, 2)], [a[i] * q[:, i] for i in (0, 1, 2)])
    two = _lora_run(1, [b[0] * p[:, 5], b[1] * p[:, 1], b[2] * p[:, 4]],
                    [a[0] * q[:, 0], a[1] * q[:, 3], a[2] * q[:, 4]])
    d = next(iter(one.modules.values()))
    assert abs(float(S.frame(d, "right", "A")[:, 0] @ q[:, 0])) == pytest.approx(1.0)
    assert abs(float(S.frame(d, "left", "B")[:, 0] @ p[:, 1])) == pytest.approx(1.0)
    assert S.frame(d, "right", "A−A₀") is None                  # no A₀ saved
    assert abs(float(S.frame(d, "right")[:, 0] @ q[:, 2])) == pytest.approx(1.0)
    assert abs(float(S.frame(d, "left")[:, 0] @ p[:, 2])) == pytest.approx(1.0)
    sub = S.subspace_similarity([one, two], n_draws=4)
    top = sub[sub["i"] == 1].set_index("side")
    assert list(top["pair"]) == ["seeds", "seeds"] and set(top["basis"]) == {"A", "B"}
    assert top["a_moved"].isna().all()                          # no A₀, no manifest field
    assert top.loc["right", "phi"] == pytest.approx(1.0) and top.loc["left", "phi"] == pytest.approx(1.0)
    d2 = next(iter(two.modules.values()))
    for side in ("left", "right"):       # the same pair in ΔW's basis shares no top direction
        assert phi(S.frame(d, side), S.frame(d2, side), 1, 1) == pytest.approx(0.0, abs=1e-20)
    grid = S.subspace_grids([one, two], layers=[0])
    g = grid[(grid["source"] == "trained") & (grid["i"] == 1) & (grid["j"] == 1)]
    assert set(g["basis"]) == {"A", "B"} and np.allclose(g["phi"], 1.0)


# ------------------------------------------------------- figure pairs and grid layers

def _stub(method: str, rank, seed, layers=(0, 1)) -> RunDecomp:
    mods = {}
    for layer in layers:
        name = f"model.layers.{layer}.self_attn.q_proj"
        if method == "lora":
            B = torch.randn(8, rank, generator=torch.Generator().manual_seed(layer + 10 * seed))
            A = torch.randn(rank, 8, generator=torch.Generator().manual_seed(layer + 10 * seed + 5))
            delta = ModuleDelta(name, layer, "q_proj", 8, 8, B=B, A=A, scale=1.0)
        else:
            delta = ModuleDelta(name, layer, "q_proj", 8, 8, dense=torch.eye(8))
        mods[name] = decompose(delta)
    run = f"full-s{seed}" if method == "full" else f"lora-r{rank}-s{seed}"
    return RunDecomp(run, method, rank, seed, {}, mods)


def test_grid_pairs_skip_a_rank_the_first_seed_lacks():
    runs = [_stub("lora", 8, 0), _stub("lora", 2, 1), _stub("lora", 8, 1)]   # lora-r2-s0 unfinished
    pairs = {kind: (a.run, b.run) for kind, a, b in S.grid_pairs(runs)}
    assert pairs == {"ranks": ("lora-r2-s1", "lora-r8-s1"), "seeds": ("lora-r8-s0", "lora-r8-s1")}
    runs = [_stub("lora", 8, 0), _stub("lora", 2, 1)]      # no seed has both ranks, one has 8
    assert S.grid_pairs(runs) == []
    grid = S.subspace_grids([_stub("lora", 8, 0), _stub("lora", 2, 1), _stub("lora", 8, 1)])
    assert set(grid["pair"]) == {"ranks", "seeds"}


def test_an_unknown_grid_layer_names_the_layers_there_are():
    runs = [_stub("lora", 2, 0), _stub("lora", 4, 0)]
    with pytest.raises(InputError, match=r"grid layer 99 .*\(layers: 0–1\)"):
        S.subspace_grids(runs, layers=[99])
    assert S._spans([0, 1, 2, 5, 7, 8]) == "0–2, 5, 7–8"


# ------------------------------------------------------------------------- convergence

def test_convergence_of_a_lora_update_to_the_full_one_known_by_construction():
    """ΔW_full = 3·p0 q0ᵀ + 2·p1 q1ᵀ + p2 q2ᵀ; LoRA r = 1 holds its top term, r = 2 its top two.
    So rel_dist² = (4 + 1)/14 and 1/14, φ to full is 1 (the top-r directions agree), the energy
    share of full inside ΔW_r's column space is 9/14 and 13/14, and φ(r = 1, r = 2) at k = 1 is 1."""
    p, q = _orthonormal(12, 3, 3), _orthonormal(10, 3, 4)
    sig = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    name = "model.layers.0.self_attn.q_proj"
    full = ModuleDelta(name, 0, "q_proj", 12, 10, dense=(p * sig) @ q.T)
    runs = [RunDecomp("full-s0", "full", None, 0, {}, {name: decompose(full)})]
    for r in (1, 2):
        lora = ModuleDelta(name, 0, "q_proj", 12, 10, B=p[:, :r] * sig[:r], A=q[:, :r].T, scale=1.0)
        runs.append(RunDecomp(f"lora-r{r}-s0", "lora", r, 0, {}, {name: decompose(lora)}))
    conv = S.convergence_table(runs).set_index("rank")
    assert conv.loc[1, "rel_dist"] == pytest.approx(math.sqrt(5 / 14), rel=1e-6)
    assert conv.loc[2, "rel_dist"] == pytest.approx(math.sqrt(1 / 14), rel=1e-6)
    # the full update's singular vectors come from a float32 SVD: equal to float32 rounding
    assert conv.loc[1, "energy_share"] == pytest.approx(9 / 14, rel=1e-5)
    assert conv.loc[2, "energy_share"] == pytest.approx(13 / 14, rel=1e-5)
    for side in S.SIDES:
        np.testing.assert_allclose(conv[f"phi_full_{side}"], 1.0, atol=1e-5)
        assert conv.loc[1, f"phi_next_{side}"] == pytest.approx(1.0, abs=1e-12)
        assert math.isnan(conv.loc[2, f"phi_next_{side}"])      # no larger rank after r = 2
    np.testing.assert_allclose(conv["full_fro_norm"], math.sqrt(14), rtol=1e-6)


def _convergence_runs(full_dense, loras, name="model.layers.0.self_attn.q_proj"):
    """A full run with ΔW = ``full_dense`` and one LoRA run per {rank: (B, A)} (scale 1), seed 0."""
    d_out, d_in = full_dense.shape
    full = ModuleDelta(name, 0, "q_proj", d_out, d_in, dense=full_dense)
    runs = [RunDecomp("full-s0", "full", None, 0, {}, {name: decompose(full)})]
    for r, (B, A) in loras.items():
        lora = ModuleDelta(name, 0, "q_proj", d_out, d_in, B=B, A=A, scale=1.0)
        runs.append(RunDecomp(f"lora-r{r}-s0", "lora", r, 0, {}, {name: decompose(lora)}))
    return runs


@pytest.mark.parametrize("c", [0.25, 1.0, 3.0, 40.0])
def test_convergence_is_scale_free_where_the_distance_is_not(c):
    """ΔW_r = c·ΔW_full (ΔW_full of rank 2, r = 2): the same directions at any scale, so
    fro_cos = φ to full = energy share = 1 for every c, while rel_dist = |c − 1| (above 1 from
    c = 2: it reads the step size, not the directions)."""
    p, q = _orthonormal(12, 2, 3), _orthonormal(10, 2, 4)
    sig = torch.tensor([3.0, 2.0], dtype=torch.float64)
    runs = _convergence_runs((p * sig) @ q.T, {2: (c * p * sig, q.T)})
    row = S.convergence_table(runs, n_draws=20).iloc[0]
    assert row["fro_cos"] == pytest.approx(1.0, abs=1e-6)   # ΔW_full's SVD is float32
    assert row["energy_share"] == pytest.approx(1.0, abs=1e-6)
    for side in S.SIDES:
        assert row[f"phi_full_{side}"] == pytest.approx(1.0, abs=1e-6)
    assert row["rel_dist"] == pytest.approx(abs(c - 1), abs=1e-6)


def test_an_orthogonal_update_shares_nothing_with_the_full_one():
    """ΔW_r's columns and rows orthogonal to ΔW_full's: fro_cos = 0, φ to full = 0, and none of
    ΔW_full's energy in ΔW_r's column space; its nulls stay positive."""
    p, q = _orthonormal(12, 4, 5), _orthonormal(10, 4, 6)
    runs = _convergence_runs(2 * p[:, :2] @ q[:, :2].T, {2: (p[:, 2:], q[:, 2:].T)})
    row = S.convergence_table(runs, n_draws=20).iloc[0]
    assert row["fro_cos"] == pytest.approx(0.0, abs=1e-12)
    assert row["energy_share"] == pytest.approx(0.0, abs=1e-12)
    for side in S.SIDES:
        assert row[f"phi_full_{side}"] == pytest.approx(0.0, abs=1e-12)
    assert row["fro_cos_null_q99"] > 0 and row["energy_share_null_q99"] > 0


def test_convergence_nulls_are_the_exact_laws_of_their_sizes():
    """d_out = 12, d_in = 10. fro_cos: |cos| with a random direction of R^120, cos² ~
    Beta(1/2, 119/2). φ(1, 1) in R^n: Beta(1/2, (n − 1)/2), n = 12 (left) and 10 (right); φ(2, 2):
    the module's seeded Haar draws (``_null``). energy_share_null = r/d_out. Its 99% quantile:
    for ΔW_full with d_out equal singular values (a partial isometry) every random r-dim
    subspace holds exactly r/d_out of the energy; for a rank-1 ΔW_full the share is
    Beta(r/2, (d_out − r)/2)."""
    from scipy.stats import beta

    p, q = _orthonormal(12, 12, 7), _orthonormal(10, 3, 8)
    loras = {r: (p[:, :r], q[:, :r].T) for r in (1, 2)}
    conv = S.convergence_table(_convergence_runs(3 * p[:, :1] @ q[:, :1].T, loras),
                               n_draws=4000).set_index("rank")
    np.testing.assert_allclose(conv["fro_cos_null_q99"], math.sqrt(beta.ppf(0.99, 0.5, 119 / 2)))
    for side, n in (("left", 12), ("right", 10)):
        assert conv.loc[1, f"phi_full_{side}_null_q99"] == pytest.approx(beta.ppf(0.99, 0.5, (n - 1) / 2))
        assert conv.loc[1, f"phi_full_{side}_null_q95"] == pytest.approx(beta.ppf(0.95, 0.5, (n - 1) / 2))
        assert conv.loc[1, f"phi_next_{side}_null_q99"] == conv.loc[1, f"phi_full_{side}_null_q99"]
        assert (conv.loc[2, f"phi_full_{side}_null_q95"], conv.loc[2, f"phi_full_{side}_null_q99"]) \
            == S._null(n, 2, 2, {}, 4000)
    np.testing.assert_allclose(conv["energy_share_null"], [1 / 12, 2 / 12])
    for r in (1, 2):   # rank-1 ΔW_full: exact Beta, estimated from 4000 draws
        assert conv.loc[r, "energy_share_null_q99"] == pytest.approx(
            beta.ppf(0.99, r / 2, (12 - r) / 2), rel=0.1)
    flat = S.convergence_table(_convergence_runs(p @ _orthonormal(14, 12, 9).T, {
        r: (p[:, :r], _orthonormal(14, r, 10).T) for r in (1, 3)}), n_draws=50).set_index("rank")
    np.testing.assert_allclose(flat["energy_share_null_q99"], [1 / 12, 3 / 12], rtol=1e-5)
    np.testing.assert_allclose(flat["energy_share"], [1 / 12, 3 / 12], rtol=1e-5)


@pytest.mark.parametrize("aligned", [True, False])
def test_the_convergence_figure_checks_read_each_row_against_its_own_null(aligned):
    """ΔW_full = p diag(3, 2, 1) qᵀ in R^{40×30}; LoRA r = 1, 2, 3 hold its top r terms five
    times larger (rel_dist > 1 at every r: the old criterion failed), or directions orthogonal
    to all of it. Aligned: φ = 1, the energy share 9/14, 13/14, 1 and fro_cos its root beat
    their nulls, and the share's excess over r/40 grows from r = 1 to 3: every check holds.
    Orthogonal: fro_cos, φ and the share are 0: no check holds."""
    from pathlib import Path

    import pandas as pd

    from rankscope.outputs.experiments import load_experiment
    from rankscope.outputs.figure_data import convergence
    from rankscope.outputs.in_shape import evaluate

    p, q = _orthonormal(40, 6, 11), _orthonormal(30, 6, 12)
    sig = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    off = 0 if aligned else 3
    loras = {r: (5 * p[:, off:off + r] * sig[:r], q[:, off:off + r].T) for r in (1, 2, 3)}
    runs = _convergence_runs((p[:, :3] * sig) @ q[:, :3].T, loras)
    conv = S.convergence_table(runs, n_draws=50)
    assert (conv["rel_dist"] > 1).all()
    if aligned:
        np.testing.assert_allclose(conv["fro_cos"] ** 2, [9 / 14, 13 / 14, 1], rtol=1e-6)
    metrics = pd.DataFrame([{"run": r.run, "method": r.method, "rank": r.rank, "seed": 0,
                             "before_loss": 3.0, "after_loss": 2.0} for r in runs])
    df = convergence({"sweep": {"convergence": conv, "metrics": metrics}}, side="right")
    cos = df[df["panel"] == "Frobenius cosine with the full update"]
    assert cos["null_q99"].notna().all() and "excess" in df
    exp = load_experiment(Path(__file__).parents[2] / "experiments/paper/convergence.yaml")
    checks = evaluate(df, list(exp.in_shape))
    assert [c["status"] for c in checks] == ["yes" if aligned else "no"] * 4
