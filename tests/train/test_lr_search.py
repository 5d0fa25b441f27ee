"""The learning-rate search: a validation split carved from the training split only, the rule's
choice, its record in ``lr_search.json``, and a search that resumes."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from rankscope.errors import InputError
from rankscope.train.config import build_sweep
from rankscope.train.data import TaskData
from rankscope.train.lr_search import choose, search_rank, validation_split
from rankscope.train.planted import DistillSplit
from rankscope.train.sweep import run_sweep


def _task(n_train: int, *, distill: bool = False) -> TaskData:
    ids = torch.arange(n_train * 3).view(n_train, 3)
    train = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    held = {"input_ids": -torch.ones(5, 3, dtype=torch.long),
            "attention_mask": torch.ones(5, 3, dtype=torch.long)}
    if distill:
        teacher = object()
        train, held = DistillSplit(train, teacher), DistillSplit(held, teacher)
    return TaskData(kind="distill" if distill else "lm", train=train, eval=held, num_labels=None,
                    label_names=None, data_hash="d", split_hash="s", n_train_examples=n_train,
                    n_eval_examples=5, n_train_tokens=3 * n_train)


@pytest.mark.parametrize("distill", [False, True])
def test_the_validation_split_divides_the_training_split_and_never_sees_the_held_out_one(distill):
    task = _task(100, distill=distill)
    val = validation_split(task, fraction=0.1, seed=1)
    rows = lambda side: {tuple(r.tolist()) for r in side["input_ids"]}     # noqa: E731
    assert len(rows(val.eval)) == 10 and len(rows(val.train)) == 90
    assert rows(val.train) | rows(val.eval) == rows(task.train)
    assert not rows(val.train) & rows(val.eval)
    assert all(min(r) >= 0 for r in rows(val.eval))                   # no held-out row (-1)
    assert (val.n_train_examples, val.n_eval_examples) == (90, 10)
    if distill:
        assert val.train.teacher is task.train.teacher and val.eval.teacher is task.train.teacher
    again = validation_split(task, fraction=0.1, seed=1)
    assert torch.equal(again.eval["input_ids"], val.eval["input_ids"])   # seeded


def test_the_validation_split_is_at_least_8_and_at_most_the_cap():
    assert validation_split(_task(40), fraction=0.1, seed=0).n_eval_examples == 8
    assert validation_split(_task(1000), fraction=0.1, seed=0, cap=32).n_eval_examples == 32
    with pytest.raises(InputError, match="at least 16 training examples, the split has 12"):
        validation_split(_task(12), fraction=0.1, seed=0)


def test_the_search_rank_is_the_middle_of_the_sweeps_ranks():
    assert search_rank((16, 1, 4, 2, 8)) == 4
    assert search_rank((1, 2, 4, 8)) == 4 and search_rank((8,)) == 8


def _rows(scores: dict[float, float]) -> list[dict]:
    return [{"method": "full", "lr": lr, "score": s, "validation": {"loss": s}}
            for lr, s in scores.items()]


def test_the_choice_is_the_lowest_finite_score_and_says_when_it_sits_at_the_grids_edge():
    grid = (1e-4, 3e-4, 1e-3)
    assert choose(_rows({1e-4: 2.0, 3e-4: 1.5, 1e-3: 1.7}), grid) == {
        "lr": 3e-4, "at_edge": False, "validation": {"loss": 1.5}}
    assert choose(_rows({1e-4: 2.0, 3e-4: 1.5, 1e-3: math.inf}), grid)["lr"] == 3e-4
    assert choose(_rows({1e-4: 1.0, 3e-4: 1.5, 1e-3: 1.7}), grid)["at_edge"] is True
    with pytest.raises(InputError, match="every candidate diverged"):
        choose(_rows({1e-4: math.inf, 3e-4: math.inf}), grid)


@pytest.mark.slow
def test_a_sweep_with_the_search_trains_at_the_chosen_rates_and_resumes_it(minilm_slice,
                                                                           tmp_path):
    cfg = build_sweep(overrides=dict(
        model=str(minilm_slice), task="sentiment", ranks=(1, 4), targets=("query", "value"),
        steps=3, batch_size=4, max_len=32, max_eval_examples=8, max_train_examples=64,
        bf16=False, lr_search=True, lr_grid_full=(1e-5, 1e-3), lr_grid_lora=(1e-4, 3e-3)))
    lines: list[str] = []
    run_sweep(cfg, tmp_path / "out", progress=False, log=lines.append)
    record = json.loads((tmp_path / "out" / "lr_search.json").read_text())
    assert record["lora_rank"] == 4 and record["validation_examples"] == 8
    assert {(r["method"], r["lr"]) for r in record["candidates"]} == {
        ("full", 1e-5), ("full", 1e-3), ("lora", 1e-4), ("lora", 3e-3)}
    for method in ("full", "lora"):
        rows = [r for r in record["candidates"] if r["method"] == method]
        best = min(rows, key=lambda r: -r["validation"]["accuracy"])["score"]
        chosen = record["chosen"][method]["lr"]
        assert [r["score"] for r in rows if r["lr"] == chosen] == [best]
        assert record["chosen"][method]["at_edge"] is True       # a 2-rate grid has only edges
        run = "full-s0" if method == "full" else "lora-r1-s0"
        run_cfg = yaml.safe_load((tmp_path / "out" / run / "config.yaml").read_text())
        assert run_cfg[f"lr_{method}"] == chosen
    assert sum("validation" in line for line in lines) == 4

    again: list[str] = []                                       # resumed: nothing retrained
    run_sweep(cfg, tmp_path / "out", progress=False, log=again.append)
    assert not any("validation" in line for line in again)
    assert json.loads((tmp_path / "out" / "lr_search.json").read_text()) == record
