"""Every YAML under experiments/ loads, and every paper experiment's quick variant runs end to
end (sweep, compare, truncate, figure) and re-draws from its CSV through the CLI.

The quick variants share one sweep folder per distinct sweep config, under pytest's base temp
folder, so the whole file trains two tiny sweeps (SmolLM2's first 2 blocks, 3 steps).
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import click  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from rankscope.train.config import SweepConfig, build_sweep, load_yaml  # noqa: E402
from rankscope.errors import InputError  # noqa: E402
from rankscope.cli.read import figures as figures_command, plot as plot_command  # noqa: E402
from rankscope.outputs.experiments import VARIANTS, load_experiment, resolve  # noqa: E402
from rankscope.pipeline.figures import run_experiment, sweep_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PAPER = sorted((ROOT / "experiments" / "paper").glob("*.yaml"))
OTHER = sorted(p for p in (ROOT / "experiments").rglob("*.yaml") if p not in PAPER)


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "figure-runs"     # shared with test_plots


@pytest.fixture(scope="module")
def cli():
    group = click.Group("rankscope")
    group.add_command(figures_command)
    group.add_command(plot_command)
    return group


def test_the_paper_experiments_are_all_there():
    names = {p.stem for p in PAPER}
    assert {"fig3_subspace", "fig4_seeds", "table6_metric_vs_rank", "table7_delta_vs_w",
            "table18_loss_vs_rank", "intruders_shuttleworth", "energy_rank_biderman"} <= names


@pytest.mark.parametrize("path", OTHER, ids=lambda p: str(p.relative_to(ROOT)))
def test_sweep_configs_load(path):
    assert isinstance(build_sweep(yaml_path=path), SweepConfig)


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_experiment_loads_with_a_header_and_every_variant(path):
    exp = load_experiment(path)
    assert set(exp.variants) == set(VARIANTS)
    head = path.read_text().splitlines()
    assert head[0].startswith("# ") and any(f"rankscope figures experiments/paper/{path.name}" in l
                                             for l in head if l.startswith("#"))
    quick, _, _ = resolve(exp, "quick")
    assert all(c.model.endswith("@2l") and c.steps <= 4 and c.max_len <= 32
               for c in quick.values())
    cpu, _, _ = resolve(exp, "cpu")
    assert all(c.model == "smollm2-135m" for c in cpu.values())
    first = next(iter(cpu.values()))         # the shared sweep: the seeds' spread comes from it
    assert len(first.seeds) >= 2
    gpu, _, _ = resolve(exp, "gpu")
    assert all(c.max_eval_examples is None and c.steps >= 1000 for c in gpu.values())


def test_experiments_share_their_sweep_folders(runs_root):
    """Equal sweep configs → one folder: `make figures` trains the shared sweep once."""
    for variant in VARIANTS:
        folders = set()
        for path in PAPER:
            exp = load_experiment(path)
            cfgs, _, _ = resolve(exp, variant)
            folders |= {sweep_folder(c, file, variant, runs_root)
                        for c, (file, _) in zip(cfgs.values(), exp.sweeps.values())}
        assert len(folders) == 2, (variant, folders)      # {Wq, Wv} with full, and {Wq} alone


@pytest.mark.slow
@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_quick_variant_runs_end_to_end_and_redraws(path, runs_root, tmp_path, cli):
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
    (tmp_path / f"{name}.json").unlink()                  # the CSV alone suffices
    res = CliRunner().invoke(cli, ["plot", str(tmp_path / f"{name}.csv"),
                                   "--out", str(tmp_path / "again.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "again.png").stat().st_size > 10_000


@pytest.mark.slow
def test_figures_cli_runs_a_folder_with_all(runs_root, tmp_path, cli):
    folder = tmp_path / "exps"
    folder.mkdir()
    for name in ("table18_loss_vs_rank", "energy_rank_biderman"):
        text = (ROOT / "experiments" / "paper" / f"{name}.yaml").read_text()
        (folder / f"{name}.yaml").write_text(
            text.replace("../news_smollm2.yaml", str(ROOT / "experiments" / "news_smollm2.yaml")))
    out = tmp_path / "figs"
    res = CliRunner().invoke(cli, ["figures", str(folder), "--all", "--variant", "quick",
                                   "--out", str(out), "--runs-root", str(runs_root), "--quiet"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{n}.{ext}" for n in ("table18_loss_vs_rank", "energy_rank_biderman")
        for ext in ("csv", "json", "png"))
    res = CliRunner().invoke(cli, ["figures", str(folder), "--variant", "quick"])
    assert res.exit_code == 2 and "pass --all" in res.output


def _write(tmp_path, doc: dict, name="exp.yaml"):
    import yaml

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("model: smollm2-135m@2l\ntask: news\n")
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"result": "r", "figure": "metric_rank",
                                    "sweep": "sweep.yaml", "variants": {"quick": {}}, **doc}))
    return path


@pytest.mark.parametrize("doc, message", [
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"figure": "pie"}, "unknown figure 'pie'"),
    ({"settings": {"zoom": 3}}, "settings: unknown key 'zoom'"),
    ({"variants": {"tiny": {}}}, "unknown key 'tiny'"),
    ({"variants": {"quick": {"sweep": {"stepz": 3}}}}, "unknown config field 'stepz'"),
    ({"variants": {"quick": {"sweep": {"steps": 0}}}}, "steps: must be positive"),
    ({"truncate": {"k": [1]}}, "truncate: unknown key 'k'"),
    ({"sweeps": {"a": "sweep.yaml"}}, "one of 'sweep'"),
])
def test_invalid_experiments_name_the_problem(tmp_path, doc, message):
    with pytest.raises(InputError, match=message):
        load_experiment(_write(tmp_path, doc))


def test_cli_errors_are_one_line(tmp_path, cli):
    path = _write(tmp_path, {"colour": "red"})
    res = CliRunner().invoke(cli, ["figures", str(path), "--variant", "quick"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        f"rankscope: error: experiment {path}: unknown key 'colour'; known: "
        "result, figure, sweep, sweeps, settings, truncate, variants"]
    res = CliRunner().invoke(cli, ["figures", str(_write(tmp_path, {}, "ok.yaml")), "--variant", "gpu"])
    assert res.exit_code == 2 and "has no variant 'gpu'" in res.output
    res = CliRunner().invoke(cli, ["plot", str(tmp_path / "none.csv")])
    assert res.exit_code == 2 and "missing figure data" in res.output


def test_variant_overrides_apply_in_order(tmp_path):
    path = _write(tmp_path, {"sweep": None, "sweeps": {
        "a": "sweep.yaml", "b": {"file": "sweep.yaml", "targets": ["q_proj"], "steps": 7}},
        "variants": {"quick": {"sweep": {"steps": 3, "max_eval_examples": None},
                               "sweeps": {"b": {"ranks": [2]}}}}})
    doc = load_yaml(path)
    del doc["sweep"]
    path.write_text(__import__("yaml").safe_dump(doc))
    cfgs, settings, trunc = resolve(load_experiment(path), "quick")
    assert cfgs["a"].steps == 3 and cfgs["b"].steps == 3        # the variant wins over the sweep's own
    assert cfgs["b"].targets == ("q_proj",) and cfgs["b"].ranks == (2,)
    assert cfgs["a"].max_eval_examples is None                  # an explicit null is kept
    assert settings == {} and trunc is None
