"""Held-out evaluation, and the base evaluation a sweep caches for its runs and validation."""
from __future__ import annotations

import json

import pytest
import torch

from rankscope.store.runs import RunId
from rankscope.train.data import prepare
from rankscope.train.device import Dist
from rankscope.train.evaluation import BASE_EVAL, base_evaluation, evaluate
from rankscope.train.model_setup import build_model
from rankscope.train.sweep import load_checked_model


@pytest.mark.slow
def test_eval_before_is_where_every_run_starts(minilm_slice, tmp_path, tiny_cfg):
    """The sweep's base evaluation is each run's own starting point (same head, ΔW = 0)."""
    cfg = tiny_cfg(minilm_slice, task="sentiment", targets=("query", "value"), ranks=(2,))
    task = prepare(cfg)
    dist = Dist()
    torch.rand(5)
    base = base_evaluation(load_checked_model(cfg, task, world=1), task, tmp_path,
                           device=dist.device, bf16=False)
    for run in (RunId("full", None, 0), RunId("lora", 2, 0)):
        torch.rand(5)
        model = build_model(cfg, task, run)
        got = evaluate(model, task.eval, kind="cls", device=dist.device, bf16=False)
        assert got == pytest.approx(base, rel=1e-6), run.name


class _Counting(torch.nn.Module):
    """A stand-in model that counts its forward passes and returns fixed logits."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, input_ids, attention_mask):
        self.calls += 1
        logits = torch.zeros(*input_ids.shape, 8)
        logits[..., 3] = 1.0
        return type("Out", (), {"logits": logits})()


def test_the_base_evaluation_is_cached_per_split(tmp_path, stand_in_task):
    ids = torch.full((4, 6), 3)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    task = stand_in_task("lm")
    task.eval, task.split_hash = data, "split-a"
    model = _Counting()
    first = base_evaluation(model, task, tmp_path, device=torch.device("cpu"), bf16=False)
    cached = json.loads((tmp_path / BASE_EVAL).read_text())
    assert model.calls == 1 and cached == {"split_hash": "split-a", "metrics": first,
                                           "examples": {"loss": [first["loss"]] * 4}}
    examples: dict = {}
    assert base_evaluation(model, task, tmp_path, device=torch.device("cpu"), bf16=False,
                           examples=examples) == first
    assert model.calls == 1 and examples == cached["examples"]     # read, not recomputed
    del cached["examples"]                                          # a cache from before examples
    (tmp_path / BASE_EVAL).write_text(json.dumps(cached))
    base_evaluation(model, task, tmp_path, device=torch.device("cpu"), bf16=False)
    assert model.calls == 2 and "examples" in json.loads((tmp_path / BASE_EVAL).read_text())
    task.split_hash = "split-b"                                     # another split: recomputed
    base_evaluation(model, task, tmp_path, device=torch.device("cpu"), bf16=False, write=False)
    assert model.calls == 3
    assert json.loads((tmp_path / BASE_EVAL).read_text())["split_hash"] == "split-a"


def test_per_example_numbers_average_to_the_metrics():
    """Each held-out row's own loss and hit, in the split's order: their (token-weighted) mean
    is the summary metric, so paired comparisons read the same numbers."""
    torch.manual_seed(0)
    logits = torch.randn(5, 3)

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": logits[input_ids[:, 0]]})()

    data = {"input_ids": torch.arange(5)[:, None].repeat(1, 4),
            "attention_mask": torch.ones(5, 4, dtype=torch.long),
            "labels": torch.tensor([0, 1, 2, 0, 1])}
    examples: dict = {}
    got = evaluate(Fixed(), data, kind="cls", device=torch.device("cpu"), bf16=False,
                   batch_size=2, examples=examples)
    want = torch.nn.functional.cross_entropy(logits, data["labels"], reduction="none")
    assert examples["loss"] == pytest.approx(want.tolist(), rel=1e-6)
    assert examples["correct"] == (logits.argmax(-1) == data["labels"]).float().tolist()
    assert got["loss"] == pytest.approx(float(want.mean()), rel=1e-6)
    assert got["accuracy"] == pytest.approx(sum(examples["correct"]) / 5)
