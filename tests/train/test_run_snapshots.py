"""Snapshots: a run's update saved at shares of its steps (the energy rank against training
tokens), equal to the weights at that step, and a run with them trains exactly as one without."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from rankscope.errors import InputError
from rankscope.store.runs import snapshot_files
from rankscope.train import run as run_module
from rankscope.train.models import load_backbone
from rankscope.train.sweep import run_sweep


def _sweep(cfg, out):
    run_sweep(cfg, out, progress=False, log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def pair(tiny_llama, tiny_cfg, tmp_path_factory):
    """The same 8-step sweep (full + LoRA r = 4) with snapshots at 25% and 50%, and without."""
    root = tmp_path_factory.mktemp("snapshots")
    changes = dict(steps=8, checkpoint_every=4, seeds=(0,))
    with_snaps = _sweep(tiny_cfg(tiny_llama, snapshots=(0.25, 0.5), **changes), root / "with")
    without = _sweep(tiny_cfg(tiny_llama, **changes), root / "without")
    return with_snaps, without


def test_snapshot_steps_are_the_shares_rounded_below_the_last(tiny_cfg, tiny_llama):
    cfg = tiny_cfg(tiny_llama, steps=10, snapshots=(0.1, 0.25, 0.26, 0.999))
    # 1.0 → 1, 2.5 → 2 (half to even), 2.6 → 3; 9.99 → 10 is the last step, whose update is
    # the run's own updates.safetensors
    assert cfg.snapshot_steps() == (1, 2, 3)
    assert tiny_cfg(tiny_llama, steps=10).snapshot_steps() == ()


@pytest.mark.parametrize("bad", [(0.0,), (1.0,), (-0.5,), (float("nan"),), ("half",)])
def test_a_share_outside_0_1_is_one_line(tiny_cfg, tiny_llama, bad):
    with pytest.raises(InputError, match=r"^snapshots: expected shares of the steps in \(0, 1\)"):
        tiny_cfg(tiny_llama, snapshots=bad)


@pytest.mark.parametrize("run", ["full-s0", "lora-r4-s0"])
def test_each_run_saves_its_update_at_each_share(pair, run):
    with_snaps, _ = pair
    files = snapshot_files(with_snaps / run)
    assert list(files) == [2, 4]
    final = load_file(with_snaps / run / "updates.safetensors")
    for step, f in files.items():
        with safe_open(str(f), framework="pt") as h:
            assert h.metadata()["step"] == str(step)
        snap = load_file(f)
        keys = {k for k in final if not k.endswith(".lora_A0")}
        assert set(snap) == keys                   # the layout of updates.safetensors
        moved = [k for k in snap if k.endswith((".delta", ".lora_B"))]
        assert moved and all(not torch.equal(snap[k], final[k]) for k in moved)
    assert json.loads((with_snaps / run / "manifest.json").read_text())["snapshot_steps"] == [2, 4]


@pytest.mark.parametrize("run", ["full-s0", "lora-r4-s0"])
def test_a_run_with_snapshots_ends_bit_identical_to_one_without(pair, run):
    with_snaps, without = pair
    a, b = (load_file(d / run / "updates.safetensors") for d in (with_snaps, without))
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert snapshot_files(without / run) == {}


def test_a_full_snapshot_is_the_weights_at_its_step_minus_w0(tiny_llama, tiny_cfg, tmp_path,
                                                             monkeypatch):
    """An independent reading of W at step 4: the resumable checkpoint of that step (kept
    here), against the snapshot the run wrote at the same step."""
    monkeypatch.setattr(run_module, "clear_checkpoint", lambda run_dir: None)
    cfg = tiny_cfg(tiny_llama, steps=8, checkpoint_every=4, snapshots=(0.5,), methods=("full",),
                   full_scope="linear")
    out = _sweep(cfg, tmp_path / "s")
    snap = load_file(snapshot_files(out / "full-s0")[4])
    at_4 = load_file(out / "full-s0" / "checkpoint" / "trainable.safetensors")
    base = dict(load_backbone(tiny_llama).named_parameters())
    checked = 0
    for key, delta in snap.items():
        module = key.removesuffix(".delta")
        param = next(n for n in at_4 if n.endswith(module.split("model.", 1)[-1] + ".weight"))
        w0 = next(p for n, p in base.items() if n.endswith(module.split("model.", 1)[-1] + ".weight"))
        torch.testing.assert_close(delta, at_4[param] - w0.detach(), rtol=0, atol=0)
        checked += 1
    assert checked == len(snap) > 0
