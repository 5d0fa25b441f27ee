"""The CUDA paths: a sweep on the GPU (bf16 autocast, TF32, fused AdamW) against the same sweep
on the CPU, and the analysis's dense SVDs on the GPU. Skipped where no CUDA device is present
(CI never has one); run them on a GPU machine with ``pytest -m gpu``.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from rankscope.analysis.analyze import analyze
from rankscope.train.config import build_sweep
from rankscope.train.sweep import run_sweep

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TINY = dict(task="news", methods=("full", "lora"), ranks=(4,), seeds=(0,), steps=3,
            batch_size=4, max_len=32, max_eval_examples=8, max_train_examples=32,
            checkpoint_every=2)


def _sweep(out, model, **values):
    cfg = build_sweep(overrides={**TINY, "model": str(model), **values})
    return run_sweep(cfg, out, progress=False, log=lambda _: None)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def test_a_cuda_sweep_records_its_device_and_matches_the_cpu_updates(smollm2_slice, tmp_path):
    gpu = _sweep(tmp_path / "gpu", smollm2_slice, device="cuda", bf16=False)
    cpu = _sweep(tmp_path / "cpu", smollm2_slice, device="cpu", bf16=False)
    for g, c in zip(gpu, cpu):
        assert g["device"].startswith("cuda") and c["device"] == "cpu"
        assert g["peak_memory_mb"] > 0 and g["eval_after"]["loss"] < g["eval_before"]["loss"]
        a = load_file(tmp_path / "gpu" / g["run"] / "updates.safetensors")
        b = load_file(tmp_path / "cpu" / c["run"] / "updates.safetensors")
        assert sorted(a) == sorted(b)
        for key in a:            # TF32 matmuls and other kernels: close, not bit-identical
            if key.endswith((".delta", ".lora_B")):
                assert _rel(a[key], b[key]) < 0.05, key


def test_bf16_autocast_is_the_cuda_default_and_trains(smollm2_slice, tmp_path):
    (full, lora) = _sweep(tmp_path / "bf16", smollm2_slice, device="cuda")
    for m in (full, lora):
        assert m["bf16_autocast"] is True
        assert m["eval_after"]["loss"] < m["eval_before"]["loss"]


def test_analyze_on_cuda_equals_analyze_on_cpu(smollm2_slice, tmp_path):
    _sweep(tmp_path / "runs", smollm2_slice, device="cuda", bf16=False)
    _, gpu = analyze(tmp_path / "runs", device="cuda", progress=False)
    _, cpu = analyze(tmp_path / "runs", device="cpu", progress=False)
    for col in ("fro_norm", "spectral_norm", "stable_rank", "energy_rank_90"):
        assert gpu[col].to_numpy() == pytest.approx(cpu[col].to_numpy(), rel=1e-4), col
