"""The default job: what `rankscope run` (and `make run`) studies when nothing names a task."""
from __future__ import annotations

import pytest

from rankscope.pipeline import job
from rankscope.pipeline.job import DEFAULT_TASK, job_config
from rankscope.train.config import PROFILES


@pytest.fixture
def cpu(monkeypatch):
    monkeypatch.setattr(job.torch.cuda, "is_available", lambda: False)


def test_the_default_job_is_the_topic_task_on_minilm_at_the_quick_profile(cpu):
    cfg = job_config()
    assert DEFAULT_TASK == "topic" and cfg.task == "topic" and cfg.model == "minilm-l6"
    assert cfg.targets == ("query", "value") and cfg.profile == "quick"
    for key, value in PROFILES["quick"].items():
        assert getattr(cfg, key) == value, key
    assert len(cfg.seeds) >= 2 and cfg.lr_search        # the margin's spread; searched rates


@pytest.mark.parametrize("flags, task, model", [
    ({"model": "smollm2-135m"}, "news", "smollm2-135m"),           # a model keeps the sweep's
    ({"task": "sentiment"}, "sentiment", "minilm-l6"),
    ({"data": "mine.jsonl", "task_kind": "lm"}, None, "smollm2-135m"),
    ({"task": None, "data": None, "model": None, "steps": 5}, "topic", "minilm-l6")])
def test_a_named_task_data_or_model_replaces_the_default_task(cpu, flags, task, model):
    cfg = job_config(overrides=flags)
    assert (cfg.task, cfg.model) == (task, model)


def test_a_config_file_keeps_its_own_task(cpu):
    cfg = job_config(config="experiments/news_smollm2.yaml")
    assert cfg.task == "news" and cfg.model == "smollm2-135m"
