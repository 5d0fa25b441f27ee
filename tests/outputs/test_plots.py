"""Plot functions, figure data builders and re-drawing, on synthetic frames and real tables.

The real tables are the quick variant's shared sweep (SmolLM2's first 2 blocks), trained
once per session under pytest's base temp folder, which tests/outputs/test_experiments.py reuses.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from clichecks import assert_one_line_error  # noqa: E402

from rankscope.outputs import plots as plots  # noqa: E402
from rankscope.errors import InputError  # noqa: E402
from rankscope.outputs.figure_data import BUILDERS, draw_figure, energy_shares, module_group  # noqa: E402

EXPERIMENTS = "experiments/paper"


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _grid(ni, nj):
    i, j = np.meshgrid(np.arange(1, ni + 1), np.arange(1, nj + 1), indexing="ij")
    return pd.DataFrame({"i": i.ravel(), "j": j.ravel(), "phi": (1.0 / (i * j)).ravel()})


def _rank_rows(series=("a", "b"), with_base=True):
    rows = [{"series": s, "method": "lora", "rank": r, "seed": sd, "value": r + sd + k}
            for k, s in enumerate(series) for r in (1, 2, 8) for sd in (0, 1)]
    rows += [{"series": "full fine-tuning", "method": "full", "rank": None, "seed": sd,
              "value": 3.0 + sd} for sd in (0, 1)]
    if with_base:
        rows.append({"series": "base model", "method": "base", "rank": None, "seed": None,
                     "value": 20.0})
    return pd.DataFrame(rows).assign(quantity="loss")


SYNTHETIC = {
    "subspace_heatmap": lambda: _grid(4, 16),
    "metric_vs_rank": lambda: _rank_rows(),
    "convergence_curves": lambda: _rank_rows(("q_proj", plots.OVERALL), with_base=False)
    .assign(value=lambda d: d["value"] / 20, quantity="share"),
    "intruder_counts": lambda: _rank_rows(("ε = 0.5", "ε = 0.7"), with_base=False)
    .replace({"series": {"full fine-tuning": "ε = 0.5"}}),
    "relation_bars": lambda: pd.DataFrame(
        [{"rank": r, "seed": s, "directions": d, "value": v * r}
         for r in (4, 64) for s in (0, 1) for d, v in (("ΔW", 0.3), ("W", 20.0), ("random", 0.02))]),
    "energy_rank": lambda: pd.DataFrame(
        [{"layer": l, "module": m, "group": g, "seed": 0, "value": 10 + 5 * l}
         for l in range(3) for m, g in (("q_proj", "attention"), ("up_proj", "MLP"))]
        + [{"module": "LoRA r = 16", "group": "reference", "value": 16.0}]),
    "energy_rank_bars": lambda: pd.DataFrame(
        [{"module": m, "group": "MLP", "tau": t, "value": v}
         for m in ("q_proj", "up_proj") for t, v in (("k_50", 3), ("k_90", 40))]
        + [{"module": "LoRA r = 16", "group": "reference", "tau": None, "value": 16.0}]),
    "truncation_curve": lambda: pd.DataFrame(
        [{"curve": c, "k": k, "value": v} for c in ("gain share, full-s0", "energy share")
         for k, v in ((1, 0.3), (2, 0.6), (4, 0.92), (576, 1.0))]),
}


def test_every_plot_function_has_a_synthetic_case():
    assert set(SYNTHETIC) == set(plots.PLOTS)


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_plot_function_returns_its_axes(name):
    df = SYNTHETIC[name]()
    with plots.style():
        fig, ax = plt.subplots()
        assert plots.PLOTS[name](df, ax=ax) is ax           # draws on the Axes given
        own = plots.PLOTS[name](df)                          # or on a new one
    assert isinstance(own, matplotlib.axes.Axes) and own is not ax
    assert own.get_xlabel() or name == "energy_rank_bars"


def test_heatmap_puts_i_down_the_rows_and_has_a_colour_bar():
    ax = plots.subspace_heatmap(_grid(3, 5))
    img = ax.images[0].get_array()
    assert img.shape == (3, 5)
    assert img[1, 4] == pytest.approx(1 / (2 * 5))          # row i = 2, column j = 5
    assert ax.images[0].get_clim() == (0.0, 1.0)             # one scale for every panel
    assert len(ax.figure.axes) == 2                          # the colour bar
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("j", "i")


def test_rank_lines_draw_seed_means_with_spread_and_full_as_a_line():
    df = _rank_rows(("a",))
    ax = plots.metric_vs_rank(df)
    bars = ax.containers[0]
    y = bars.lines[0].get_ydata()
    assert list(y) == pytest.approx([1.5, 2.5, 8.5])         # mean over the two seeds
    hlines = [l for l in ax.get_lines() if len(set(l.get_ydata())) == 1 and l.get_xdata()[0] == 0]
    assert {round(l.get_ydata()[0], 6) for l in hlines} == {3.5, 20.0}   # full mean, base
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "8"]
    assert ax.get_legend().get_texts()[0].get_text() == "a"  # LoRA first in the legend


def test_draw_figure_lays_out_panels_and_rejects_unknown_plots():
    a = SYNTHETIC["metric_vs_rank"]().assign(plot="metric_vs_rank", panel="left")
    b = SYNTHETIC["subspace_heatmap"]().assign(plot="subspace_heatmap", panel="right")
    fig = draw_figure(pd.concat([a, b]), caption="a caption")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["left", "right"]
    assert any(t.get_text() == "a caption" for t in fig.texts)
    with pytest.raises(InputError, match="unknown plot 'nope'"):
        draw_figure(a.assign(plot="nope"))
    with pytest.raises(InputError, match="'plot' and 'panel'"):
        draw_figure(SYNTHETIC["metric_vs_rank"]())


def test_energy_shares_known_by_construction():
    spectra = pd.DataFrame({"run": "full-s0", "name": ["a"] * 3 + ["b"] * 3,
                            "sigma": [2.0, 1.0, 1.0, 1.0, 1.0, 0.0]})
    e = energy_shares(spectra, [1, 2, 3])
    # a: 4/6, 5/6, 1; b: 1/2, 1, 1 → medians
    assert e["value"].tolist() == pytest.approx([(4 / 6 + 0.5) / 2, (5 / 6 + 1) / 2, 1.0])


def test_module_group():
    assert module_group("model.layers.3.self_attn.q_proj") == "attention"
    assert module_group("encoder.layer.0.attention.self.query") == "attention"
    assert module_group("model.layers.3.mlp.up_proj") == "MLP"


# ------------------------------------------------------------ on the tiny real pipeline

@pytest.fixture(scope="module")
def quick_tables(tmp_path_factory):
    """{label: tables} of the quick variant's shared sweep, truncation included."""
    from rankscope.outputs.experiments import load_experiment, resolve
    from rankscope.pipeline.figures import run_experiment
    from rankscope.store.results import load_tables

    root = tmp_path_factory.getbasetemp() / "figure-runs"     # shared with test_experiments
    path = f"{EXPERIMENTS}/truncation.yaml"
    run_experiment(path, variant="quick", out=tmp_path_factory.mktemp("figs"), runs_root=root,
                   log=lambda s: None)
    exp = load_experiment(path)
    cfgs, _, _ = resolve(exp, "quick")
    (cfg,) = cfgs.values()
    from rankscope.outputs.experiments import sweep_folder

    folder = sweep_folder(cfg, next(iter(exp.sweeps.values()))[0], "quick", root)
    return {"LoRA": load_tables(folder.with_name(folder.name + "-results"))}


@pytest.mark.slow
@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_builders_on_real_tables_draw_with_every_plot(quick_tables, builder):
    df = BUILDERS[builder](quick_tables)
    assert list(df.columns[:2]) == ["plot", "panel"]
    assert set(df["plot"]) <= set(plots.PLOTS) and len(df)
    for kind, rows in df.groupby("plot"):
        ax = plots.PLOTS[kind](rows[rows["panel"] == rows["panel"].iloc[0]].dropna(axis=1, how="all"))
        assert isinstance(ax, matplotlib.axes.Axes)
    fig = draw_figure(df)
    assert len([a for a in fig.axes if a.get_title()]) == df["panel"].nunique()


@pytest.mark.slow
def test_builders_fail_loudly_on_missing_tables(quick_tables):
    tables = dict(quick_tables["LoRA"])
    del tables["subspace_grid"]
    with pytest.raises(InputError, match="subspace_grid"):
        BUILDERS["subspace_ranks"]({"x": tables})
    with pytest.raises(InputError, match="layer 99"):
        BUILDERS["relation"](quick_tables, layer=99)


# ------------------------------------------------------------ rankscope plot (re-drawing)

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
