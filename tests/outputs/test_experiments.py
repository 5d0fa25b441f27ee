"""Every YAML under experiments/ loads, every paper experiment has a header and every variant,
equal sweep configs share one folder, and a bad experiment file names its problem. The quick
variants run end to end and re-draw through the CLI in tests/cli/test_cli_figures.py.
"""
from __future__ import annotations

import pytest
from study_fixtures import CONTROL_FIGURES, OTHER, PAPER, ROOT, runs_root  # noqa: F401
from study_fixtures import write_experiment as _write

from rankscope.train.config import PROFILES, SweepConfig, build_sweep, load_yaml
from rankscope.errors import InputError
from rankscope.outputs.experiments import VARIANTS, load_experiment, resolve
from rankscope.pipeline.figures import sweep_folder


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
    cpu, _, _ = resolve(exp, "cpu")         # the cpu-paper profile, on MiniLM's topic task
    steps = PROFILES["cpu-paper"]["steps"]     # or doubled once, by the profile's gate rule
    assert all(c.profile == "cpu-paper" and c.model == "minilm-l6" and c.task == "topic"
               and c.steps in (steps, 2 * steps) and c.lr_search for c in cpu.values())
    assert next(iter(cpu.values())).steps == steps
    first = next(iter(cpu.values()))         # the shared sweep: the seeds' spread comes from it
    ranks = PROFILES["cpu-paper"]["ranks"]    # all of them, or a subset spanning them
    assert len(first.seeds) >= 3 and set(first.ranks) <= set(ranks)
    assert (min(first.ranks), max(first.ranks)) == (min(ranks), max(ranks))
    gpu, _, _ = resolve(exp, "gpu")
    assert all(c.max_eval_examples is None and c.steps >= 1000 for c in gpu.values())


@pytest.mark.parametrize("path", CONTROL_FIGURES, ids=lambda p: p.stem)
def test_a_control_figure_draws_the_control_as_declared(path):
    """Its cpu and gpu variants are the control's own sweep, unchanged: a figure of a control
    run at other settings would not show the control's answer."""
    exp = load_experiment(path)
    assert set(exp.variants) == set(VARIANTS)
    assert any(f"rankscope figures experiments/controls/figures/{path.name}" in line
               for line in path.read_text().splitlines() if line.startswith("#"))
    (file, own), = exp.sweeps.values()
    control = build_sweep(yaml_path=file)
    assert control.task == "planted" and not own
    for variant in ("cpu", "gpu"):
        cfgs, _, _ = resolve(exp, variant)
        assert list(cfgs.values()) == [control]


def test_experiments_share_their_sweep_folders(runs_root):
    """Equal sweep configs → one folder: `make figures` trains the shared sweep once."""
    for variant in VARIANTS:
        folders = set()
        for path in PAPER:
            exp = load_experiment(path)
            cfgs, _, _ = resolve(exp, variant)
            folders |= {sweep_folder(c, file, variant, runs_root)
                        for c, (file, _) in zip(cfgs.values(), exp.sweeps.values())}
        # {Wq, Wv} with full under Hu et al.'s protocol (shared by every figure of theirs and
        # the full-update figures), {Wq} alone, {Wq, Wv} with full under α = 2r (the intruder,
        # MLP and α-policy figures), rsLoRA, LoRA on the MLP and on every linear module, and
        # the convergence figure's sweep (full fine-tuning on the targets alone)
        assert len(folders) == 7, (variant, folders)


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


def test_the_caption_names_a_sweep_trained_differently_from_the_first():
    from rankscope.outputs.experiments import caption

    exp = load_experiment(ROOT / "experiments" / "paper" / "mlp_targets.yaml")
    cfgs, _, _ = resolve(exp, "cpu")
    text = caption(exp, "cpu", cfgs)
    assert "600 steps of 8×32 tokens; full fine-tuning + LoRA on {query, value}" in text
    assert ("LoRA on {intermediate.dense} at r ∈ {1, 4, 16, 64} (α = 2r, protocol "
            "biderman2024), seeds [0];") in text
    assert ("LoRA on {all-linear} at r ∈ {1, 4, 16, 64} (α = 2r, protocol biderman2024), "
            "seeds [0], 1200 steps of 8×32 tokens.") in text
    fig3 = load_experiment(ROOT / "experiments" / "paper" / "fig3_subspace.yaml")
    cfgs, _, _ = resolve(fig3, "cpu")
    assert "(α = 8, protocol hu2021), seeds [0, 1, 2]" in caption(fig3, "cpu", cfgs)

