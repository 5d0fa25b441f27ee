"""Fixtures of the training tests: a sweep config sized for tests, stand-in task data."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_cfg():
    """``make(model, **changes) -> SweepConfig``: news, rank 4, 4 steps of 4 × 32 tokens.

    bf16 is pinned off: these tests compare numbers at float32 tolerances.
    """
    from rankscope.train.config import build_sweep

    def make(model, **changes):
        base = dict(model=str(model), task="news", ranks=(4,), steps=4, batch_size=4, max_len=32,
                    max_eval_examples=8, max_train_examples=32, bf16=False)
        return build_sweep(overrides={**base, **changes})

    return make


@pytest.fixture(scope="session")
def stand_in_task():
    """``make(kind, num_labels=None, train=None)``: what build_model and the loop read of a
    TaskData, without preparing a corpus."""
    def make(kind, num_labels=None, train=None):
        return SimpleNamespace(kind=kind, num_labels=num_labels, train=train)

    return make


@pytest.fixture(scope="session")
def padded_batch():
    """Four sft-like rows of the tiny GPT-2 (vocab 64, L 12), padded unevenly, prompts ignored."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (4, 12), generator=gen)           # (B, L)
    lengths, prompts = [12, 9, 5, 7], [3, 2, 1, 4]
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for r, (n, p) in enumerate(zip(lengths, prompts)):
        mask[r, :n] = 1
        labels[r, p:n] = ids[r, p:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
