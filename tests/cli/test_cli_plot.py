"""``rankscope plot`` through click's CliRunner: a figure is re-drawn from its CSV (and its
caption), and what is not figure data, or a bad path, is one line with exit status 2.

The figure data is synthetic (tests/study_fixtures.py), the frames tests/outputs/test_plots.py
draws with each plot function.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from clichecks import assert_one_line_error  # noqa: E402
from study_fixtures import SYNTHETIC, _close  # noqa: E402, F401


def plot_cli(*args):
    from click.testing import CliRunner

    from rankscope.cli import main

    return CliRunner().invoke(main, ["plot", *map(str, args)])


def _figure_csv(path, df):
    df.to_csv(path, index=False)
    return path


def test_plot_redraws_a_figure_from_its_csv_and_caption(tmp_path):
    import json

    df = pd.concat([SYNTHETIC["metric_vs_rank"]().assign(plot="metric_vs_rank", panel="loss"),
                    SYNTHETIC["subspace_heatmap"]().assign(plot="subspace_heatmap", panel="φ")])
    csv = _figure_csv(tmp_path / "fig.csv", df)
    (tmp_path / "fig.json").write_text(json.dumps({"caption": "a caption"}))
    res = plot_cli(csv)
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == f"wrote {tmp_path / 'fig.png'}"
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"
    res = plot_cli(csv, "--out", tmp_path / "other.png")
    assert res.exit_code == 0 and (tmp_path / "other.png").is_file()


def _one_line(res, *fragments):
    assert_one_line_error(res, *fragments)


@pytest.mark.parametrize("plot, drop, fragment", [
    ("subspace_heatmap", ["phi"], "lacks the column phi (it needs i, j, phi)"),
    ("metric_vs_rank", ["rank", "value"], "lacks the columns rank, value"),
    ("truncation_curve", ["curve"], "lacks the column curve"),
    ("energy_rank", ["layer"], "lacks the column layer"),
])
def test_plot_names_the_missing_data_columns(tmp_path, plot, drop, fragment):
    df = SYNTHETIC[plot]().assign(plot=plot, panel="p").drop(columns=drop)
    res = plot_cli(_figure_csv(tmp_path / "fig.csv", df))
    _one_line(res, "panel 'p'", f"({plot})", fragment)
    assert not (tmp_path / "fig.png").exists()


def test_plot_names_a_column_that_is_empty_in_its_panel(tmp_path):
    a = SYNTHETIC["subspace_heatmap"]().assign(plot="subspace_heatmap", panel="a")
    b = SYNTHETIC["truncation_curve"]().assign(plot="truncation_curve", panel="b")
    df = pd.concat([a, b.assign(k=np.nan)])          # k exists in the file, but not for b
    _one_line(plot_cli(_figure_csv(tmp_path / "fig.csv", df)), "panel 'b'", "lacks the column k")


@pytest.mark.parametrize("text, fragment", [
    ("", "corrupt figure data"),                                  # an empty file
    ("a,b\n1,2\n", "needs rows and the columns 'plot' and 'panel'"),   # not a figure CSV
    ("plot,panel,i,j,phi\n", "needs rows"),                       # a header alone
    ("plot,panel,i,j,phi\nnope,p,1,1,0.5\n", "unknown plot 'nope'"),
    ("plot,panel,i,j,phi\nsubspace_heatmap,,1,1,0.5\n", "without a plot or a panel"),
    ("plot,panel,curve,k,value\ntruncation_curve,p,c,one,0.5\n", "cannot draw figure data"),
])
def test_plot_rejects_what_is_not_figure_data(tmp_path, text, fragment):
    csv = tmp_path / "fig.csv"
    csv.write_text(text)
    _one_line(plot_cli(csv), fragment)
    assert not (tmp_path / "fig.png").exists()


def test_plot_bad_paths_are_one_line(tmp_path):
    _one_line(plot_cli(tmp_path / "none.csv"), "missing figure data")
    _one_line(plot_cli(tmp_path), "missing figure data")                  # a folder
    csv = _figure_csv(tmp_path / "fig.csv", SYNTHETIC["subspace_heatmap"]().assign(
        plot="subspace_heatmap", panel="p"))
    _one_line(plot_cli(csv, "--out", tmp_path / "no" / "such" / "fig.png"), "no folder")
    _one_line(plot_cli(csv, "--out", tmp_path), "it is a folder")
    (tmp_path / "fig.json").write_text("{not json")
    _one_line(plot_cli(csv), "corrupt figure caption file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.csv", "fig.json"]
