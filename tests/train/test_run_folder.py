"""A run folder: its config claimed once, and checkpoints that resume a run exactly."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from rankscope.errors import InputError
from rankscope.store.runs import RunId
from rankscope.train.config import build_sweep
from rankscope.train.loop import lr_lambda
from rankscope.train.objective import loss_sum
from rankscope.train.run_folder import CKPT, claim_run_dir, clear_checkpoint, load_checkpoint, \
    run_config_text, save_checkpoint


def _train_bits(model_dir, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(
        s, total=6, warmup=0.3, schedule="cosine"))
    return model, opt, sched


def _one_step(model, opt, sched, batch):
    loss, n = loss_sum(model, batch, kind="lm")
    (loss / n).backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("killed_between_renames", [False, True])
def test_a_checkpoint_restores_weights_optimizer_schedule_and_rng(tiny_gpt2, padded_batch,
                                                                  tmp_path,
                                                                  killed_between_renames):
    model, opt, sched = _train_bits(tiny_gpt2)
    for _ in range(2):
        _one_step(model, opt, sched, padded_batch)
    metrics = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}]
    params = dict(model.named_parameters())
    save_checkpoint(tmp_path, 2, params, opt, sched, metrics)
    save_checkpoint(tmp_path, 2, params, opt, sched, metrics)       # replaces the first
    assert sorted(p.name for p in tmp_path.iterdir()) == [CKPT]
    if killed_between_renames:
        (tmp_path / CKPT).rename(tmp_path / f".{CKPT}.old")
    expected_rand = torch.rand(4)
    _one_step(model, opt, sched, padded_batch)                       # the reference goes on

    fresh, opt2, sched2 = _train_bits(tiny_gpt2, seed=5)
    step, got_metrics = load_checkpoint(tmp_path, dict(fresh.named_parameters()), opt2, sched2)
    assert step == 2 and got_metrics == metrics
    assert sched2.last_epoch == 2
    assert torch.equal(torch.rand(4), expected_rand)                 # RNG where it was saved
    _one_step(fresh, opt2, sched2, padded_batch)
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n


def test_no_checkpoint_means_a_fresh_start(tiny_gpt2, tmp_path):
    model, opt, sched = _train_bits(tiny_gpt2)
    assert load_checkpoint(tmp_path, dict(model.named_parameters()), opt, sched) == (0, [])


def test_a_run_folder_refuses_a_run_of_another_config(tmp_path):
    cfg = build_sweep(overrides=dict(model="m", steps=4))
    text = run_config_text(cfg, RunId("lora", 2, 0))
    claim_run_dir(tmp_path / "lora-r2-s0", text)
    claim_run_dir(tmp_path / "lora-r2-s0", text)                   # same config: fine
    other = run_config_text(build_sweep(overrides=dict(model="m", steps=5, lr_lora=1e-4)),
                            RunId("lora", 2, 0))
    with pytest.raises(InputError, match=r"another config \(differs in: lr_lora, steps\)"):
        claim_run_dir(tmp_path / "lora-r2-s0", other)


def test_a_run_folder_under_a_file_is_an_input_error(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InputError, match="cannot create run folder"):
        claim_run_dir(tmp_path / "file.txt" / "run", "method: full\n")


def test_clearing_a_checkpoint_removes_its_leftovers_and_nothing_else(tmp_path):
    for name in (CKPT, f".{CKPT}.old", f".{CKPT}.x1y2.tmp"):    # killed mid-write or mid-rename
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.pt").write_text("")
    (tmp_path / "metrics.jsonl").write_text("")
    clear_checkpoint(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


class _RunsCode:
    """A pickle that, when loaded without weights_only, calls a function of its choosing."""
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _saved_checkpoint(tiny_gpt2, tmp_path):
    model, opt, sched = _train_bits(tiny_gpt2)
    save_checkpoint(tmp_path, 2, dict(model.named_parameters()), opt, sched, [])
    return model, opt, sched


def test_a_checkpoint_holding_a_malicious_pickle_is_refused_unexecuted(tiny_gpt2, tmp_path):
    model, opt, sched = _saved_checkpoint(tiny_gpt2, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"step": 2, "payload": _RunsCode(marker)}, tmp_path / CKPT / "state.pt")
    want = (r"^checkpoint .* cannot be read safely \(state\.pt, [\d,]+ bytes, damaged or "
            r"foreign: UnpicklingError: .*\); remove .* to restart this run from step 0$")
    with pytest.raises(InputError, match=want):
        load_checkpoint(tmp_path, dict(model.named_parameters()), opt, sched)
    assert not marker.exists()
    torch.load(tmp_path / CKPT / "state.pt", weights_only=False)     # the control: it does run
    assert marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "empty"])
@pytest.mark.parametrize("name", ["state.pt", "trainable.safetensors"])
def test_a_damaged_checkpoint_is_one_line_naming_the_fix(tiny_gpt2, tmp_path, damage, name):
    model, opt, sched = _saved_checkpoint(tiny_gpt2, tmp_path)
    path = tmp_path / CKPT / name
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:len(data) // 2], "zeroed": bytes(len(data)),
                      "empty": b""}[damage])
    size = {"truncated": len(data) // 2, "zeroed": len(data), "empty": 0}[damage]
    want = (rf"cannot be read safely \({re.escape(name)}, {size:,} bytes, damaged or foreign: "
            r".*; remove .* to restart")
    with pytest.raises(InputError, match=want) as e:
        load_checkpoint(tmp_path, dict(model.named_parameters()), opt, sched)
    assert "\n" not in str(e.value)


def test_a_checkpoint_of_other_parameters_is_refused(tiny_gpt2, tmp_path):
    model, opt, sched = _saved_checkpoint(tiny_gpt2, tmp_path)
    params = dict(model.named_parameters())
    params["extra.weight"] = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(InputError, match=r"does not match this run \(lacks \['extra.weight'\]\)"):
        load_checkpoint(tmp_path, params, opt, sched)
