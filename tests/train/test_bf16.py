"""Training under bf16 autocast, explicitly on, wherever the suite runs.

Every other training test pins ``bf16=False`` to compare numbers at float32 tolerances; these
check what bf16 autocast does guarantee: the sweep trains (full and LoRA, causal LM and
classification), the training loss falls, and the same run twice on one machine gives
bit-identical updates. The models are random 2-block ones of hidden size 32 on a 256-token
vocabulary (conftest), so a step costs milliseconds even where torch's bf16 matmul is the
reference loop of a CPU without native bf16 (~100× slower than float32 there).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rankscope.train.config import build_sweep
from rankscope.train.sweep import run_sweep

# The same 4 examples every step (max_train_examples = batch_size), a constant rate and no
# warm-up: the training loss of a random model must fall from the first step.
OVERFIT = dict(ranks=(2,), steps=5, batch_size=4, max_len=16, max_eval_examples=8,
               max_train_examples=4, lr_full=3e-3, lr_lora=2e-2, warmup=0.0,
               schedule="constant", targets=("all-linear",), checkpoint_every=2)
# bf16 keeps 8 significant bits (relative rounding 2⁻⁸ ≈ 4e-3 per product): a loss averaged
# over many tokens agrees with float32's to well within 1e-2.
BF16_RTOL = 1e-2


def _sweep(model: Path, task: str, out: Path, *, bf16: bool, **changes) -> list[dict]:
    values = {**OVERFIT, **changes}
    cfg = build_sweep(overrides=dict(model=str(model), task=task, bf16=bf16, **values))
    return run_sweep(cfg, out, progress=False, log=lambda line: None)


def _train_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


@pytest.fixture(scope="module", params=["news", "sentiment"])
def bf16_sweeps(request, tiny_llama, tiny_bert, tmp_path_factory):
    """The task's sweep trained twice under bf16 autocast, and one float32 LoRA step."""
    task = request.param
    model = tiny_llama if task == "news" else tiny_bert
    root = tmp_path_factory.mktemp(f"bf16-{task}")
    runs = {name: _sweep(model, task, root / name, bf16=True) for name in ("one", "two")}
    runs["fp32"] = _sweep(model, task, root / "fp32", bf16=False, methods=("lora",), steps=1)
    return root, runs


def test_bf16_sweeps_train_and_record_bf16(bf16_sweeps):
    _, runs = bf16_sweeps
    assert [m["run"] for m in runs["one"]] == ["full-s0", "lora-r2-s0"]
    for m in runs["one"]:
        assert m["bf16_autocast"] is True and m["eval_after"] != m["eval_before"]
    assert all(m["bf16_autocast"] is False for m in runs["fp32"])


def test_the_training_loss_falls_under_bf16(bf16_sweeps):
    root, _ = bf16_sweeps
    for run in ("full-s0", "lora-r2-s0"):
        losses = _train_losses(root / "one" / run)
        assert len(losses) == OVERFIT["steps"]
        assert losses[-1] < 0.98 * losses[0], (run, losses)


def test_the_same_bf16_run_twice_gives_bit_identical_updates(bf16_sweeps):
    root, runs = bf16_sweeps
    for run in ("full-s0", "lora-r2-s0"):
        one, two = (load_file(root / d / run / "updates.safetensors") for d in ("one", "two"))
        assert sorted(one) == sorted(two)
        for k in one:
            assert torch.equal(one[k], two[k]), (run, k)
        assert _train_losses(root / "one" / run) == _train_losses(root / "two" / run)
    assert [m["eval_after"] for m in runs["one"]] == [m["eval_after"] for m in runs["two"]]


def test_bf16_evaluates_the_base_model_as_float32_does_within_its_precision(bf16_sweeps):
    _, runs = bf16_sweeps
    bf16, fp32 = runs["one"][0]["eval_before"], runs["fp32"][0]["eval_before"]
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=BF16_RTOL)
    assert bf16["loss"] != fp32["loss"]                  # autocast was really on
