"""``rankscope report`` through click's CliRunner: one self-contained HTML page (and Markdown)
with every section, that loads offline in headless Chromium with every figure decoded; bad
inputs are one line.

The sweep is the SmolLM2 slice on news: full fine-tuning and LoRA r = 2, 4, three steps each.
The Chromium tests need Debian's ``chromium`` (``apt-get install -y chromium``) and are
skipped, saying so, where it is absent.
"""
from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess

import pytest
from clichecks import assert_one_line_error
from click.testing import CliRunner
from study_fixtures import SECTIONS, images

from rankscope.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless test needs Debian's "
                                    "chromium: apt-get install -y chromium")


def invoke(*args):
    return CliRunner().invoke(main, ["report", *map(str, args), "--quiet"])


# ------------------------------------------------------------------- a small real sweep

@pytest.fixture(scope="module")
def sweep(smollm2_slice, tmp_path_factory):
    """Full and LoRA r = 2, 4 on news, 3 steps each: every analysis has data."""
    from rankscope.train.config import build_sweep
    from rankscope.train.sweep import run_sweep

    out = tmp_path_factory.mktemp("report-sweep") / "runs"
    cfg = build_sweep(overrides=dict(model=str(smollm2_slice), task="news", ranks=[2, 4],
                                     steps=3, batch_size=4, max_len=32, max_eval_examples=8,
                                     max_train_examples=32, bf16=False))   # float32 on any CPU
    run_sweep(cfg, out, progress=False, log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def report(sweep, tmp_path_factory):
    """``rankscope report`` on the sweep, into a results folder with no tables yet."""
    out = tmp_path_factory.mktemp("report") / "results"
    res = invoke(sweep, "--out", out)
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.slow
def test_report_computes_the_missing_tables_and_the_recommendation(report):
    for f in ("metrics.csv", "subspace_grid.csv", "truncation_summary.csv", "verdict.md",
              "recommendation.csv", "lora_config.json", "rationale.md", "report.md"):
        assert (report / f).exists(), f


@pytest.mark.slow
def test_the_html_has_every_section_and_only_embedded_figures(report):
    page = (report / "report.html").read_text()
    for anchor in SECTIONS:
        assert f'<section id="{anchor}">' in page, anchor
    where = [page.index(f'<section id="{anchor}">') for anchor in SECTIONS]
    assert where == sorted(where)           # the verdict and the recommendation come first
    assert "verdict.csv" in page.split('<section id="recommendation">')[0]
    srcs = images(page)
    assert len(srcs) >= 10
    for src in srcs:
        head, data = src.split(",", 1)
        assert head == "data:image/png;base64"
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', page)
    assert "<script" not in page and "<link" not in page
    setup = page.split('<section id="training">')[0]
    for item in ("model", "news", "steps", "device", "versions", "torch", "peft"):
        assert item in setup, item
    assert json.loads((report / "lora_config.json").read_text())["r"] >= 1
    assert "target_modules" in page and "Validation: not run" in page


@pytest.mark.slow
def test_the_markdown_has_every_section_and_its_figures(report):
    md = (report / "report.md").read_text()
    assert len(re.findall(r"^## \d+\. ", md, flags=re.M)) == len(SECTIONS)
    figs = re.findall(r"!\[[^\]]*\]\((report_files/[^)]+\.png)\)", md)
    assert len(figs) >= 10
    for f in figs:
        assert (report / f).read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------ headless Chromium

CHECK = """<script>
window.__errs = [];
addEventListener('error', e => __errs.push(String(e.message || (e.target && e.target.tagName))), true);
addEventListener('load', () => {
  const im = [...document.images];
  document.documentElement.setAttribute('data-check', JSON.stringify({images: im.length,
    decoded: im.filter(i => i.complete && i.naturalWidth > 0).length, errors: __errs}));
});
</script>"""
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@needs_chromium
def test_chromium_loads_the_page_without_errors_and_decodes_every_figure(report, tmp_path):
    page = (report / "report.html").read_text()
    probe = tmp_path / "probe.html"       # the report itself has no script: the check is added
    probe.write_text(page.replace("<head>", "<head>" + CHECK, 1))
    run = chromium(tmp_path, "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000",
                   "--dump-dom", probe.as_uri())
    m = re.search(r'data-check="([^"]*)"', run.stdout)
    assert m, run.stderr[-2000:]
    check = json.loads(html.unescape(m.group(1)))
    assert check["errors"] == []
    assert check["images"] == len(images(page)) >= 10
    assert check["decoded"] == check["images"]
    assert not re.search(r"CONSOLE.*(Uncaught|Error)", run.stderr)


@pytest.mark.slow
@needs_chromium
def test_chromium_screenshots_the_report(report, tmp_path):
    from PIL import Image

    shot = tmp_path / "shot.png"
    run = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,4000",
                   (report / "report.html").as_uri())
    assert shot.exists(), run.stderr[-2000:]
    im = Image.open(shot).convert("L")
    assert im.size == (1280, 4000)
    lo, hi = im.getextrema()
    assert hi - lo > 100                       # not a blank page


# ------------------------------------------------------------------------ bad inputs

def _one_line(res, *fragments):
    assert_one_line_error(res, *fragments)


def test_a_folder_with_no_finished_runs_is_one_line(tmp_path):
    (tmp_path / "runs").mkdir()
    _one_line(invoke(tmp_path / "runs", "--out", tmp_path / "res"), "no finished runs")
    assert not (tmp_path / "res").exists()


def test_runs_of_different_tasks_are_one_line(make_run, tmp_path):
    import torch

    t = {"m.layers.0.q.lora_A": torch.ones(1, 4), "m.layers.0.q.lora_B": torch.ones(4, 1),
         "m.layers.0.q.scaling": torch.tensor(1.0)}
    for r, task in ((1, "news"), (2, "qa")):
        make_run(tmp_path / "runs" / f"lora-r{r}-s0", t, run=f"lora-r{r}-s0", method="lora",
                 rank=1, seed=0, model="m", task=task)
    _one_line(invoke(tmp_path / "runs", "--out", tmp_path / "res"), "differ in task")
    assert not (tmp_path / "res").exists()
