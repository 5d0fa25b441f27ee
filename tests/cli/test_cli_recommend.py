"""``rankscope recommend`` through click's CliRunner: it writes the recommendation (and a
budgeted one) beside the tables, and every bad input is one line with exit status 2.

The planted sweep (tests/study_fixtures.py) is the one tests/recommend/test_recommend.py
checks the engine on: SmolLM2-slice modules with ranks known by construction.
"""
from __future__ import annotations

import json

import pandas as pd
import pytest
from clichecks import assert_one_line_error
from click.testing import CliRunner
from study_fixtures import planted, planted_results  # noqa: F401

from rankscope.cli import main


def invoke(*args):
    return CliRunner().invoke(main, ["recommend", *map(str, args), "--quiet"])


def test_the_cli_writes_the_recommendation_and_a_budgeted_one(planted, planted_results, tmp_path):
    import shutil

    shutil.copytree(planted_results[0], tmp_path / "res")
    for f in ("recommendation.csv", "lora_config.json", "rationale.md"):
        (tmp_path / "res" / f).unlink()
    res = invoke(planted, "--out", tmp_path / "res")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "res" / "lora_config.json").read_text())["r"] in (1, 2, 4, 8)
    assert '"rank_pattern"' in res.stdout
    res = invoke(planted, "--out", tmp_path / "res", "--budget", "5k")
    assert res.exit_code == 0, res.output
    table = pd.read_csv(tmp_path / "res" / "recommendation.csv")
    assert table["params"].sum() <= 5000 and "r_evidence" in table


# ------------------------------------------------------------------------ bad inputs

def _one_line(res, *fragments):
    assert_one_line_error(res, *fragments)


def test_a_folder_with_no_finished_runs_is_one_line(tmp_path):
    (tmp_path / "runs" / "lora-r2-s0").mkdir(parents=True)       # started, never finished
    _one_line(invoke(tmp_path / "runs", "--out", tmp_path / "res"), "no finished runs")


def test_runs_of_different_models_are_one_line(planted, make_run, tmp_path):
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(planted, mixed)
    manifest = json.loads((mixed / "lora-r2-s0" / "manifest.json").read_text())
    manifest["model"] = "another-model"
    (mixed / "lora-r2-s0" / "manifest.json").write_text(json.dumps(manifest))
    _one_line(invoke(mixed, "--out", tmp_path / "res"), "differ in model")


@pytest.mark.parametrize("budget, fragment", [("100", "smaller than one rank-1 adapter"),
                                              ("1.5X", "cannot read"), ("-1", "positive")])
def test_bad_budgets_are_one_line(planted, tmp_path, budget, fragment):
    _one_line(invoke(planted, "--out", tmp_path / "res", "--budget", budget), "budget", fragment)
    assert not (tmp_path / "res").exists()          # refused before any analysis ran


def test_results_of_another_sweep_are_one_line(planted, planted_results, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(planted, other)
    res = tmp_path / "res"
    shutil.copytree(planted_results[0], res)
    _one_line(invoke(other, "--out", res), "holds the tables of")
