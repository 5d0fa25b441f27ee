"""The energy rank against training tokens: k₉₀ of each snapshot known by construction, the
figure's data built from it, and a corrupt snapshot refused in one line."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from rankscope.analysis.floors import noise_rank_90
from rankscope.analysis.snapshots import COLUMNS, snapshot_table
from rankscope.errors import InputError
from rankscope.outputs.figure_data import rank_tokens
from rankscope.store.runs import UPDATES, snapshot_path, write_manifest, write_updates

NAMES = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj")


def _delta(sigmas, shape=(12, 10), seed=0) -> torch.Tensor:
    """A (d_out, d_in) matrix with exactly the singular values ``sigmas`` (the rest 0)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(shape[0], len(sigmas), generator=g))[0]
    v = torch.linalg.qr(torch.randn(shape[1], len(sigmas), generator=g))[0]
    return u @ torch.diag(torch.tensor(sigmas)) @ v.T


def _full_run(root, *, snapshots: dict[int, list[float]], final: list[float], steps=10):
    run = root / "full-s0"
    run.mkdir(parents=True)
    (run / "snapshots").mkdir()
    for step, sig in snapshots.items():
        write_updates(snapshot_path(run, step),
                      {f"{n}.delta": _delta(sig, seed=i) for i, n in enumerate(NAMES)},
                      method="full", metadata={"step": str(step)})
    write_updates(run / UPDATES, {f"{n}.delta": _delta(final, seed=i) for i, n in enumerate(NAMES)},
                  method="full")
    write_manifest(run, {"run": run.name, "method": "full", "rank": None, "seed": 0,
                         "steps": steps, "tokens_per_step": 64})
    return run


def test_k90_of_each_snapshot_and_of_the_end_known_by_construction(tmp_path):
    # σ = 3, 2, 1: energy 9, 13, 14 of 14 → k₉₀ = 2; σ = 3, 2, 1, 1, 1: 9, 13, 14, 15 of 16 → 4
    _full_run(tmp_path, snapshots={1: [3.0, 2.0, 1.0]}, final=[3.0, 2.0, 1.0, 1.0, 1.0])
    t = snapshot_table(tmp_path, device="cpu")
    assert list(t.columns) == COLUMNS and len(t) == 4
    by = t.set_index(["module", "step"])
    assert by.loc[("q_proj", 1), "k90"] == 2 and by.loc[("q_proj", 10), "k90"] == 4
    assert by.loc[("up_proj", 10), "fro"] == pytest.approx(4.0, rel=1e-5)      # √16
    assert t.groupby("step")["tokens"].first().to_dict() == {1: 64, 10: 640}
    assert t.groupby("step")["share"].first().to_dict() == {1: 0.1, 10: 1.0}
    assert (t["noise_k90"] == noise_rank_90((12, 10))).all()


def test_runs_without_snapshots_give_an_empty_table(tmp_path):
    run = _full_run(tmp_path, snapshots={1: [1.0]}, final=[1.0])
    for f in (run / "snapshots").iterdir():
        f.unlink()
    t = snapshot_table(tmp_path, device="cpu")
    assert t.empty and list(t.columns) == COLUMNS


def test_a_truncated_snapshot_is_one_line(tmp_path):
    run = _full_run(tmp_path, snapshots={1: [3.0, 2.0]}, final=[3.0, 2.0])
    snap = snapshot_path(run, 1)
    snap.write_bytes(snap.read_bytes()[:40])
    with pytest.raises(InputError, match="updates-000001.safetensors"):
        snapshot_table(tmp_path, device="cpu")


def test_rank_tokens_draws_full_by_group_lora_by_rank_and_the_floors(tmp_path):
    _full_run(tmp_path, snapshots={1: [3.0, 2.0, 1.0]}, final=[3.0, 2.0, 1.0, 1.0, 1.0])
    full = snapshot_table(tmp_path, device="cpu")
    lora = full[full["module"] == "q_proj"].assign(run="lora-r2-s0", method="lora", rank=2,
                                                   k90=[1, 2])
    df = rank_tokens({"x": {"snapshots": pd.concat([full, lora], ignore_index=True)}})
    lines = df[df["method"] != "floor"].set_index(["series", "tokens"])["value"]
    assert lines.to_dict() == {("full fine-tuning, attention", 64): 2, ("full fine-tuning, attention", 640): 4,
                               ("full fine-tuning, MLP", 64): 2, ("full fine-tuning, MLP", 640): 4,
                               ("LoRA r = 2", 64): 1, ("LoRA r = 2", 640): 2}
    floors = df[df["method"] == "floor"].set_index("series")["value"]
    assert floors.to_dict() == {"Gaussian k₉₀ floor, attention": noise_rank_90((12, 10)),
                                "Gaussian k₉₀ floor, MLP": noise_rank_90((12, 10))}
    assert set(df["plot"]) == {"rank_vs_tokens"}
    with pytest.raises(InputError, match="trained with snapshots"):
        rank_tokens({"x": {"snapshots": full.iloc[:0]}})
