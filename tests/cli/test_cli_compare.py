"""``rankscope compare`` through click's CliRunner: a small sweep on a tiny real model, the
results folder it shares with the other verbs, ``--overwrite``, and every bad input.

The sweep is built by hand on a random 2-layer GPT-2 (Conv1D c_attn, 96 × 32): a full run
and LoRA runs r = 1, 2 on both c_attn modules, so that every analysis has rows in seconds.
"""
from __future__ import annotations

import json
import shutil

import pytest
from clichecks import assert_one_line_error
import torch
from click.testing import CliRunner

from rankscope.cli import main

MODULES = ("transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn")
TABLES = ["metrics", "subspace", "convergence", "relation", "intruders", "spectra", "modules"]


def invoke(*args):
    return CliRunner().invoke(main, ["compare", *map(str, args), "--quiet"])


@pytest.fixture(scope="module")
def sweep(tiny_gpt2, make_run, tmp_path_factory):
    """Full and LoRA r = 1, 2 runs of the tiny GPT-2, ΔW of chosen random factors."""
    out = tmp_path_factory.mktemp("compare") / "runs"
    gen = torch.Generator().manual_seed(0)
    common = dict(seed=0, model=str(tiny_gpt2), model_path=str(tiny_gpt2), task="news",
                  data_hash="d", split_hash="s", task_kind="lm", steps=2,
                  eval_before={"loss": 4.0})
    full = {f"{m}.delta": 0.1 * torch.randn(96, 32, generator=gen) for m in MODULES}
    make_run(out / "full-s0", full, run="full-s0", method="full", rank=None,
             eval_after={"loss": 3.0}, **common)
    for r, loss in ((1, 3.5), (2, 3.2)):
        t = {}
        for m in MODULES:
            t[f"{m}.lora_A"] = torch.randn(r, 32, generator=gen)
            t[f"{m}.lora_B"] = 0.1 * torch.randn(96, r, generator=gen)
            t[f"{m}.scaling"] = torch.tensor(2.0)
        make_run(out / f"lora-r{r}-s0", t, run=f"lora-r{r}-s0", method="lora", rank=r,
                 lora_alpha=2.0 * r, alpha_policy="scaled", targets=["c_attn"],
                 eval_after={"loss": loss}, **common)
    return out


def test_compare_writes_every_table_and_the_verdict(sweep, tmp_path):
    out = tmp_path / "res"
    res = invoke(sweep, "--out", out)
    assert res.exit_code == 0, res.output
    for t in TABLES:
        assert (out / f"{t}.csv").is_file(), t
    assert "## Verdict" in res.stdout and (out / "verdict.md").is_file()
    assert json.loads((out / "manifest.json").read_text())["inputs"]["runs"] == str(sweep)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temporary left


def test_this_sweeps_results_folder_is_updated_in_place(sweep, tmp_path):
    out = tmp_path / "res"
    assert invoke(sweep, "--out", out).exit_code == 0
    table = "run,method,rank,seed,share,k\nfull-s0,full,,0,0.9,4\nfull-s0,full,,0,0.95,8\n"
    (out / "truncation_summary.csv").write_text(table)            # as `rankscope truncate`'s
    res = invoke(sweep, "--out", out)
    assert res.exit_code == 0, res.output
    assert (out / "truncation_summary.csv").read_text() == table
    assert "k₉₀ = 4" in (out / "verdict.md").read_text()    # the verdict reads it too


def test_a_missing_folder_is_one_line(tmp_path):
    assert_one_line_error(invoke(tmp_path / "nope", "--out", tmp_path / "res"),
                          "missing run or sweep folder")
    assert not (tmp_path / "res").exists()


def test_a_folder_with_no_finished_runs_is_one_line(tmp_path):
    (tmp_path / "runs" / "lora-r2-s0").mkdir(parents=True)      # started, never finished
    assert_one_line_error(invoke(tmp_path / "runs", "--out", tmp_path / "res"), "no finished runs")
    assert not (tmp_path / "res").exists()


def test_an_out_folder_with_other_content_is_refused_without_overwrite(sweep, tmp_path):
    out = tmp_path / "res"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_one_line_error(invoke(sweep, "--out", out), "holds other content", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    res = invoke(sweep, "--out", out, "--overwrite")               # replaced whole
    assert res.exit_code == 0, res.output
    assert not (out / "notes.txt").exists() and (out / "metrics.csv").is_file()


def test_results_of_another_sweep_are_refused_without_overwrite(sweep, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(sweep, other)
    out = tmp_path / "res"
    assert invoke(other, "--out", out).exit_code == 0
    before = sorted(p.name for p in out.iterdir())
    assert_one_line_error(invoke(sweep, "--out", out), f"holds the tables of {other}")
    assert sorted(p.name for p in out.iterdir()) == before


def test_an_out_path_that_is_a_file_is_one_line(sweep, tmp_path):
    out = tmp_path / "res"
    out.write_text("mine")
    assert_one_line_error(invoke(sweep, "--out", out), "exists and is not a folder")
    assert_one_line_error(invoke(sweep, "--out", out, "--overwrite"), "exists and is not a folder")
    assert out.read_text() == "mine"


def test_bad_grid_layers_are_one_line(sweep, tmp_path):
    assert_one_line_error(invoke(sweep, "--out", tmp_path / "res", "--grid-layers", "0,x"),
                          "--grid-layers: expected comma-separated integers")
    assert not (tmp_path / "res").exists()


def test_device_chooses_where_the_svds_run_like_analyze_and_truncate(sweep, tmp_path, monkeypatch):
    import rankscope.analysis.decompose as D

    seen = []
    real = D.update_svd
    monkeypatch.setattr(D, "update_svd", lambda d, **kw: seen.append(kw.get("device")) or real(d, **kw))
    res = invoke(sweep, "--out", tmp_path / "res", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert seen and set(seen) <= {"cpu", None}          # None: svdvals where ΔW lies


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_device_cuda_without_cuda_is_one_line_and_writes_nothing(sweep, tmp_path):
    assert_one_line_error(invoke(sweep, "--out", tmp_path / "res", "--device", "cuda"),
                          "no CUDA device")
    assert not (tmp_path / "res").exists()
