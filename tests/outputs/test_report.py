"""``rankscope report``: one self-contained HTML page (and Markdown) with every section, that
loads offline in headless Chromium with every figure decoded; bad inputs are one line.

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

import click
import pytest
from pathlib import Path
from clichecks import assert_one_line_error
from click.testing import CliRunner

from rankscope.cli.read import report as report_command
from rankscope.outputs.report import Section
from rankscope.pipeline.stages import report_stage
from rankscope.outputs.report_render import md_to_html, write_html, write_markdown

SECTIONS = ["setup", "training", "metric", "spectra", "phi", "convergence", "relation",
            "intruders", "truncation", "verdict", "recommendation"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless test needs Debian's "
                                    "chromium: apt-get install -y chromium")


def invoke(*args):
    group = click.Group("rankscope")
    group.add_command(report_command)
    return CliRunner().invoke(group, ["report", *map(str, args), "--quiet"])


def images(page: str) -> list[str]:
    return re.findall(r'<img[^>]*src="([^"]*)"', page)


def _png_1x1() -> bytes:
    return base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAE"
                            "hQGAhKmMIQAAAABJRU5ErkJggg==")


# ---------------------------------------------------------------------------- rendering

def test_markdown_subset_becomes_escaped_html():
    out = md_to_html("## Verdict\n\n- **holds** at `r = 2`\n- a <b>tag</b>\n\n| a | b |\n|---|---|\n"
                     "| 1 | x_y |\n\n```json\n{\"r\": 8}\n```\ntext _note_")
    assert "<h3>Verdict</h3>" in out
    assert "<li><strong>holds</strong> at <code>r = 2</code></li>" in out
    assert "&lt;b&gt;tag&lt;/b&gt;" in out and "<b>" not in out
    assert "<th>a</th><th>b</th>" in out and "<td>x_y</td>" in out
    assert "<pre><code>{&quot;r&quot;: 8}</code></pre>" in out
    assert "<em>note</em>" in out


def test_html_is_self_contained_and_markdown_has_its_files(tmp_path):
    import pandas as pd

    s = Section("Demo <1>", "demo").md("a **b**").table("t", pd.DataFrame({"x": [1.5], "y": ["z"]}))
    s.blocks.append(("fig", "a figure", _png_1x1(), "fig1"))
    s.blocks.append(("code", "json", '{"r": 8}'))
    page = write_html(tmp_path / "report.html", "T", [s]).read_text()
    assert "Demo &lt;1&gt;" in page and "<strong>b</strong>" in page
    assert images(page) == ["data:image/png;base64," + base64.b64encode(_png_1x1()).decode()]
    assert not re.search(r'(src|href)="(https?:)?//', page)
    md = write_markdown(tmp_path / "report.md", "T", [s]).read_text()
    assert "![a figure](report_files/fig1.png)" in md and "| x | y |" in md
    assert (tmp_path / "report_files" / "fig1.png").read_bytes() == _png_1x1()


def test_a_failed_markdown_write_leaves_the_previous_report_and_its_figures(tmp_path, monkeypatch):
    def section(data: bytes) -> Section:
        s = Section("Figures", "figs")
        for name in ("one", "two"):
            s.blocks.append(("fig", name, data, name))
        return s

    path = tmp_path / "report.md"
    write_markdown(path, "T", [section(b"old")])
    before = path.read_bytes()
    real = Path.write_bytes

    def fail_on_two(self, data):
        if self.name == "two.png":
            raise OSError(28, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", fail_on_two)
    with pytest.raises(OSError):
        write_markdown(path, "T", [section(b"new")])
    files = tmp_path / "report_files"
    assert {p.name: p.read_bytes() for p in files.iterdir()} == {"one.png": b"old", "two.png": b"old"}
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "report_files"]


def test_a_figure_whose_data_cannot_be_drawn_becomes_a_note():
    import pandas as pd

    # a sweep with full fine-tuning only: its metric-vs-r panel has no LoRA rank to draw
    df = pd.DataFrame({"plot": "metric_vs_rank", "panel": "loss", "series": "full fine-tuning",
                       "method": "full", "rank": [None], "seed": 0, "value": 3.0})
    s = Section("Metric vs r", "metric").figure("Held-out metric vs LoRA rank", None, df,
                                                name="metric")
    assert [b[0] for b in s.blocks] == ["md"]
    assert "not available" in s.blocks[0][1] and "lacks the column rank" in s.blocks[0][1]


def test_the_recommendation_section_shows_the_validation_side_by_side(tmp_path):
    import pandas as pd

    from rankscope.outputs.report import recommendation_section

    (tmp_path / "rationale.md").write_text("## Recommended LoRA ranks\n\nOverall **r = 4**.\n")
    pd.DataFrame({"layer": [0, 0, 1], "module": ["q_proj", "v_proj", "q_proj"], "r": [4, 2, 4],
                  "confidence": ["high", "low", "high"], "params": [4608, 1536, 4608]}).to_csv(
        tmp_path / "recommendation.csv", index=False)
    (tmp_path / "lora_config.json").write_text(json.dumps({"r": 4, "rank_pattern": {"v": 2}}))
    pd.DataFrame({"config": ["recommended", "recommended", "uniform", "uniform"],
                  "ranks": ["r = 4; 1 modules at other ranks (2–2)"] * 2 + ["r = 4"] * 2,
                  "seed": [0, 1, 0, 1], "trainable_params": [10752, 10752, 13824, 13824],
                  "before_loss": 3.0, "after_loss": [2.0, 2.2, 2.4, 2.6]}).to_csv(
        tmp_path / "validate.csv", index=False)
    (tmp_path / "validate").mkdir()
    (tmp_path / "validate" / "configs.json").write_text(json.dumps(
        {"recommended": {"r": 4, "rank_pattern": {"v": 2}}, "uniform": {"r": 4}}))
    s = recommendation_section(tmp_path)
    kinds = [b[0] for b in s.blocks]
    assert kinds == ["md", "fig", "table", "code", "table", "md"]
    side = s.blocks[-2][2]
    assert list(side["config"]) == ["recommended", "uniform"]
    assert side["after"].tolist() == pytest.approx([2.1, 2.5])
    assert side["seeds"].tolist() == [2, 2]
    # one uniform rank cannot have the recommendation's size: both counts are stated
    note = s.blocks[-1][1]
    assert "No uniform integer rank has exactly the recommendation's 10,752" in note
    assert "r = 4 on every module, has 13,824 (+3,072, +28.6%)" in note
    # a later recommendation without --validate: the old validation is flagged, not shown
    (tmp_path / "lora_config.json").write_text(json.dumps({"r": 8}))
    s = recommendation_section(tmp_path)
    assert [b[0] for b in s.blocks][-1] == "md" and "earlier recommendation" in s.blocks[-1][1]


# ------------------------------------------------------------------- a small real sweep

@pytest.fixture(scope="module")
def sweep(smollm2_slice, tmp_path_factory):
    """Full and LoRA r = 2, 4 on news, 3 steps each: every analysis has data."""
    from rankscope.train.config import build_sweep
    from rankscope.train.sweep import run_sweep

    out = tmp_path_factory.mktemp("report-sweep") / "runs"
    cfg = build_sweep(overrides=dict(model=str(smollm2_slice), task="news", ranks=[2, 4],
                                     steps=3, batch_size=4, max_len=32, max_eval_examples=8,
                                     max_train_examples=32))
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


@pytest.mark.slow
def test_a_sweep_with_one_lora_rank_still_reports_every_section(news_sweep, tmp_path):
    path = report_stage(news_sweep.out, tmp_path / "res", progress=False, log=lambda s: None)
    page = path.read_text()
    for anchor in SECTIONS:
        assert f'<section id="{anchor}">' in page, anchor
    assert "not available" in page                  # no pair of ranks: no φ(i, j) grid


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
