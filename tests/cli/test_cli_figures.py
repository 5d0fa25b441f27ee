"""``rankscope figures`` and ``rankscope plot`` through click's CliRunner: every paper
experiment's quick variant runs end to end (sweep, compare, truncate, figure) and re-draws from
its CSV; a folder runs with ``--all``; bad experiments are one line.

The quick variants share one sweep folder per distinct sweep config, under pytest's base temp
folder (``runs_root``, shared with tests/outputs/test_plots.py), so the whole file trains two
tiny sweeps (SmolLM2's first 2 blocks, 3 steps).
"""
from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from study_fixtures import PAPER, ROOT, runs_root  # noqa: E402, F401
from study_fixtures import write_experiment as _write  # noqa: E402

from rankscope.cli import main  # noqa: E402
from rankscope.outputs.experiments import load_experiment  # noqa: E402
from rankscope.pipeline.figures import run_experiment  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_quick_variant_runs_end_to_end_and_redraws(path, runs_root, tmp_path):
    png = run_experiment(path, variant="quick", out=tmp_path, runs_root=runs_root,
                         log=lambda s: None)
    name = path.stem
    assert png == tmp_path / f"{name}.png" and png.stat().st_size > 10_000
    data = pd.read_csv(tmp_path / f"{name}.csv")
    assert list(data.columns[:2]) == ["plot", "panel"] and len(data)
    meta = json.loads((tmp_path / f"{name}.json").read_text())
    assert meta["variant"] == "quick"
    assert "quick profile: smollm2-135m@2l, task news, 3 steps" in meta["caption"]
    assert meta["caption"].startswith(load_experiment(path).result)
    # reproduced or not, by the experiment's own checks, unless its runs failed a training gate
    assert meta["reproduced"] in ("yes", "partly", "no", "untested", "inconclusive")
    assert len(meta["in_shape"]) == len(load_experiment(path).in_shape) >= 1
    assert {g["gate"] for g in meta["gates"]} >= {"full gained", "full plateaued"}
    blocked = [g for g in meta["gates"] if g["status"] not in ("pass", "skipped")]
    assert (meta["reproduced"] == "inconclusive") == bool(blocked), meta["gates"]
    assert f"Reproduced in shape: {meta['reproduced']}" in meta["caption"]
    (tmp_path / f"{name}.json").unlink()                  # the CSV alone suffices
    res = CliRunner().invoke(main, ["plot", str(tmp_path / f"{name}.csv"),
                                    "--out", str(tmp_path / "again.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "again.png").stat().st_size > 10_000


@pytest.mark.slow
def test_figures_cli_runs_a_folder_with_all(runs_root, tmp_path):
    folder = tmp_path / "exps"
    folder.mkdir()
    for name in ("table18_loss_vs_rank", "energy_rank_biderman"):
        text = (ROOT / "experiments" / "paper" / f"{name}.yaml").read_text()
        (folder / f"{name}.yaml").write_text(
            text.replace("../news_smollm2.yaml", str(ROOT / "experiments" / "news_smollm2.yaml")))
    out = tmp_path / "figs"
    res = CliRunner().invoke(main, ["figures", str(folder), "--all", "--variant", "quick",
                                    "--out", str(out), "--runs-root", str(runs_root), "--quiet"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{n}.{ext}" for n in ("table18_loss_vs_rank", "energy_rank_biderman")
         for ext in ("csv", "json", "png")] + ["README.md"])
    table = (out / "README.md").read_text()             # one row per figure: reproduced or not
    assert "| `energy_rank_biderman` | quick |" in table and "| `table18_loss_vs_rank` |" in table
    res = CliRunner().invoke(main, ["figures", str(folder), "--variant", "quick"])
    assert res.exit_code == 2 and "pass --all" in res.output


def test_cli_errors_are_one_line(tmp_path):
    path = _write(tmp_path, {"colour": "red"})
    res = CliRunner().invoke(main, ["figures", str(path), "--variant", "quick"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        f"rankscope: error: experiment {path}: unknown key 'colour'; known: "
        "result, figure, sweep, sweeps, settings, truncate, in_shape, variants"]
    res = CliRunner().invoke(main, ["figures", str(_write(tmp_path, {}, "ok.yaml")), "--variant", "gpu"])
    assert res.exit_code == 2 and "has no variant 'gpu'" in res.output
    res = CliRunner().invoke(main, ["plot", str(tmp_path / "none.csv")])
    assert res.exit_code == 2 and "missing figure data" in res.output
