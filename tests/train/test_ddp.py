"""Data parallel with gloo: ``torchrun --nproc_per_node 2`` computes the update of one process.

The global batch (4) is split 2 + 2; DDP averages gradients and the loss is normalised by the
global target count, so the two computations differ only in float32 summation order. Adam divides
each element's update by its own gradient scale, which magnifies that noise wherever a gradient
element nearly cancels: the updates then agree norm-wise to 1e-4 (measured ~2e-5), and element by
element to rtol 1e-4 plus a share of the tensor's largest entry, a loose bound against gross
errors (5e-2 for full ΔW, measured ~4e-3; 5e-3 for the LoRA factors, measured ~1e-4).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rankscope.train.config import build_sweep
from rankscope.train.sweep import run_sweep

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _torchrun(config: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "rankscope", "sweep", str(config), "--out", str(out), "--quiet", *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=540)


def _load(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return (load_file(run_dir / "updates.safetensors"),
            json.loads((run_dir / "manifest.json").read_text()))


def _max_rel(a: dict, b: dict) -> float:
    """max over tensors of max|a − b| / max|a|."""
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max()) for k in a
               if not k.endswith(".scaling"))


def _check_manifests(one: dict, two: dict) -> None:
    assert one["world_size"] == 1 and two["world_size"] == 2
    for key in ("data_hash", "split_hash", "n_train_examples", "n_eval_examples", "steps"):
        assert one[key] == two[key], key
    assert two["eval_before"]["loss"] == pytest.approx(one["eval_before"]["loss"], rel=1e-5)
    assert two["eval_after"]["loss"] == pytest.approx(one["eval_after"]["loss"], rel=1e-4)


def _check_close(one: dict, two: dict, *, share: float) -> None:
    """Every tensor within 1e-4 in norm and rtol 1e-4 + ``share``·max|x| element by element."""
    assert sorted(one) == sorted(two)
    for k, a in one.items():
        b = two[k]
        assert float((a - b).norm() / a.norm()) < 1e-4, k
        torch.testing.assert_close(b, a, rtol=1e-4, atol=share * float(a.abs().max()))


def _fro_rel(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).norm() / a[k].norm()) for k in a if not k.endswith(".scaling"))


def test_two_gloo_processes_give_the_full_and_lora_updates_of_one_on_news(
        news_sweep, news_yaml, tmp_path, record_property):
    done = _torchrun(news_yaml, tmp_path / "ddp")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("2 runs in") == 1                    # only rank 0 reports

    full1, m1 = _load(news_sweep.full)
    full2, m2 = _load(tmp_path / "ddp" / "full-s0")
    _check_manifests(m1, m2)
    assert len(full1) == 14
    _check_close(full1, full2, share=5e-2)

    lora1, l1 = _load(news_sweep.lora)
    lora2, l2 = _load(tmp_path / "ddp" / "lora-r2-s0")
    _check_manifests(l1, l2)
    _check_close(lora1, lora2, share=5e-3)
    record_property("max_rel_diff_full", _max_rel(full1, full2))
    record_property("max_rel_diff_lora", _max_rel(lora1, lora2))
    print(f"\nDDP news: max|Δ|/max|x| full ΔW {_max_rel(full1, full2):.2e} "
          f"(norm {_fro_rel(full1, full2):.2e}), LoRA factors {_max_rel(lora1, lora2):.2e} "
          f"(norm {_fro_rel(lora1, lora2):.2e})")


def test_two_gloo_processes_give_the_lora_update_of_one_on_padded_sft(smollm2_slice, tmp_path,
                                                                       record_property):
    """qa rows are padded and hold different numbers of answer tokens: a shard that normalised
    by its own count would weight the rows differently from one process (tried: its factors
    are then 0.6 off in norm, against ~5e-6 here)."""
    config = tmp_path / "qa.yaml"
    config.write_text(yaml.safe_dump(dict(
        model=str(smollm2_slice), task="qa", methods=["lora"], ranks=[2], steps=3, batch_size=4,
        max_len=64, max_eval_examples=8, max_train_examples=32, bf16=False)))
    run_sweep(build_sweep(yaml_path=config), tmp_path / "one", progress=False, log=lambda s: None)
    done = _torchrun(config, tmp_path / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    one, m1 = _load(tmp_path / "one" / "lora-r2-s0")
    two, m2 = _load(tmp_path / "two" / "lora-r2-s0")
    _check_manifests(m1, m2)
    _check_close(one, two, share=5e-3)
    record_property("max_rel_diff_sft_lora", _max_rel(one, two))
    print(f"\nDDP qa: max|Δ|/max|x| LoRA factors {_max_rel(one, two):.2e} "
          f"(norm {_fro_rel(one, two):.2e})")


def test_two_gloo_processes_sharded_by_fsdp_give_the_full_update_of_one(news_sweep, news_yaml,
                                                                        tmp_path, record_property):
    """``--strategy fsdp``: full fine-tuning's parameters, gradients and AdamW state sharded
    over 2 processes (FSDP2), gathered to save ΔW: the update of one process, within DDP's
    tolerances (the same global-batch normalisation; only the summation order differs)."""
    done = _torchrun(news_yaml, tmp_path / "fsdp", "--strategy", "fsdp")
    assert done.returncode == 0, done.stderr[-3000:]
    full1, m1 = _load(news_sweep.full)
    full2, m2 = _load(tmp_path / "fsdp" / "full-s0")
    _check_manifests(m1, m2)
    assert m2["strategy"] == "fsdp" and m1["strategy"] is None
    assert not (tmp_path / "fsdp" / "full-s0" / "checkpoint").exists()
    _check_close(full1, full2, share=5e-2)
    _, l2 = _load(tmp_path / "fsdp" / "lora-r2-s0")
    assert l2["strategy"] == "ddp"                        # LoRA's few parameters stay with DDP
    record_property("max_rel_diff_fsdp_full", _max_rel(full1, full2))
    print(f"\nFSDP news: max|Δ|/max|x| full ΔW {_max_rel(full1, full2):.2e} "
          f"(norm {_fro_rel(full1, full2):.2e})")
