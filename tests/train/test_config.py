"""Sweep configs: YAML in and out, validation naming the field, precedence, schedule, data order."""
from __future__ import annotations

import math

import pytest
import torch
import yaml

from rankscope.train.config import PROFILES, SweepConfig, build_sweep, dump_yaml, load_yaml, replace, \
    to_dict
from rankscope.errors import InputError
from rankscope.train.lr_search import search_rank
from rankscope.store.runs import RunId, run_name
from rankscope.train.loop import batch_order, lr_lambda


def _yaml(tmp_path, doc, name="sweep.yaml"):
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


# ---------------------------------------------------------------- YAML into SweepConfig

def test_yaml_loads_into_a_typed_frozen_config(tmp_path):
    path = _yaml(tmp_path, "# a sweep\nmodel: minilm-l6\ntask: sentiment\nranks: [4, 1]\n"
                           "seeds: 3\ntargets: [query, value]\nsteps: 12\nlr_lora: 2.0e-4\n")
    cfg = build_sweep(yaml_path=path)
    assert cfg.model == "minilm-l6" and cfg.task == "sentiment" and cfg.steps == 12
    assert cfg.ranks == (4, 1) and cfg.seeds == (3,) and cfg.targets == ("query", "value")
    assert cfg.lr_lora == pytest.approx(2e-4)
    assert cfg.max_len == SweepConfig().max_len                      # untouched default
    with pytest.raises(AttributeError):
        cfg.steps = 1                                                # frozen


def test_dumped_yaml_loads_back_to_an_equal_config(tmp_path):
    cfg = SweepConfig(model="m", task="qa", ranks=(2, 8), seeds=(0, 1), alpha_policy="rslora",
                      schedule="linear", max_train_examples=40, bf16=False)
    back = build_sweep(yaml_path=_yaml(tmp_path, dump_yaml(cfg)))
    assert back == cfg
    assert to_dict(back)["ranks"] == [2, 8]                           # YAML-safe lists


def test_an_empty_yaml_file_gives_the_defaults(tmp_path):
    assert build_sweep(yaml_path=_yaml(tmp_path, "")) == SweepConfig()


@pytest.mark.parametrize("doc, field", [
    ({"stepz": 3}, "stepz"),
    ({"steps": 3, "learning_rate": 1e-3}, "learning_rate"),
])
def test_an_unknown_field_is_named(tmp_path, doc, field):
    with pytest.raises(InputError, match=f"unknown config field '{field}'"):
        build_sweep(yaml_path=_yaml(tmp_path, doc))


@pytest.mark.parametrize("doc, field", [
    ({"steps": 0}, "steps"),
    ({"batch_size": -4}, "batch_size"),
    ({"grad_accum": 0}, "grad_accum"),
    ({"max_len": 0}, "max_len"),
    ({"checkpoint_every": 0}, "checkpoint_every"),
    ({"lr_full": 0.0}, "lr_full"),
    ({"lr_lora": -1e-3}, "lr_lora"),
    ({"alpha": 0}, "alpha"),
    ({"ranks": [4, 0]}, "ranks"),
    ({"ranks": []}, "ranks"),
    ({"methods": ["full", "qlora"]}, "methods"),
    ({"methods": []}, "methods"),
    ({"seeds": []}, "seeds"),
    ({"alpha_policy": "sqrt"}, "alpha_policy"),
    ({"schedule": "step"}, "schedule"),
    ({"warmup": 1.0}, "warmup"),
    ({"eval_fraction": 0.0}, "eval_fraction"),
    ({"targets": []}, "targets"),
    ({"data": "x.jsonl", "task_kind": "seq2seq"}, "task_kind"),
    ({"data": "x.jsonl", "task": "news", "task_kind": "lm"}, "task/data"),
    ({"full_scope": "head"}, "full_scope"),
    ({"strategy": "zero3"}, "strategy"),
    ({"planted_rank": 0}, "planted_rank"),
    ({"planted_scale": -1.0}, "planted_scale"),
    ({"planted_seed": "zero"}, "planted_seed"),
])
def test_an_invalid_value_is_an_error_naming_its_field(tmp_path, doc, field):
    with pytest.raises(InputError, match=rf"(^|\W){field}\b"):
        build_sweep(yaml_path=_yaml(tmp_path, doc))


def test_ranks_are_not_checked_when_lora_is_not_run():
    assert build_sweep(overrides={"methods": ("full",), "ranks": (0,)}).methods == ("full",)


@pytest.mark.parametrize("doc, match", [
    ("steps: [1, 2", "invalid YAML"),
    ("- 1\n- 2\n", "must be a mapping"),
])
def test_a_bad_yaml_document_is_an_input_error(tmp_path, doc, match):
    with pytest.raises(InputError, match=match):
        build_sweep(yaml_path=_yaml(tmp_path, doc))


def test_a_missing_yaml_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="missing config file"):
        load_yaml(tmp_path / "nope.yaml")


def test_replace_validates_again():
    with pytest.raises(InputError, match="^steps"):
        replace(SweepConfig(), steps=-1)


# ---------------------------------------------------------------- precedence

def test_precedence_is_defaults_then_profile_then_yaml_then_flags(tmp_path):
    quick = PROFILES["quick"]
    default = SweepConfig()
    assert quick["max_eval_examples"] != default.max_eval_examples   # the profile changes it
    path = _yaml(tmp_path, {"profile": "quick", "batch_size": 4, "steps": 7, "schedule": "linear"})
    cfg = build_sweep(yaml_path=path, overrides={"steps": 9, "schedule": None})
    assert cfg.profile == "quick"
    assert cfg.max_eval_examples == quick["max_eval_examples"]       # profile over default
    assert cfg.batch_size == 4                                       # YAML over profile
    assert cfg.schedule == "linear"                                  # None: flag not given
    assert cfg.steps == 9                                            # flag over YAML
    assert cfg.lr_full == default.lr_full                            # default where none set


def test_a_profile_flag_beats_the_yaml_profile_and_the_argument(tmp_path):
    path = _yaml(tmp_path, {"profile": "quick"})
    cfg = build_sweep(profile="quick", yaml_path=path, overrides={"profile": "paper"})
    assert cfg.profile == "paper" and cfg.steps == PROFILES["paper"]["steps"]
    assert build_sweep(profile="paper").seeds == PROFILES["paper"]["seeds"]


def test_a_profile_flag_resizes_a_yaml_that_pins_its_sizes():
    """`rankscope sweep experiments/news_smollm2.yaml --profile paper` is the paper sweep."""
    path = "experiments/news_smollm2.yaml"
    quick = build_sweep(yaml_path=path)
    paper = build_sweep(yaml_path=path, overrides={"profile": "paper", "steps": None})
    assert quick.steps == 24 and quick.seeds == (0,)
    for key, value in PROFILES["paper"].items():
        assert getattr(paper, key) == value, key
    assert paper.targets == quick.targets and paper.task == quick.task     # not sizes: kept
    assert build_sweep(yaml_path=path, overrides={"profile": "paper", "steps": 5}).steps == 5


@pytest.mark.parametrize("task, model, targets", [
    ("news", "smollm2-135m", ("q_proj", "v_proj")), ("qa", "smollm2-135m", ("q_proj", "v_proj")),
    ("sentiment", "minilm-l6", ("query", "value")), ("topic", "minilm-l6", ("query", "value"))])
def test_a_task_brings_its_model_and_that_models_wq_wv(task, model, targets):
    cfg = build_sweep(profile="quick", overrides={"task": task})
    assert (cfg.model, cfg.targets) == (model, targets)
    other = build_sweep(overrides={"task": task, "model": "./my-model", "targets": ("dense",)})
    assert (other.model, other.targets) == ("./my-model", ("dense",))   # given: kept


@pytest.mark.parametrize("field, value, message", [
    ("steps", "ten", "steps: expected an integer, got 'ten'"),
    ("steps", 2.5, "steps: expected an integer"),
    ("ranks", ["a"], "ranks: expected a list of integers"),
    ("alpha", "x", "alpha: expected a number, got 'x'"),
    ("warmup", True, "warmup: expected a number"),
    ("targets", [1], "targets: expected a list of names"),
    ("bf16", "yes", "bf16: expected true, false or null"),
    ("model", 3, "model: expected a string")])
def test_a_wrongly_typed_yaml_value_is_named(tmp_path, field, value, message):
    with pytest.raises(InputError, match="^" + message.replace("(", r"\(")):
        build_sweep(yaml_path=_yaml(tmp_path, {field: value}))


def test_an_unknown_profile_is_named():
    with pytest.raises(InputError, match="profile: unknown 'fast'"):
        build_sweep(profile="fast")


@pytest.mark.parametrize("profile", [None, "quick"])
def test_a_data_file_replaces_the_default_or_profile_task(profile):
    # the CLI passes every flag, None where it was not given
    flags = {"data": "mine.jsonl", "task_kind": "sft", "task": None, "model": None}
    cfg = build_sweep(profile=profile, overrides=flags)
    assert cfg.task is None and cfg.data == "mine.jsonl" and cfg.task_kind == "sft"


def test_a_data_file_with_an_explicit_task_is_refused(tmp_path):
    with pytest.raises(InputError, match="task/data"):
        build_sweep(overrides={"data": "mine.jsonl", "task_kind": "lm", "task": "news"})
    with pytest.raises(InputError, match="task/data"):
        build_sweep(yaml_path=_yaml(tmp_path, {"task": "news"}),
                    overrides={"data": "mine.jsonl", "task_kind": "lm"})


def test_a_folder_written_before_a_field_existed_still_resumes(tmp_path):
    """sweep.yaml and a run's config.yaml lack full_scope and planted_*: they read as their
    defaults (the values such a folder trained with); a changed value is still refused."""
    from rankscope.train.run_folder import claim_run_dir, run_config_text
    from rankscope.train.sweep import claim_sweep_dir

    new = ("full_scope", "planted_rank", "planted_scale", "planted_seed", "strategy")
    cfg = SweepConfig(steps=3)
    out = tmp_path / "sweep"
    out.mkdir()
    old = {k: v for k, v in to_dict(cfg).items() if k not in new}
    (out / "sweep.yaml").write_text(yaml.safe_dump(old))
    claim_sweep_dir(out, cfg)
    run = cfg.runs()[0]
    text = yaml.safe_load(run_config_text(cfg, run))
    (out / run.name).mkdir()
    (out / run.name / "config.yaml").write_text(yaml.safe_dump(
        {k: v for k, v in text.items() if k not in new}))
    claim_run_dir(out / run.name, run_config_text(cfg, run))
    with pytest.raises(InputError, match=r"differs in: full_scope\)"):
        claim_sweep_dir(out, replace(cfg, full_scope="linear"))
    with pytest.raises(InputError, match=r"differs in: full_scope\)"):
        claim_run_dir(out / run.name, run_config_text(replace(cfg, full_scope="linear"), run))


# ---------------------------------------------------------------- grid and α

def test_the_grid_puts_full_first_and_sorts_ranks_per_seed():
    cfg = SweepConfig(ranks=(8, 1, 4), seeds=(1, 0))
    assert cfg.runs() == [("full", None, 1), ("lora", 1, 1), ("lora", 4, 1), ("lora", 8, 1),
                          ("full", None, 0), ("lora", 1, 0), ("lora", 4, 0), ("lora", 8, 0)]
    assert SweepConfig(methods=("lora",), ranks=(2,)).runs() == [("lora", 2, 0)]


def test_a_grid_cell_names_its_run_folder_and_unpacks_as_a_triple():
    full, lora = SweepConfig(ranks=(8,), seeds=(3,)).runs()
    assert isinstance(full, RunId) and (full.name, lora.name) == ("full-s3", "lora-r8-s3")
    method, rank, seed = lora
    assert (method, rank, seed) == (lora.method, lora.rank, lora.seed) == ("lora", 8, 3)
    assert lora.name == run_name(method, rank, seed)


@pytest.mark.parametrize("policy, alpha_of_r", [
    ("fixed", lambda r: 2.0), ("scaled", lambda r: 2.0 * r), ("rslora", lambda r: 2.0)])
def test_lora_alpha_follows_the_policy(policy, alpha_of_r):
    cfg = SweepConfig(alpha_policy=policy, alpha=2.0)
    for r in (1, 4, 64):
        assert cfg.lora_alpha(r) == alpha_of_r(r)


def test_the_training_view_leaves_out_the_grid_and_labels():
    view = SweepConfig(profile="quick").training_view()
    assert not {"methods", "ranks", "seeds", "profile", "device"} & set(view)
    assert view["steps"] == SweepConfig().steps and "lr_lora" in view


# ---------------------------------------------------------------- learning-rate schedule

@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warm_up_rises_linearly_to_the_peak(schedule):
    got = [lr_lambda(s, total=25, warmup=0.2, schedule=schedule) for s in range(6)]
    assert got == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])   # 5 warm-up steps, then peak


@pytest.mark.parametrize("step, cosine, linear", [
    (5, 1.0, 1.0),                                   # first step after warm-up
    (10, 0.5 * (1 + math.cos(math.pi / 4)), 0.75),   # a quarter through the decay
    (15, 0.5, 0.5),                                  # half way
    (20, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.25),
    (25, 0.0, 0.0),                                  # the end
])
def test_decay_after_warm_up(step, cosine, linear):
    kw = dict(total=25, warmup=0.2)
    assert lr_lambda(step, schedule="cosine", **kw) == pytest.approx(cosine, abs=1e-12)
    assert lr_lambda(step, schedule="linear", **kw) == pytest.approx(linear, abs=1e-12)
    assert lr_lambda(step, schedule="constant", **kw) == 1.0


def test_no_warm_up_starts_at_the_peak():
    assert lr_lambda(0, total=10, warmup=0.0, schedule="cosine") == 1.0
    assert lr_lambda(0, total=10, warmup=0.0, schedule="linear") == 1.0


def test_lambda_lr_applies_the_schedule_to_each_step():
    p = torch.nn.Parameter(torch.zeros(()))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, total=8, warmup=0.25, schedule="linear"))
    used = []
    for _ in range(8):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert used == pytest.approx([0.05, 0.1, 0.1, 0.1 * 5 / 6, 0.1 * 4 / 6, 0.1 * 3 / 6,
                                  0.1 * 2 / 6, 0.1 / 6])


# ---------------------------------------------------------------- batch order

def test_batch_order_is_a_function_of_the_seed():
    a = batch_order(50, steps=7, per_step=4, seed=3)
    assert a.shape == (7, 4) and a.dtype == torch.long
    assert torch.equal(a, batch_order(50, steps=7, per_step=4, seed=3))
    assert not torch.equal(a, batch_order(50, steps=7, per_step=4, seed=4))


def test_batch_order_leaves_the_global_generator_alone():
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    batch_order(50, steps=7, per_step=4, seed=3)
    assert torch.equal(torch.rand(3), expected)


def test_batch_order_runs_through_whole_epochs_of_permutations():
    n = 10
    order = batch_order(n, steps=7, per_step=4, seed=0).flatten()    # 28 draws: 2.8 epochs
    for epoch in range(2):
        assert sorted(order[epoch * n:(epoch + 1) * n].tolist()) == list(range(n))
    assert len(set(order[2 * n:].tolist())) == 8                     # a partial epoch, no repeat


def test_a_longer_run_sees_the_shorter_runs_batches_first():
    short = batch_order(30, steps=4, per_step=4, seed=0)
    long = batch_order(30, steps=12, per_step=4, seed=0)
    assert torch.equal(long[:4], short)



def test_a_sweep_folder_is_the_same_sweep_whatever_profile_label_set_its_values(tmp_path):
    """``rankscope run`` labels the sweep with the profile it started from, ``figures`` with
    none; the same values are the same sweep, and a value the profile changed still counts."""
    from rankscope.train.sweep import claim_sweep_dir

    labelled = build_sweep(profile="quick", overrides={"steps": 7})
    claim_sweep_dir(tmp_path, labelled)
    claim_sweep_dir(tmp_path, replace(labelled, profile=None))
    with pytest.raises(InputError, match=r"differs in: steps\)"):
        claim_sweep_dir(tmp_path, replace(labelled, profile=None, steps=8))


def test_a_protocol_names_its_alpha_policy_and_the_profiles_follow_hu():
    for name in ("quick", "cpu-paper", "paper"):
        cfg = build_sweep(profile=name)
        assert (cfg.protocol, cfg.alpha_policy, len(cfg.seeds)) == ("hu2021", "fixed", 3)
        assert cfg.alpha == search_rank(cfg.ranks)      # α = the rank the rate is tuned at
    with pytest.raises(InputError, match="protocol: hu2021 trains with alpha_policy fixed"):
        SweepConfig(model="m", task="qa", protocol="hu2021", alpha_policy="scaled")
    with pytest.raises(InputError, match="protocol: unknown 'hu'"):
        SweepConfig(model="m", task="qa", protocol="hu")
    for bad in (0.0, float("nan"), float("inf")):
        with pytest.raises(InputError, match="equivalence_margin"):
            SweepConfig(model="m", task="qa", equivalence_margin=bad)
    with pytest.raises(InputError, match="equivalence_metric: unknown 'f1'"):
        SweepConfig(model="m", task="qa", equivalence_metric="f1")
