"""``rankscope recommend``'s engine: planted ranks come back, budgets are spent by the
spectra, the exported config loads in peft and trains, and ``--validate`` retrains side by side.
The verb itself, and its one-line errors, are tested in tests/cli/test_cli_recommend.py.

The planted sweep (tests/study_fixtures.py) is built by hand on the SmolLM2 slice's own module
names and shapes, known by construction, so the expected ranks are exact.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from study_fixtures import LOSS, SHAPES, expected, name, planted, planted_results  # noqa: F401

from rankscope.recommend import evidence as core
from rankscope.errors import InputError
from rankscope.pipeline.stages import recommend_stage as recommend
from rankscope.recommend.stage import (lora_config, recommend_frames,
                                 uniform_rank)


# --------------------------------------------------------------------------- pure pieces

@pytest.mark.parametrize("text, value", [("1.5M", 1_500_000), ("200k", 200_000),
                                         ("1500000", 1_500_000), ("2e6", 2_000_000),
                                         ("1_000", 1000), (4096, 4096), ("0.5G", 500_000_000)])
def test_budgets_are_read_in_every_usual_form(text, value):
    assert core.parse_budget(text) == value


@pytest.mark.parametrize("text", ["lots", "1.5X", "", "-3", "0", "nan", "M"])
def test_a_bad_budget_is_an_input_error(text):
    with pytest.raises(InputError, match="budget"):
        core.parse_budget(text)


def test_pow2_ceil():
    assert [core.pow2_ceil(x) for x in (0, 1, 1.2, 2, 3, 4, 5, 101, 128)] == \
        [1, 1, 2, 2, 4, 4, 8, 128, 128]


def test_allocation_spends_the_budget_on_the_planted_directions():
    shapes = {"q": (576, 576), "v": (192, 576)}
    sig = {"q": np.r_[1.0, 0.8, np.full(50, 1e-3)], "v": np.r_[np.linspace(1, 0.7, 8), np.full(50, 1e-3)]}
    exact = 2 * 1152 + 8 * 768
    assert core.allocate(sig, shapes, exact) == {"q": 2, "v": 8}
    for budget in (768, 1152, 5000, exact - 1, 10 * exact):
        ranks = core.allocate(sig, shapes, budget)
        assert sum(r * sum(shapes[n]) for n, r in ranks.items()) <= budget
        assert all(0 <= r <= len(sig[n]) for n, r in ranks.items())
    assert core.allocate(sig, shapes, 768) == {"q": 0, "v": 1}      # only the cheaper fits
    with pytest.raises(InputError, match="smaller than one rank-1 adapter"):
        core.allocate(sig, shapes, 767)


def _metrics(losses: dict, *, full=None, std=0.0):
    rows = [{"run": f"lora-r{r}", "method": "lora", "rank": r, "seed": s, "before_loss": 3.0,
             "after_loss": v + (std if s else -std)} for r, v in losses.items() for s in (0, 1)]
    if full is not None:
        rows.append({"run": "full", "method": "full", "rank": None, "seed": 0, "before_loss": 3.0,
                     "after_loss": full})
    return pd.DataFrame(rows)


def test_the_knee_is_the_first_rank_on_the_plateau():
    assert core.knee(_metrics(LOSS))["rank"] == 8
    assert core.knee(_metrics(LOSS))["at_edge"] is False
    rising = core.knee(_metrics({1: 2.9, 2: 2.6, 4: 2.0}))
    assert rising["rank"] == 4 and rising["at_edge"] is True
    # seeds' spread of ±0.2 puts r = 2 within noise of the best
    assert core.knee(_metrics({1: 2.6, 2: 2.3, 4: 2.1, 8: 2.0}, std=0.2))["rank"] == 2
    assert core.knee(_metrics({1: 3.1, 2: 3.2}))["rank"] is None        # no gain at all
    assert core.knee(_metrics({2: 2.5}))["at_edge"] is True             # one rank: no plateau seen


def test_the_truncation_rank_is_unreached_when_only_the_full_rank_keeps_the_gain():
    summary = pd.DataFrame({"run": ["full-s0", "full-s1"], "method": "full", "rank": None,
                            "seed": [0, 1], "share": 0.9, "k": [4, 16]})
    curve = pd.DataFrame({"run": ["full-s0", "full-s1"], "k": [576, 576], "is_full_rank": True})
    assert core.truncation_rank(summary, curve) == {"rank": 16, "reached": True}   # median 10 → 16
    summary.loc[1, "k"] = 576
    assert core.truncation_rank(summary, curve) == {"rank": None, "reached": False}
    assert core.truncation_rank(None)["rank"] is None
    worse = curve.assign(metric="loss", eval_loss=[2.1, 1.9], before_loss=2.0)   # s0 got worse
    summary.loc[1, "k"] = 16
    assert core.truncation_rank(summary, worse) == {"rank": None, "reached": None, "no_gain": True}


def test_shared_directions_count_beyond_chance():
    shapes = pd.DataFrame({"name": ["a"], "d_out": [100], "d_in": [100]})
    conv = pd.DataFrame({"name": "a", "rank": [2, 4, 8], "phi_next_left": [1.0, 0.5, 0.25]})
    out = core.phi_evidence(conv, shapes)
    assert out["shared_dims"].iloc[0] == pytest.approx(2.0, abs=0.05)
    assert out["phi_rank"].iloc[0] == 2
    chance = pd.DataFrame({"name": "a", "rank": [2, 4], "phi_next_left": [0.02, 0.04]})
    assert core.phi_evidence(chance, shapes)["phi_rank"].isna().all()


def test_confidence_follows_agreement():
    assert core.combine({"energy": 2, "phi": 2, "knee": 8, "truncation": 8}, max_rank=64)[:2] == (2, "high")
    # φ is the structural rank where it exists (the planted control: energy over-counts)
    assert core.combine({"energy": 128, "phi": 1, "knee": 8, "truncation": 4}, max_rank=64)[:2] == (1, "medium")
    assert core.combine({"energy": 4, "knee": 8, "truncation": 8}, max_rank=64)[:2] == (4, "high")
    assert core.combine({"energy": 128, "phi": 16, "knee": 1}, max_rank=64)[:2] == (1, "low")
    assert core.combine({"energy": 16, "phi": 16, "knee": 8}, max_rank=64)[:2] == (8, "high")
    assert core.combine({"energy": 64, "phi": 16, "knee": 8}, max_rank=64)[:2] == (8, "medium")
    r, conf, why = core.combine({"energy": 2, "phi": 2, "knee": 8, "knee_at_edge": True}, max_rank=64)
    assert (r, conf) == (2, "medium") and "still rising" in why
    assert core.combine({"knee": 4}, max_rank=64)[:2] == (4, "low")
    assert core.combine({"energy": 512, "knee": 1024}, max_rank=192)[0] == 192
    with pytest.raises(InputError, match="no evidence"):
        core.combine({"name": "x"}, max_rank=8)


@pytest.mark.parametrize("policy, alpha", [("scaled", 2.0), ("fixed", 16.0), ("rslora", 8.0)])
def test_the_config_is_a_peft_lora_config(policy, alpha):
    from peft import LoraConfig

    ranks = {name(0, "q_proj"): 8, name(1, "q_proj"): 8, name(0, "v_proj"): 2, name(1, "v_proj"): 0}
    kinds = {n: n.rsplit(".", 1)[1] for n in ranks}
    cfg = lora_config(ranks, kinds, alpha_policy=policy, alpha=alpha)
    assert cfg["r"] == 8 and cfg["rank_pattern"] == {name(0, "v_proj"): 2}
    assert cfg["target_modules"] == ["q_proj", name(0, "v_proj")]    # v of layer 1 has rank 0
    assert cfg["lora_alpha"] == (16 if policy == "scaled" else alpha)
    assert cfg["alpha_pattern"] == ({name(0, "v_proj"): 4} if policy == "scaled" else {})
    assert cfg.get("use_rslora", False) == (policy == "rslora")
    LoraConfig(**json.loads(json.dumps(cfg)))


# ---------------------------------------------------------------- the planted sweep

def test_recommend_returns_the_planted_ranks(planted_results):
    out, rec = planted_results
    got = dict(zip(rec.table["name"], rec.table["r"]))
    assert got == expected()
    assert (rec.table["confidence"] == "high").all(), rec.table["reason"].tolist()
    assert (rec.table["r_knee"] == 8).all()
    assert rec.table["r_phi"].tolist() == rec.table["r"].tolist()
    table = pd.read_csv(out / "recommendation.csv")
    assert list(table.columns[:3]) == ["layer", "module", "name"]
    assert dict(zip(table["name"], table["r"])) == expected()
    assert "r = min(energy rank" in (out / "rationale.md").read_text()


def test_a_budget_of_the_planted_size_allocates_the_planted_ranks(planted_results):
    out, _ = planted_results
    from rankscope.store.results import load_tables

    frames = load_tables(out)
    size = sum(r * sum(SHAPES[n.rsplit(".", 1)[1]]) for n, r in expected().items())
    rec = recommend_frames(frames, budget=size)
    assert dict(zip(rec.table["name"], rec.table["r"])) == expected()
    assert rec.table["params"].sum() == size
    small = recommend_frames(frames, budget=size // 4)
    assert small.table["params"].sum() <= size // 4
    assert (small.table["r"] <= rec.table["r"]).all()


def test_the_exported_config_loads_in_peft_and_trains(planted_results, smollm2_slice):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    out, _ = planted_results
    with open(out / "lora_config.json") as f:
        config = LoraConfig(**json.load(f))
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(smollm2_slice), config)
    ranks = {n: m.r["default"] for n, m in model.base_model.model.named_modules()
             if isinstance(m, LoraLayer)}
    assert ranks == expected()
    for n, m in model.base_model.model.named_modules():
        if isinstance(m, LoraLayer):      # α/r = 2 for every module under the scaled policy
            assert m.scaling["default"] == pytest.approx(2.0)
    b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(p, b[n]) for n, p in model.named_parameters() if "lora_B" in n)


# ---------------------------------------------------------------------------- --validate

def test_the_validation_states_both_parameter_counts():
    from rankscope.recommend.text import size_note, validation_text

    val = pd.DataFrame({"config": ["recommended", "uniform"], "ranks": ["r = 4; 2 modules at "
                        "other ranks (2–8)", "r = 4"], "seed": 0,
                        "trainable_params": [15_360, 15_360], "after_loss": [2.0, 2.1]})
    assert size_note(val) == ("The uniform config (r = 4 on every module) has exactly the "
                              "recommendation's 15,360 trainable parameters.")
    val["trainable_params"] = [13_440, 15_360]
    text = validation_text(val)
    assert ("No uniform integer rank has exactly the recommendation's 13,440 trainable "
            "parameters: the nearest, r = 4 on every module, has 15,360 (+1,920, +14.3%).") in text
    assert size_note(val[val["config"] == "uniform"]) is None


def test_the_uniform_rank_is_the_nearest_in_size():
    table = pd.DataFrame({"d_out": [576, 192], "d_in": [576, 576]})      # 1,920 a rank
    assert uniform_rank(table, 13_440) == 7          # 7 × 1,920 = 13,440 exactly
    assert uniform_rank(table, 14_300) == 7          # 13,440 is nearer than 15,360
    assert uniform_rank(table, 14_500) == 8
    assert uniform_rank(table, 100) == 1             # never below rank 1


@pytest.mark.slow
def test_validate_retrains_the_recommendation_beside_a_uniform_rank(news_sweep, tmp_path):
    out = tmp_path / "res"
    rec = recommend(news_sweep.out, out, budget=20_000, validate=True, progress=False,
                    log=lambda s: None)
    val = pd.read_csv(out / "validate.csv")
    assert list(val["config"]) == ["recommended", "uniform"]
    assert set(val["seed"]) == set(news_sweep.cfg.seeds)
    assert (val["steps"] == news_sweep.cfg.steps).all()
    lora_params = rec.table["params"].sum()
    assert val["trainable_params"].iloc[0] == lora_params
    # the uniform rank is the one whose size is nearest the recommendation's
    per_rank = int((rec.table["d_out"] + rec.table["d_in"]).sum())
    assert abs(val["trainable_params"].iloc[1] - lora_params) <= per_rank / 2
    assert np.isfinite(val["after_loss"]).all() and (val["before_loss"] == val["before_loss"].iloc[0]).all()
    text = (out / "rationale.md").read_text()
    assert "## Validation" in text
    rec_n, uni_n = (int(n) for n in val["trainable_params"])
    assert (f"the recommendation's {rec_n:,} trainable parameters" in text
            and (rec_n == uni_n or f"has {uni_n:,}" in text))
    assert (out / "validate" / "recommended-s0" / "adapter_config.json").exists()
    assert math.isfinite(val["final_train_loss"].iloc[0])


@pytest.mark.slow
def test_validation_training_reproduces_the_sweeps_own_lora_run(news_sweep, tmp_path):
    from rankscope.recommend.inputs import check_runs
    from rankscope.recommend.validate import validate

    cfg = news_sweep.cfg
    config = lora_config({t: 2 for t in cfg.targets}, {t: t for t in cfg.targets},
                              alpha_policy=cfg.alpha_policy, alpha=cfg.alpha)
    val = validate(news_sweep.out, {"r2": config}, sets=check_runs(news_sweep.out), out=tmp_path,
                   progress=False, log=lambda s: None)
    manifest = json.loads((news_sweep.lora / "manifest.json").read_text())
    assert val["trainable_params"].iloc[0] == manifest["trainable_params"]
    assert val["after_loss"].iloc[0] == pytest.approx(manifest["eval_after"]["loss"], rel=1e-5)
    train = [json.loads(x) for x in (news_sweep.lora / "metrics.jsonl").read_text().splitlines()]
    last = [m["loss"] for m in train if m["kind"] == "train"][-1]
    assert val["final_train_loss"].iloc[0] == pytest.approx(last, rel=1e-5)
