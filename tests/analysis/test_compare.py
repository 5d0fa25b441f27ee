"""``rankscope.analysis.compare``: each decomposition done once, the fast paths equal to the dense
ones, the tables' bases, an unknown grid layer refused before any SVD and mixed setups (φ's own
cases: ``test_similarity.py``; the verdict: ``test_verdict.py``).

The sweep is built by hand on the SmolLM2 slice's own names and real shapes (q 576×576, k and
v 192×576, down_proj 576×1536): full runs with random dense ΔW on those 8 modules and LoRA runs
r = 1, 4 (two seeds) on q and v, one of them with a planted direction far above W0's spectrum.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from rankscope.analysis import compare as C
from rankscope.analysis.decompose import base_svds, base_weights, decompose_sweep
from rankscope.analysis.deltas import DeltaSet, check_same_setup, from_runs
from rankscope.analysis.relation import intruders
from rankscope.errors import InputError

KINDS = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576),   # full runs: 4 of
         "self_attn.v_proj": (192, 576), "mlp.down_proj": (576, 1536)}       # the 7 kinds
LORA = ("self_attn.q_proj", "self_attn.v_proj")
RANKS, SEEDS = (1, 4), (0, 1)


def _name(layer: int, kind: str) -> str:
    return f"model.layers.{layer}.{kind}"


@pytest.fixture(scope="module")
def sweep(smollm2_slice, make_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare-sweep") / "sweep"
    gen = torch.Generator().manual_seed(0)
    common = dict(model=str(smollm2_slice), model_path=str(smollm2_slice), task="news",
                  data_hash="d", split_hash="s", task_kind="lm", steps=10,
                  eval_before={"loss": 3.0})
    for seed in SEEDS:
        full = {f"{_name(layer, k)}.delta": 1e-3 * torch.randn(*shape, generator=gen)
                for layer in (0, 1) for k, shape in KINDS.items()}
        # seed 0 records the training evidence of issue 9; seed 1 is a run from before it
        evidence = dict(late_step=3, late_gain_share=0.05, full_scope="all", delta_fro={
            n[:-len(".delta")]: float(t.norm()) for n, t in full.items()}) if seed == 0 else {}
        make_run(out / f"full-s{seed}", full, run=f"full-s{seed}", method="full", rank=None,
                 seed=seed, eval_after={"loss": 2.0}, **evidence, **common)
        for r in RANKS:
            t = {}
            for layer in (0, 1):
                for k in LORA:
                    d_out, d_in = KINDS[k]
                    t[f"{_name(layer, k)}.lora_A"] = torch.randn(r, d_in, generator=gen) / 24
                    t[f"{_name(layer, k)}.lora_B"] = 0.05 * torch.randn(d_out, r, generator=gen)
                    t[f"{_name(layer, k)}.scaling"] = torch.tensor(2.0)
                    if seed == 0:   # A₀ saved: A moved by ‖A − A₀‖/‖A₀‖ = 0.5 exactly
                        t[f"{_name(layer, k)}.lora_A0"] = t[f"{_name(layer, k)}.lora_A"] / 1.5
            # a planted intruder: one direction far above layer 1 q_proj's spectrum
            t[f"{_name(1, LORA[0])}.lora_B"][:, 0] *= 400.0
            moved = {"a_moved": {_name(layer, k): 0.5 + 0.1 * layer for layer in (0, 1)
                                 for k in LORA}} if seed == 0 else {}
            make_run(out / f"lora-r{r}-s{seed}", t, run=f"lora-r{r}-s{seed}", method="lora",
                     rank=r, seed=seed, lora_alpha=2.0 * r, alpha_policy="scaled",
                     targets=["q_proj", "v_proj"], eval_after={"loss": 2.5 - 0.1 * r}, **moved,
                     **common)
    return out


@pytest.fixture(scope="module")
def counted(sweep):
    """compare_frames on the sweep, counting every SVD of a matrix with both sides ≥ 100."""
    calls = {"svd": [], "svdvals": []}
    real = {k: getattr(torch.linalg, k) for k in calls}

    def counting(kind):
        def f(x, *a, **kw):
            if min(x.shape[-2:]) >= 100:
                calls[kind].append(tuple(x.shape))
            return real[kind](x, *a, **kw)
        return f

    from rankscope.analysis.floors import _noise_rank_90

    _noise_rank_90.cache_clear()     # so that each shape's Gaussian matrix is counted once
    with pytest.MonkeyPatch.context() as mp:
        for kind in calls:
            mp.setattr(torch.linalg, kind, counting(kind))
        frames = C.compare_frames(sweep)
    return frames, calls


def test_every_decomposition_is_done_once(counted):
    frames, calls = counted
    n_full, analysed, others, w0 = len(SEEDS), 2 * len(LORA), 2 * (len(KINDS) - len(LORA)), 4
    # full runs' q, v (decompose) + W0 once per module + the full runs' W0 + ΔW (intruders);
    # LoRA updates and LoRA's W0 + ΔW take no large SVD at all
    assert len(calls["svd"]) == n_full * analysed + w0 + n_full * analysed
    # the full runs' other modules once; ΔW_s0 − ΔW_s1 of every full module (the seeds' floor);
    # one Gaussian matrix per shape up to a transpose (576², 576×192, 1536×576)
    assert len(calls["svdvals"]) == n_full * others + 2 * len(KINDS) + 3
    assert set(frames) == {"metrics", "examples", "modules", "spectra", "subspace",
                           "subspace_grid", "convergence", "relation", "intruders"}


def test_spectra_tables_equal_the_analysis_of_every_module(sweep, counted):
    from rankscope.analysis.analyze import analyze_deltas
    from rankscope.analysis.tables import METRIC_COLS

    frames, _ = counted
    spectra, modules = analyze_deltas(from_runs(sweep), progress=False)
    pd.testing.assert_frame_equal(frames["spectra"].drop(columns="sigma"),
                                  spectra.drop(columns="sigma"))
    # float32 dense SVD vs svdvals: equal to float32 rounding of each module's largest σ
    scale = spectra.groupby(["run", "name"])["sigma"].transform("max")
    assert ((frames["spectra"]["sigma"] - spectra["sigma"]).abs() <= 1e-5 * scale).all()
    seeddiff = ["energy_rank_90_seeddiff"]                 # compare's alone: it needs the sweep
    pd.testing.assert_frame_equal(frames["modules"].drop(columns=METRIC_COLS + seeddiff),
                                  modules.drop(columns=METRIC_COLS + seeddiff))
    assert modules["energy_rank_90_seeddiff"].isna().all()
    exact = [c for c in METRIC_COLS if c.startswith(("energy", "numerical"))]
    pd.testing.assert_frame_equal(frames["modules"][exact], modules[exact])
    np.testing.assert_allclose(frames["modules"][["fro_norm", "spectral_norm", "stable_rank",
                                                  "entropy_rank"]],
                               modules[["fro_norm", "spectral_norm", "stable_rank",
                                        "entropy_rank"]], rtol=1e-5)


def test_fast_intruders_equal_the_dense_svd_of_w0_plus_delta(sweep, counted):
    frames, _ = counted
    runs = decompose_sweep(sweep)
    weights = base_weights(runs)
    dense = intruders(runs, weights, svds=base_svds(weights), dense=True)
    pd.testing.assert_frame_equal(frames["intruders"], dense)
    planted = dense[(dense["name"] == _name(1, LORA[0])) & (dense["method"] == "lora")
                    & (dense["eps"] == 0.5)]
    assert (planted["count"] >= 1).all()                 # the planted direction is found
    assert frames["intruders"].query("method == 'full'")["count"].eq(0).all()


def test_relation_uses_w0s_singular_values(sweep, counted):
    frames, _ = counted
    rel = frames["relation"]
    runs = decompose_sweep(sweep, names={_name(0, LORA[0])})
    w = base_weights(runs)[_name(0, LORA[0])]
    s = torch.linalg.svdvals(w)
    row = rel[(rel["name"] == _name(0, LORA[0])) & (rel["run"] == "lora-r4-s0")].iloc[0]
    assert row["w_dirs"] == pytest.approx(float(s[:4].square().sum().sqrt()), rel=1e-12)
    assert set(rel["r_dirs"]) == set(RANKS)
    w_fro = float(w.square().sum().sqrt())
    assert row["random_expected"] == pytest.approx(4 * w_fro / 576, rel=1e-12)
    assert rel["amplification_within_noise"].dtype == bool


def test_modules_carry_the_energy_ranks_noise_floors(sweep, counted):
    from rankscope.linalg.spectra import rank_at_energy

    frames, _ = counted
    mods = frames["modules"]
    floor = {(576, 576): 294, (192, 576): 140, (576, 1536): 410}
    for (d_out, d_in), k in floor.items():
        got = mods[(mods["d_out"] == d_out) & (mods["d_in"] == d_in)]["energy_rank_90_noise"]
        assert (got - k).abs().max() <= 3 and got.nunique() == 1
    full, lora = mods[mods["method"] == "full"], mods[mods["method"] == "lora"]
    assert lora["energy_rank_90_seeddiff"].isna().all() and full["energy_rank_90_seeddiff"].notna().all()
    sets = {s.run: {d.name: d.dense for d in s} for s in from_runs(sweep) if s.method == "full"}
    name = _name(1, "mlp.down_proj")
    want = rank_at_energy(torch.linalg.svdvals(sets["full-s0"][name] - sets["full-s1"][name]), 0.9)
    assert set(full.loc[full["name"] == name, "energy_rank_90_seeddiff"]) == {want}
    # random dense ΔW are white noise: Gavish–Donoho keeps none; a rank-r LoRA keeps r
    assert (full["gd_rank"] == 0).all()
    assert (lora["gd_rank"] == lora["rank"]).all()


def test_metrics_carry_the_training_evidence_and_leave_old_runs_empty(counted):
    frames, _ = counted
    m = frames["metrics"].set_index("run")
    assert m.loc["full-s0", "late_gain_share"] == 0.05 and m.loc["full-s0", "full_scope"] == "all"
    assert m.loc["full-s0", "delta_fro_median"] > 0
    assert m.loc["lora-r4-s0", "a_moved_min"] == pytest.approx(0.5)
    assert m.loc["lora-r4-s0", "a_moved_median"] == pytest.approx(0.55)
    old = m.loc[["full-s1", "lora-r1-s1", "lora-r4-s1"]]
    assert old[["late_gain_share", "a_moved_min", "a_moved_median", "delta_fro_median"]] \
        .isna().all().all() and old["full_scope"].isna().all()
    assert m["late_gain_share"].dtype == float


def test_subspace_tables_record_their_basis(counted):
    frames, _ = counted
    sub, grid = frames["subspace"], frames["subspace_grid"]
    # A₀ is saved by seed 0 alone: its pair of ranks has A − A₀, seed 1's and the seeds' not
    basis = sub.groupby(["pair", "seed_1"])["basis"].unique().map(sorted)
    assert dict(basis) == {("full", 0): ["A−A₀", "ΔW"], ("full", 1): ["ΔW"],
                           ("ranks", 0): ["A", "A−A₀", "B"], ("ranks", 1): ["A", "B"],
                           ("seeds", 0): ["A", "B"]}
    ranks = sub[sub["pair"] == "ranks"]
    np.testing.assert_allclose(ranks.loc[ranks["seed_1"] == 0, "a_moved"], 0.5, rtol=1e-6)
    assert ranks.loc[ranks["seed_1"] == 1, "a_moved"].isna().all()    # an old run: unknown
    seeds = sub[(sub["pair"] == "seeds") & (sub["layer"] == 1)]
    np.testing.assert_allclose(seeds["a_moved"], 0.5, rtol=1e-6)   # seed 0's, from its A₀
    assert (sub["null_mean"] < sub["null_q95"]).all() and (sub["null_q95"] < sub["null_q99"]).all()
    top = sub[(sub["i"] == 1) & (sub["side"] == "right")]        # n = d_in = 576: exact Beta
    assert top["null_q99"].mul(576).between(6.5, 6.7).all()
    assert set(grid["pair"]) == {"ranks", "seeds"} and set(grid["layer"]) == {1}
    assert set(zip(grid["side"], grid["source"], grid["basis"])) == {
        ("left", "trained", "B"), ("right", "trained", "A"), ("right", "trained", "A−A₀"),
        ("left", "random", "random"), ("right", "random", "random")}
    for col in ("pair", "side", "source", "rank_1", "rank_2", "seed_1", "seed_2", "i", "j", "phi",
                "null_q95", "null_q99", "a_moved"):
        assert col in grid                               # what plots_extra._grids reads
    assert (grid["null_q95"] < grid["null_q99"]).all()


def test_compare_refuses_an_unknown_grid_layer_before_any_svd(sweep, monkeypatch):
    monkeypatch.setattr(C, "decompose_sweep", lambda *a, **k: pytest.fail("decomposed first"))
    with pytest.raises(InputError, match=r"^grid layer 99 is not in the sweep's analysed "
                                         r"modules \(layers: 0–1\)$"):
        C.compare_frames(sweep, grid_layers=[0, 99])


# ---------------------------------------------------------------------- mixed setups

def test_runs_of_different_training_settings_are_refused():
    meta = dict(model="m", task="news", data_hash="d", split_hash="s", steps=10,
                tokens_per_step=1024, n_eval_examples=8)
    sets = [DeltaSet("full-s0", "full", None, 0, meta),
            DeltaSet("lora-r2-s0", "lora", 2, 0, {**meta, "steps": 20})]
    with pytest.raises(InputError, match=r"^runs full-s0 and lora-r2-s0 differ in steps "
                                         r"\(10 vs 20\): mixed sweeps$"):
        check_same_setup(sets)
    sets[1] = DeltaSet("lora-r2-s0", "lora", 2, 0, {**meta, "tokens_per_step": 4096})
    with pytest.raises(InputError, match="differ in tokens_per_step"):
        check_same_setup(sets)
    sets[1] = DeltaSet("lora-r2-s0", "lora", 2, 0, {**meta, "wall_time_s": 3.0, "seed": 1})
    check_same_setup(sets)                               # run-specific fields may differ


def test_the_example_table_holds_each_run_and_the_base_once():
    from types import SimpleNamespace

    from rankscope.analysis.compare import example_table

    base = {"loss": [3.0, 2.0], "correct": [0.0, 1.0]}
    runs = [SimpleNamespace(run=f"lora-r{r}-s0", method="lora", rank=r, seed=0,
                            manifest={"heldout_before": base,
                                      "heldout_after": {"loss": [r, r], "correct": [1.0, 1.0]}})
            for r in (1, 4)]
    runs.append(SimpleNamespace(run="old", method="lora", rank=8, seed=0, manifest={}))
    t = example_table(runs)
    assert t["run"].tolist() == ["base", "base", "lora-r1-s0", "lora-r1-s0", "lora-r4-s0",
                                 "lora-r4-s0"]
    assert t["loss"].tolist() == [3.0, 2.0, 1, 1, 4, 4] and t["example"].tolist() == [0, 1] * 3
    assert t.loc[t["method"] == "base", "correct"].tolist() == [0.0, 1.0]
    assert example_table(runs[2:]).empty
