"""Plot functions, figure data builders and drawing, on synthetic frames and real tables.
Re-drawing a figure from its CSV (``rankscope plot``) is tested in tests/cli/test_cli_plot.py.

The real tables are the quick variant's shared sweep (SmolLM2's first 2 blocks), trained
once per session under pytest's base temp folder, which tests/cli/test_cli_figures.py reuses.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from study_fixtures import SYNTHETIC, _close, _grid, _rank_rows  # noqa: E402, F401

from rankscope.outputs import plots as plots  # noqa: E402
from rankscope.errors import InputError  # noqa: E402
from rankscope.outputs.figure_data import BUILDERS, energy_shares, module_group  # noqa: E402
from rankscope.outputs.plots import draw_figure  # noqa: E402

EXPERIMENTS = "experiments/paper"


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


def test_rank_lines_draw_seed_medians_with_spread_and_full_as_a_line():
    df = _rank_rows(("a",))
    ax = plots.metric_vs_rank(df)
    bars = ax.containers[0]
    y = bars.lines[0].get_ydata()
    assert list(y) == pytest.approx([1.5, 2.5, 8.5])         # median of the two seeds
    hlines = [l for l in ax.get_lines() if len(set(l.get_ydata())) == 1 and l.get_xdata()[0] == 0]
    assert {round(l.get_ydata()[0], 6) for l in hlines} == {3.5, 20.0}   # full mean, base
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "8"]
    assert ax.get_legend().get_texts()[0].get_text() == "a"  # LoRA first in the legend


def test_rank_lines_draw_the_median_and_the_seeds_range_not_mean_and_sd():
    df = pd.DataFrame([{"series": "a", "method": "lora", "rank": 4, "seed": sd, "value": v}
                       for sd, v in enumerate((1.0, 2.0, 9.0))]
                      + [{"series": "full fine-tuning", "method": "full", "rank": None,
                          "seed": sd, "value": v} for sd, v in enumerate((3.0, 4.0, 11.0))])
    ax = plots.metric_vs_rank(df.assign(quantity="loss"))
    data_line, _, (whiskers,) = ax.containers[0].lines
    assert list(data_line.get_ydata()) == [2.0]                  # the median, not the mean 4
    (segment,) = whiskers.get_segments()
    assert sorted(segment[:, 1]) == [1.0, 9.0]                    # minimum to maximum
    full = [l for l in ax.get_lines() if l.get_label() == "full fine-tuning"]
    assert full[0].get_ydata()[0] == 4.0                          # full's median
    (band,) = ax.patches                                          # its range, 3 to 11
    assert (band.get_y(), band.get_y() + band.get_height()) == (3.0, 11.0)


def test_full_fine_tuning_in_its_series_colour_has_one_legend_entry():
    ax = plots.intruder_counts(SYNTHETIC["intruder_counts"]())
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts == ["ε = 0.5", "ε = 0.7", "full fine-tuning (dashed)"]


def test_energy_floors_are_drawn_per_module_with_one_legend_entry_per_kind():
    rows = [{"layer": 0, "module": m, "group": g, "value": v, "tau": "$k_{90}$"}
            for m, g, v in (("q_proj", "attention", 30.0), ("up_proj", "MLP", 60.0),
                            ("pooler", "head", 5.0))]
    floors = [{"module": m, "group": kind, "value": v}
              for kind, base in zip(plots.FLOORS, (200.0, 80.0))
              for m, v in (("q_proj", base), ("up_proj", base + 1), ("pooler", base + 2))]
    df = pd.DataFrame(rows + floors + [{"module": "LoRA r = 16", "group": "reference",
                                        "value": 16.0}])
    lines = plots.energy_rank(df)
    texts = [t.get_text() for t in lines.get_legend().get_texts()]
    assert texts == ["up_proj", "q_proj", "pooler", "LoRA r = 16", "Gaussian floor",
                     "seed-to-seed floor"]                      # modules by group: MLP, attention, head
    levels = sorted(l.get_ydata()[0] for l in lines.get_lines() if list(l.get_xdata()) == [0, 1])
    assert levels == [16.0, 80.0, 81.0, 82.0, 200.0, 201.0, 202.0]
    bars = plots.energy_rank_bars(df)
    texts = [t.get_text() for t in bars.get_legend().get_texts()]
    assert texts[-2:] == ["Gaussian floor", "seed-to-seed floor"] and len(texts) == 4
    ticks = [t.get_text() for t in bars.get_xticklabels()]
    short = {(round(l.get_xdata()[0] + 0.45), l.get_ydata()[0]) for l in bars.get_lines()
             if len(l.get_xdata()) == 2 and round(l.get_xdata()[1] - l.get_xdata()[0], 6) == 0.9}
    assert short == {(ticks.index(m), v) for m, v in ((r["module"], r["value"]) for r in floors)}


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
    untrained = pd.DataFrame({"run": "full-s0", "name": ["c"] * 3, "sigma": [0.0] * 3})
    with_zero = energy_shares(pd.concat([spectra, untrained]), [1, 2, 3])  # full_scope: targets
    assert with_zero["value"].tolist() == e["value"].tolist()
    assert energy_shares(untrained, [1, 2]).empty


def test_module_group():
    assert module_group("model.layers.3.self_attn.q_proj") == "attention"
    assert module_group("encoder.layer.0.attention.self.query") == "attention"
    assert module_group("model.layers.3.mlp.up_proj") == "MLP"
    assert module_group("encoder.layer.0.output.dense") == "MLP"          # MiniLM's down-proj
    assert module_group("encoder.layer.0.attention.output.dense") == "attention"
    assert module_group("bert.pooler.dense") == "head"
    assert module_group("classifier") == "head"


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
    from rankscope.pipeline.figures import sweep_folder

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


def _policy_metrics(fro_by_rank: dict[int, float], loss_by_rank: dict[int, float]) -> pd.DataFrame:
    rows = [{"run": f"lora-r{r}-s0", "method": "lora", "rank": r, "seed": 0, "before_loss": 3.0,
             "after_loss": loss_by_rank[r], "delta_fro_median": f} for r, f in fro_by_rank.items()]
    rows.append({"run": "full-s0", "method": "full", "rank": None, "seed": 0, "before_loss": 3.0,
                 "after_loss": 1.0, "delta_fro_median": 9.0})
    return pd.DataFrame(rows)


def test_alpha_policies_draws_loss_and_update_size_per_policy_and_its_checks_read_them():
    from rankscope.outputs.in_shape import evaluate, reproduced
    from rankscope.outputs.experiments import load_experiment

    loss = {4: 1.5, 64: 1.5}
    results = {"α = 2r": {"metrics": _policy_metrics({4: 1.0, 64: 8.0}, loss)},
               "fixed α = 8": {"metrics": _policy_metrics({4: 1.0, 64: 0.5}, loss)},
               "rsLoRA": {"metrics": _policy_metrics({4: 1.0, 64: 2.8}, {4: 1.5, 64: 1.51})}}
    df = BUILDERS["alpha_policies"](results, metric="loss")
    fro = df[df["plot"] == "convergence_curves"].set_index(["series", "rank"])["value"]
    assert fro.to_dict() == {("α = 2r", 4): 1.0, ("α = 2r", 64): 8.0, ("fixed α = 8", 4): 1.0,
                             ("fixed α = 8", 64): 0.5, ("rsLoRA", 4): 1.0, ("rsLoRA", 64): 2.8}
    assert df[df["plot"] == "metric_vs_rank"]["panel"].iloc[0] == "held-out loss vs r, by α policy"
    checks = evaluate(df, list(load_experiment(f"{EXPERIMENTS}/alpha_policies.yaml").in_shape))
    assert [c["status"] for c in checks] == ["yes", "yes", "yes", "yes"]   # 1.51 ≤ 1.01 × 1.5
    results["rsLoRA"]["metrics"] = _policy_metrics({4: 1.0, 64: 9.0}, {4: 1.5, 64: 1.6})
    checks = evaluate(BUILDERS["alpha_policies"](results, metric="loss"),
                      list(load_experiment(f"{EXPERIMENTS}/alpha_policies.yaml").in_shape))
    assert [c["status"] for c in checks] == ["yes", "yes", "no", "no"]
    assert reproduced(checks) == "partly"


def test_metric_rank_of_a_sweep_without_full_runs_has_only_its_own_rows():
    with_full = _policy_metrics({8: 1.0, 64: 2.0}, {8: 1.5, 64: 1.2})
    lora_only = with_full[with_full["method"] == "lora"].assign(after_loss=[1.4, 1.1])
    df = BUILDERS["metric_rank"]({"{Wq, Wv}": {"metrics": with_full},
                                  "MLP": {"metrics": lora_only}}, metric="loss")
    assert df[["method", "series"]].notna().all().all()
    got = {(s, r): v for s, r, v in df[["series", "rank", "value"]].itertuples(index=False)
           if s != "base model"}
    assert {k: got[k] for k in got if k[0] != "full fine-tuning"} == {
        ("{Wq, Wv}", 8): 1.5, ("{Wq, Wv}", 64): 1.2, ("MLP", 8): 1.4, ("MLP", 64): 1.1}
    assert df[df["series"] == "full fine-tuning"]["value"].tolist() == [1.0]

