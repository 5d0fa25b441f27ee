"""``rankscope report``'s pieces: the Markdown subset, a self-contained HTML page and the
Markdown beside it with its figures, notes for figures that cannot be drawn, the recommendation
section, and a report of a sweep with one LoRA rank. The verb itself (a small real sweep, the
page in headless Chromium, bad inputs) is tested in tests/cli/test_cli_report.py.
"""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from study_fixtures import SECTIONS, images

from rankscope.errors import InputError
from rankscope.outputs.report import Section
from rankscope.pipeline.stages import report_stage
from rankscope.outputs.report_render import md_to_html, write_html, write_markdown


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
    with pytest.raises(InputError, match="No space left on device; free space and rerun"):
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

@pytest.mark.slow
def test_a_sweep_with_one_lora_rank_still_reports_every_section(news_sweep, tmp_path):
    path = report_stage(news_sweep.out, tmp_path / "res", progress=False, log=lambda s: None)
    page = path.read_text()
    for anchor in SECTIONS:
        assert f'<section id="{anchor}">' in page, anchor
    assert "not available" in page                  # no pair of ranks: no φ(i, j) grid
