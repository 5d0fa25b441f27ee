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
from rankscope.train import lr_search
from rankscope.train.lr_search import EXTEND_MAX, beyond, choose, rate_for, search, search_rank, \
    search_ranks, validation_split
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


def test_past_an_end_of_the_grid_is_one_grid_step_further_at_most_twice():
    grid = (1e-4, 3e-4, 1e-3)
    assert beyond(grid, list(grid), 1e-3) == pytest.approx(1e-3 * 10 / 3)
    assert beyond(grid, list(grid), 1e-4) == pytest.approx(1e-4 * 1 / 3)
    assert beyond(grid, list(grid), 3e-4) is None                 # inside: nothing to extend
    assert beyond((1e-3,), [1e-3], 1e-3) is None                   # one rate has no step
    two_more = [*grid, 1e-3 * 10 / 3, 1e-3 * 100 / 9]
    assert EXTEND_MAX == 2 and beyond(grid, two_more, two_more[-1]) is None


def test_the_search_follows_the_best_rate_past_its_grid_and_flags_it_when_capped(
        tmp_path, monkeypatch):
    # a fake candidate whose validation loss is |log10(lr) − log10(best)|: the search's rule
    # alone decides what is tried (no training), and what it tries is known by construction
    best = {"full": 3e-3, "lora": 1.0}
    tried: list[tuple[str, float]] = []

    def fake_try(cfg, val, rows, *, method, lr, rank, **_):
        tried.append((method, lr))
        loss = abs(math.log10(lr) - math.log10(best[method]))
        rows.append({"method": method, "rank": rank if method == "lora" else None, "lr": lr,
                     "validation": {"loss": loss}, "last_train_loss": loss, "score": loss})

    monkeypatch.setattr(lr_search, "_try", fake_try)
    monkeypatch.setattr(lr_search, "validation_split", lambda task, **_: task)
    cfg = build_sweep(overrides=dict(task="news", lr_search=True, ranks=(4,),
                                     lr_grid_full=(1e-4, 3e-4, 1e-3),
                                     lr_grid_lora=(1e-4, 1e-3)))
    out, rates = search(cfg, _task(32), tmp_path, device=torch.device("cpu"), bf16=False,
                        log=lambda line: None)
    full = [lr for m, lr in tried if m == "full"]        # 3.3e-3 wins, 1.1e-2 is worse: stop
    assert full == pytest.approx([1e-4, 3e-4, 1e-3, 1e-3 * 10 / 3, 1e-3 * 100 / 9])
    assert out.lr_full == pytest.approx(1e-3 * 10 / 3)
    lora = [lr for m, lr in tried if m == "lora"]          # best far above: capped after two
    assert lora == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1]) and out.lr_lora == pytest.approx(0.1)
    assert rates == pytest.approx({4: 0.1})
    record = json.loads((tmp_path / "lr_search.json").read_text())
    assert record["chosen"]["lora"]["at_edge"] is True and record["extend_max"] == EXTEND_MAX
    assert record["chosen"]["full"]["at_edge"] is False


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
    # α = 2r (the default policy): LoRA's rate is searched at the smallest rank too
    assert record["lora_ranks"] == [1, 4] and record["validation_examples"] == 8
    tried = {(r["method"], r["rank"], r["lr"]) for r in record["candidates"]}
    assert {("full", None, 1e-5), ("full", None, 1e-3), ("lora", 1, 1e-4), ("lora", 1, 3e-3),
            ("lora", 4, 1e-4), ("lora", 4, 3e-3)} <= tried
    assert len(tried) <= 3 * (2 + EXTEND_MAX)   # past an end of a 2-rate grid, at most twice
    for key, method, rank, run in (("full", "full", None, "full-s0"),
                                   ("lora", "lora", 4, "lora-r4-s0"),
                                   ("lora r = 1", "lora", 1, "lora-r1-s0")):
        rows = [r for r in record["candidates"] if r["method"] == method and r["rank"] == rank]
        best = min(rows, key=lambda r: -r["validation"]["accuracy"])["score"]
        chosen = record["chosen"][key]["lr"]
        assert [r["score"] for r in rows if r["lr"] == chosen] == [best]
        run_cfg = yaml.safe_load((tmp_path / "out" / run / "config.yaml").read_text())
        assert run_cfg[f"lr_{method}"] == chosen
    assert sum("validation" in line for line in lines) == len(tried)

    again: list[str] = []                                       # resumed: nothing retrained
    run_sweep(cfg, tmp_path / "out", progress=False, log=again.append)
    assert not any("validation" in line for line in again)
    assert json.loads((tmp_path / "out" / "lr_search.json").read_text()) == record


def test_fixed_alpha_searches_one_rank_and_growing_alpha_the_ends_too():
    ranks = (1, 2, 4, 8, 16, 32, 64)
    assert search_ranks(ranks, "fixed") == (8,)                   # Hu et al.: one rate, held
    assert search_ranks(ranks, "scaled") == search_ranks(ranks, "rslora") == (1, 8, 64)
    rates = {1: 1e-2, 8: 3e-3, 64: 1e-4}
    assert [rate_for(r, rates) for r in ranks] == [1e-2, 1e-2, 3e-3, 3e-3, 3e-3, 1e-4, 1e-4]
    assert rate_for(2, {1: 1.0, 4: 2.0}) == 1.0                   # a tie in log r: the smaller
