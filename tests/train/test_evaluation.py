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
    assert model.calls == 1 and json.loads((tmp_path / BASE_EVAL).read_text()) == {
        "split_hash": "split-a", "metrics": first}
    assert base_evaluation(model, task, tmp_path, device=torch.device("cpu"), bf16=False) == first
    assert model.calls == 1                                         # read, not recomputed
    task.split_hash = "split-b"                                     # another split: recomputed
    base_evaluation(model, task, tmp_path, device=torch.device("cpu"), bf16=False, write=False)
    assert model.calls == 2
    assert json.loads((tmp_path / BASE_EVAL).read_text())["split_hash"] == "split-a"
