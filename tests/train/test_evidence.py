"""A run's training evidence: the held-out curve, the late share of the gain, how far LoRA's A
moved and ‖ΔW‖_F, on values known by construction; then as a sweep writes them (the 80%
evaluation, A₀ as peft drew it, ``full_scope: linear``)."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from rankscope.store.runs import RunId
from rankscope.train.config import build_sweep
from rankscope.train.evidence import (
    a_moved,
    delta_fro,
    eval_history,
    late_gain_share,
    late_step,
    late_train_rise,
)
from rankscope.train.model_setup import build_model, load_task_model
from rankscope.train.models import find_linear_modules
from rankscope.train.sweep import run_sweep
from rankscope.train.updates import lora_a

# ---------------------------------------------------------------- the held-out curve


@pytest.mark.parametrize("steps, late", [(1, 1), (2, 2), (4, 3), (5, 4), (10, 8), (24, 19),
                                         (30, 24), (1000, 800)])
def test_the_late_evaluation_is_at_the_step_nearest_80_percent(steps, late):
    assert late_step(steps) == late                   # 0.8·24 = 19.2 → 19, 0.8·4 = 3.2 → 3


@pytest.mark.parametrize("steps, schedule, late", [(200, "cosine", 103), (400, "cosine", 206),
                                                   (100, "linear", 58), (4, "cosine", 2)])
def test_the_late_evaluation_splits_off_the_last_fifth_of_the_learning_rate_mass(
        steps, schedule, late):
    # the same split from the multipliers the optimizer applies, summed by a second route
    from rankscope.train.loop import lr_lambda

    mult = [lr_lambda(i, total=steps, warmup=0.1, schedule=schedule) for i in range(steps)]
    mass = [sum(mult[:s]) for s in range(steps + 1)]
    assert late_step(steps, warmup=0.1, schedule=schedule) == late
    assert abs(mass[late] - 0.8 * mass[-1]) <= min(abs(mass[s] - 0.8 * mass[-1])
                                                   for s in range(1, steps + 1))
    # a cosine schedule's last fifth of *steps* applies ~1% of its rate: useless as a gate
    if schedule == "cosine" and steps >= 200:
        assert 1 - mass[round(0.8 * steps)] / mass[-1] < 0.02


def test_the_history_starts_at_the_base_model_and_keeps_every_evaluation_in_step_order():
    rows = [{"step": 1, "kind": "train", "loss": 9.0, "lr": 0.1},
            {"step": 8, "kind": "eval", "loss": 1.5, "perplexity": 4.5},
            {"step": 5, "kind": "eval", "loss": 1.8, "perplexity": 6.0},
            {"step": 10, "kind": "eval", "loss": 1.4, "perplexity": 4.1}]
    assert eval_history({"loss": 2.0, "perplexity": 7.4}, rows) == [
        {"step": 0, "loss": 2.0, "perplexity": 7.4}, {"step": 5, "loss": 1.8, "perplexity": 6.0},
        {"step": 8, "loss": 1.5, "perplexity": 4.5}, {"step": 10, "loss": 1.4, "perplexity": 4.1}]


def _history(m0, m80, m_end, *, key="loss", steps=10):
    return [{"step": 0, key: m0}, {"step": late_step(steps), key: m80}, {"step": steps, key: m_end}]


@pytest.mark.parametrize("m0, m80, m_end, share", [
    (2.0, 1.2, 1.0, 0.2),           # loss: 1.0 gained, 0.2 of it in the last fifth
    (2.0, 1.0, 1.0, 0.0),           # plateaued
    (2.0, 0.9, 1.0, -0.1),          # the last fifth lost some of the gain
    (2.0, 2.0, 1.0, 1.0),           # all of it late: far from converged
])
def test_the_late_share_of_a_loss_gain(m0, m80, m_end, share):
    assert late_gain_share(_history(m0, m80, m_end), late=late_step(10), steps=10) \
        == pytest.approx(share)


def test_the_late_share_of_an_accuracy_gain_is_taken_upwards():
    hist = _history(0.5, 0.8, 0.9, key="accuracy")
    for h in hist:
        h["loss"] = 1.0                                   # accuracy wins when both are there
    assert late_gain_share(hist, late=late_step(10), steps=10) == pytest.approx(0.25)


@pytest.mark.parametrize("hist", [
    _history(1.0, 1.2, 1.0),                                  # no gain
    _history(1.0, 0.9, 1.3),                                  # worse at the end
    _history(2.0, 1.2, 1.0)[::2],                             # no evaluation at 80%
])
def test_no_gain_or_a_missing_evaluation_is_null(hist):
    assert late_gain_share(hist, late=late_step(10), steps=10) is None


# ---------------------------------------------------------------- A moved, ‖ΔW‖_F

def test_a_moved_is_the_relative_frobenius_distance_from_a0():
    a0 = torch.zeros(2, 6)
    a0[0, 0], a0[1, 1] = 3.0, 4.0                                  # ‖A₀‖_F = 5
    a = a0.clone()
    a[0, 2] = 1.5                                                  # ‖A − A₀‖_F = 1.5
    ups = {"m.lora_A": a, "m.lora_A0": a0, "m.lora_B": torch.zeros(3, 2),
           "m.scaling": torch.tensor(2.0), "n.lora_A": a0, "n.lora_A0": a0}
    assert a_moved(ups) == {"m": pytest.approx(0.3), "n": 0.0}


def test_delta_fro_of_full_deltas_and_of_lora_factors(chosen_factors):
    b, a = chosen_factors([9.0, 4.0, 1.0], 12, 7)                  # B @ A: σ = 9, 4, 1
    ups = {"q.lora_A": a.float(), "q.lora_B": b.float(), "q.scaling": torch.tensor(0.5),
           "q.lora_A0": a.float() * 3, "k.delta": torch.diag(torch.tensor([3.0, 4.0]))}
    got = delta_fro(ups)
    assert set(got) == {"q", "k"}
    assert got["k"] == pytest.approx(5.0)
    assert got["q"] == pytest.approx(0.5 * math.sqrt(81 + 16 + 1), rel=1e-6)


# ---------------------------------------------------------------- as a sweep writes them

@pytest.mark.slow
def test_the_manifest_carries_the_training_evidence(news_sweep):
    cfg = news_sweep.cfg            # 4 cosine steps: 80% of the rate's mass is spent by step 2
    for run in (news_sweep.full, news_sweep.lora):
        m = json.loads((run / "manifest.json").read_text())
        df = pd.read_json(run / "metrics.jsonl", lines=True)
        evals = df[df["kind"] == "eval"]
        assert evals["step"].tolist() == [2, 4] and m["late_step"] == 2
        assert [h["step"] for h in m["eval_history"]] == [0, 2, 4]
        assert m["eval_history"][0] == {"step": 0, **m["eval_before"]}
        assert m["eval_history"][-1] == {"step": 4, **m["eval_after"]}
        assert m["eval_history"][1]["loss"] == pytest.approx(float(evals["loss"].iloc[0]))
        assert m["late_step"] == late_step(cfg.steps, warmup=cfg.warmup, schedule=cfg.schedule)
        assert m["late_gain_share"] == late_gain_share(m["eval_history"], late=m["late_step"],
                                                       steps=cfg.steps)
        assert m["full_scope"] == "all"
        ups = load_file(run / "updates.safetensors")
        assert m["delta_fro"] == pytest.approx(delta_fro(ups))
        assert len(m["delta_fro"]) == m["n_modules"] and min(m["delta_fro"].values()) > 0
    full = json.loads((news_sweep.full / "manifest.json").read_text())
    lora = json.loads((news_sweep.lora / "manifest.json").read_text())
    assert full["a_moved"] is None
    assert sorted(lora["a_moved"]) == sorted(lora["delta_fro"])
    assert all(0 < v < 1 for v in lora["a_moved"].values())         # 4 steps: A barely moved


@pytest.mark.slow
def test_lora_a0_is_peft_s_initial_a(news_sweep, stand_in_task):
    """A₀ is drawn again from the run's seed, as peft drew it: the resume test
    (test_sweep.py) checks that a run killed and resumed saves the same one."""
    ups = load_file(news_sweep.lora / "updates.safetensors")
    torch.rand(7)                                                  # any history before it
    fresh = lora_a(build_model(news_sweep.cfg, stand_in_task("lm"), RunId("lora", 2, 0)))
    assert sorted(fresh) == sorted(k.removesuffix(".lora_A0") for k in ups if k.endswith("A0"))
    for name, a in fresh.items():
        assert torch.equal(ups[f"{name}.lora_A0"], a)
        assert not torch.equal(ups[f"{name}.lora_A"], a)            # A trained


@pytest.mark.slow
def test_full_scope_linear_leaves_every_non_linear_pretrained_parameter_bit_identical(
        minilm_slice, tmp_path):
    cfg = build_sweep(overrides=dict(model=str(minilm_slice), task="sentiment", methods=("full",),
                                     targets=("query", "value"),
                                     full_scope="linear", steps=3, batch_size=4, max_len=32,
                                     max_eval_examples=8, max_train_examples=32, bf16=False,
                                     lr_full=1e-3))
    (m,) = run_sweep(cfg, tmp_path / "out", progress=False, log=lambda s: None)
    assert m["full_scope"] == "linear"
    base = load_task_model(cfg, kind="cls", num_labels=2)        # the seeded head it started at
    others = load_file(tmp_path / "out" / "full-s0" / "others.safetensors")
    pretrained = [n for n in others if not n.startswith("classifier.")]
    assert len(pretrained) > 20                     # embeddings, LayerNorms, every bias
    for n in pretrained:
        assert torch.equal(others[n], base.get_parameter(n)), n
    for n in ("classifier.weight", "classifier.bias"):            # the new head trained
        assert not torch.equal(others[n], base.get_parameter(n)), n
    deltas = load_file(tmp_path / "out" / "full-s0" / "updates.safetensors")
    assert len(deltas) == len(find_linear_modules(base)) - 1     # the backbone's, not the head
    assert all(float(d.abs().max()) > 0 for d in deltas.values())
    assert m["trainable_params"] == sum(d.numel() for d in deltas.values()) + 2 * 384 + 2


@pytest.mark.slow
def test_full_scope_targets_trains_the_lora_targets_weights_and_nothing_else(minilm_slice,
                                                                             tmp_path):
    cfg = build_sweep(overrides=dict(model=str(minilm_slice), task="sentiment", methods=("full",),
                                     targets=("query", "value"), full_scope="targets", steps=3,
                                     batch_size=4, max_len=32, max_eval_examples=8,
                                     max_train_examples=32, bf16=False, lr_full=1e-3))
    (m,) = run_sweep(cfg, tmp_path / "out", progress=False, log=lambda s: None)
    assert m["full_scope"] == "targets"
    deltas = load_file(tmp_path / "out" / "full-s0" / "updates.safetensors")
    moved = sorted(k for k, d in deltas.items() if float(d.abs().max()) > 0)
    assert moved == [f"bert.encoder.layer.{i}.attention.self.{t}.delta" for i in (0, 1)
                     for t in ("query", "value")]
    assert m["trainable_params"] == 4 * 384 * 384 + 2 * 384 + 2       # 2 blocks × (Wq, Wv) + head


def test_late_train_rise_compares_the_last_fifth_with_the_one_before():
    rows = [{"step": s, "kind": "train", "loss": 1.0 if s <= 80 else 1.5} for s in range(1, 101)]
    rows.append({"step": 100, "kind": "eval", "loss": 9.0})          # evaluations are not read
    assert late_train_rise(rows, steps=100) == pytest.approx(0.5)
    flat = [{"step": s, "kind": "train", "loss": 2.0} for s in range(1, 101)]
    assert late_train_rise(flat, steps=100) == pytest.approx(0.0)
    assert late_train_rise(flat[:5], steps=5) is None                  # too few steps
    assert late_train_rise([], steps=100) is None
