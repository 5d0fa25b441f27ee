"""``rankscope truncate`` through click's CliRunner: W_0 + trunc_k(ΔW) at full rank gives back the
fine-tuned model on a tiny real sweep, the curve and functional ranks it writes, and every bad
input as one line with nothing written.
"""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from clichecks import assert_one_line_error as one_line_error
from click.testing import CliRunner

from rankscope.cli import main


# ------------------------------------------------------------------ a tiny real sweep

def invoke(*args):
    return CliRunner().invoke(main, ["truncate", *map(str, args), "--quiet"])


@pytest.fixture(scope="module")
def truncated(news_sweep, tmp_path_factory):
    """``rankscope truncate`` on the shared news sweep, its LoRA r = 2 run included."""
    out = tmp_path_factory.mktemp("truncate") / "results"
    res = invoke(news_sweep.out, "--out", out, "--ks", "1,2,4", "--lora-min-rank", "2")
    assert res.exit_code == 0, res.output
    return out, res


@pytest.mark.slow
def test_truncation_at_full_rank_gives_back_the_fine_tuned_model(news_sweep, truncated):
    out, _ = truncated
    curve = pd.read_csv(out / "truncation.csv")
    for run_dir in (news_sweep.full, news_sweep.lora):
        manifest = json.loads((run_dir / "manifest.json").read_text())
        rows = curve[curve["run"] == run_dir.name]
        top = rows[rows["is_full_rank"]]
        assert len(top) == 1
        assert top["eval_loss"].iloc[0] == pytest.approx(manifest["eval_after"]["loss"], rel=1e-6)
        assert (rows["before_loss"] == manifest["eval_before"]["loss"]).all()
    full = curve[curve["run"] == "full-s0"]
    assert full["k"].tolist() == [0, 1, 2, 4, 576]          # 576: the largest module rank
    lora = curve[curve["run"] == "lora-r2-s0"]
    assert lora["k"].tolist() == [0, 1, 2]                  # a rank-2 update is whole at k = 2


@pytest.mark.slow
def test_the_cli_writes_the_curve_and_the_functional_ranks(news_sweep, truncated):
    out, res = truncated
    summary = pd.read_csv(out / "truncation_summary.csv")
    assert sorted(set(summary["run"])) == ["full-s0", "lora-r2-s0"]
    assert sorted(set(summary["share"])) == [0.9, 0.95]
    assert {"k0_share", "k_max"} <= set(summary.columns)
    curve = pd.read_csv(out / "truncation.csv")
    for run, g in curve.groupby("run"):
        gain = g.loc[g["k"] == 0, "eval_loss"].iloc[0] - g.loc[g["is_full_rank"], "eval_loss"].iloc[0]
        if gain > 0:                                        # the gain from the k = 0 baseline
            assert g.loc[g["is_full_rank"], "gain_share"].iloc[0] == pytest.approx(1.0)
            assert g.loc[g["k"] == 0, "gain_share"].iloc[0] == 0.0
        else:
            assert g["gain_share"].isna().all()
        assert (summary.loc[summary["run"] == run, "k_max"] == g["k"].max()).all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"truncation", "truncation_summary"} <= set(manifest["tables"])
    assert manifest["inputs"]["runs"] == str(news_sweep.out)
    assert "gain_share" in res.stdout and "share" in res.stdout


# ------------------------------------------------------------------------ bad inputs

def assert_one_line_error(res, out, *fragments):
    one_line_error(res, *fragments, out=out)


@pytest.fixture(scope="module")
def lora_only(make_run, tmp_path_factory):
    """A sweep folder whose only finished run is LoRA r = 2 (no full run to truncate)."""
    import torch

    out = tmp_path_factory.mktemp("lora-only") / "runs"
    t = {"m.layers.0.q.lora_A": torch.ones(2, 4), "m.layers.0.q.lora_B": torch.ones(4, 2),
         "m.layers.0.q.scaling": torch.tensor(1.0)}
    make_run(out / "lora-r2-s0", t, run="lora-r2-s0", method="lora", rank=2, seed=0, model="m",
             task="news")
    return out


def test_a_missing_folder_is_one_line(tmp_path):
    assert_one_line_error(invoke(tmp_path / "nope", "--out", tmp_path / "res"),
                          tmp_path / "res", "missing run or sweep folder")


def test_a_folder_with_no_finished_runs_is_one_line(tmp_path):
    (tmp_path / "runs" / "full-s0").mkdir(parents=True)         # started, never finished
    assert_one_line_error(invoke(tmp_path / "runs", "--out", tmp_path / "res"),
                          tmp_path / "res", "no finished runs")


def test_a_sweep_without_a_full_run_is_one_line(lora_only, tmp_path):
    assert_one_line_error(invoke(lora_only, "--out", tmp_path / "res"), tmp_path / "res",
                          "no full run", "to truncate")
    # with --lora-min-rank above every LoRA rank there is still nothing to truncate
    assert_one_line_error(invoke(lora_only, "--out", tmp_path / "res", "--lora-min-rank", "4"),
                          tmp_path / "res", "no full run (or LoRA run of rank ≥ 4)")


@pytest.mark.parametrize("ks, fragment", [
    ("0,2", "every k must be a positive integer, got [0, 2]"),
    ("-1", "every k must be a positive integer, got [-1]"),
    ("", "every k must be a positive integer, got []"),
    ("1,two", "--ks: expected comma-separated integers, got '1,two'"),
    ("1.5", "--ks: expected comma-separated integers, got '1.5'"),
])
def test_bad_ks_are_one_line(lora_only, tmp_path, ks, fragment):
    assert_one_line_error(invoke(lora_only, "--out", tmp_path / "res", "--ks", ks),
                          tmp_path / "res", fragment)


def test_a_non_positive_lora_min_rank_is_one_line(lora_only, tmp_path):
    assert_one_line_error(invoke(lora_only, "--out", tmp_path / "res", "--lora-min-rank", "0"),
                          tmp_path / "res", "lora_min_rank: must be a positive integer, got 0")


def test_a_sweep_without_its_config_is_one_line(news_sweep, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(news_sweep.full, runs / "full-s0")          # the run, not its sweep.yaml
    assert_one_line_error(invoke(runs, "--out", tmp_path / "res"), tmp_path / "res",
                          "has no sweep.yaml")


def test_an_out_path_that_is_a_file_is_refused_before_any_work(lora_only, tmp_path):
    out = tmp_path / "res"
    out.write_text("mine")
    assert_one_line_error(invoke(lora_only, "--out", out), None, "exists and is not a folder")
    assert out.read_text() == "mine"


def test_results_of_another_sweep_are_one_line(lora_only, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(lora_only, other)
    res = tmp_path / "res"
    res.mkdir()
    (res / "manifest.json").write_text(json.dumps({"inputs": {"runs": str(other)},
                                                   "tables": ["metrics"]}))
    assert_one_line_error(invoke(lora_only, "--out", res), None, "holds the tables of")
    assert sorted(p.name for p in res.iterdir()) == ["manifest.json"]
