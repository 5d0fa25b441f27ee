"""The one freshness rule: a stage is redone exactly when its runs, settings or inputs change.

A sweep that gains a run must see every table refreshed (compare, truncate, recommend, report),
not the old tables reused because their files exist; a second call with nothing changed does
no work; a stage asked with other settings is redone, and so is every stage that reads it.
"""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from rankscope.pipeline.stages import UP_TO_DATE, Stamps, compare_stage, report_stage, \
    runs_stamp, truncate_stage


@pytest.fixture()
def full_only(news_sweep, tmp_path):
    """A copy of the news sweep holding its full run only (the LoRA run is added later)."""
    sweep = tmp_path / "sweep"
    shutil.copytree(news_sweep.out, sweep, ignore=shutil.ignore_patterns("lora-*"))
    return sweep


def report(sweep, results):
    lines: list[str] = []
    report_stage(sweep, results, progress=False, log=lines.append)
    return lines


def test_a_run_added_to_the_sweep_refreshes_every_table(news_sweep, full_only, tmp_path):
    results = tmp_path / "results"
    first = report(full_only, results)
    assert any(line.startswith("compare ") and not line.endswith(UP_TO_DATE) for line in first)
    assert pd.read_csv(results / "metrics.csv")["method"].tolist() == ["full"]
    before = {f: (results / f).read_bytes() for f in ("truncation.csv", "recommendation.csv",
                                                      "verdict.md", "report.md")}
    stamps = json.loads((results / ".stages.json").read_text())

    shutil.copytree(news_sweep.lora, full_only / news_sweep.lora.name)       # the sweep grows
    second = report(full_only, results)
    for stage in ("compare", "truncate", "recommend"):
        assert any(line.startswith(stage + " ") and not line.endswith(UP_TO_DATE)
                   for line in second), (stage, second)
    assert sorted(pd.read_csv(results / "metrics.csv")["method"]) == ["full", "lora"]
    assert "lora-r2-s0" in set(pd.read_csv(results / "modules.csv")["run"])
    assert len(pd.read_csv(results / "subspace.csv")) or len(pd.read_csv(results / "convergence.csv"))
    now = json.loads((results / ".stages.json").read_text())
    assert all(now[s]["stamp"] != stamps[s]["stamp"] for s in ("compare", "truncate",
                                                              "recommend", "report"))
    assert (results / "report.md").read_bytes() != before["report.md"]
    assert (results / "recommendation.csv").read_bytes() != before["recommendation.csv"]


def test_nothing_changed_means_no_work(news_sweep, tmp_path):
    results = tmp_path / "results"
    report(news_sweep.out, results)
    tables = {p.name: p.read_bytes() for p in results.glob("*.csv")}
    again = report(news_sweep.out, results)
    work = [line for line in again if line.startswith(("compare ", "truncate ", "recommend "))]
    assert work and all(line.endswith(UP_TO_DATE) for line in work), again
    assert tables == {p.name: p.read_bytes() for p in results.glob("*.csv")}


def test_other_settings_redo_the_stage_and_what_reads_it(news_sweep, tmp_path):
    results = tmp_path / "results"
    report(news_sweep.out, results)
    old = Stamps(results, news_sweep.out).done
    lines: list[str] = []
    truncate_stage(news_sweep.out, results, ks=(1, 2), force=False, progress=False,
                   log=lines.append)
    assert lines and not lines[0].endswith(UP_TO_DATE)
    ks = set(pd.read_csv(results / "truncation.csv")["k"])
    assert {1, 2} <= ks and not ks & {4, 8, 16}       # the new ks, not the defaults
    stamps = Stamps(results, news_sweep.out)
    assert stamps.done["truncate"]["stamp"] != old["truncate"]["stamp"]
    assert not stamps.fresh("recommend", stamps.settings("recommend"))   # it read truncate
    assert stamps.fresh("compare", stamps.settings("compare"))           # it did not


def test_the_compare_verb_always_recomputes_but_run_skips_when_fresh(news_sweep, tmp_path):
    results = tmp_path / "results"
    assert compare_stage(news_sweep.out, results, force=False, progress=False, log=print)
    assert not compare_stage(news_sweep.out, results, force=False, progress=False, log=print)
    assert compare_stage(news_sweep.out, results, force=True, progress=False, log=print)


def test_the_runs_stamp_sees_a_changed_manifest(news_sweep, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(news_sweep.out, sweep)
    before = runs_stamp(sweep)
    manifest = sweep / "full-s0" / "manifest.json"
    doc = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**doc, "note": "retrained"}))
    assert runs_stamp(sweep) != before
