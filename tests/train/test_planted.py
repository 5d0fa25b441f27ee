"""The planted-rank task: ΔW* of exactly the planted rank and scale, the teacher, the distillation
loss (0 for the teacher, > 0 for the base model, reduced by training), the config's checks, and a
planted sweep end to end (its teacher file, named by hash in every run)."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from rankscope.cli import main
from rankscope.errors import InputError
from rankscope.store.runs import PLANTED, RunId, read_tensors, tensor_hash
from rankscope.train.config import PLANTED_SCALE, build_sweep
from rankscope.train.data import prepare
from rankscope.train.device import Dist
from rankscope.train.evaluation import evaluate
from rankscope.train.loop import batch_order, make_optimizer, train_steps
from rankscope.train.model_setup import build_model, load_task_model
from rankscope.train.models import linear_weight
from rankscope.train.planted import (
    add_planted,
    planted_factors,
    planted_ranks,
    planted_update,
)

CPU = torch.device("cpu")
TINY = dict(task="planted", batch_size=4, max_len=32, max_eval_examples=8, max_train_examples=32,
            bf16=False)


def _cfg(model, **changes):
    """A planted config on a model folder; a MiniLM folder's targets are query and value."""
    mini = {"targets": ("query", "value")} if "minilm" in str(model) else {}
    return build_sweep(overrides={**TINY, "model": str(model), **mini, **changes})


def _svals(factors, name) -> torch.Tensor:
    delta = factors[f"{name}.lora_B"].double() @ factors[f"{name}.lora_A"].double()
    return torch.linalg.svdvals(float(factors[f"{name}.scaling"]) * delta)


# ---------------------------------------------------------------- ΔW* by construction

@pytest.mark.parametrize("d_out, d_in, rank", [(384, 384, 4), (192, 576, 8), (50, 20, 20)])
def test_a_planted_update_has_exactly_its_rank_and_norm(d_out, d_in, rank):
    b, a = planted_update(d_out, d_in, rank, fro=3.0, generator=torch.Generator().manual_seed(0))
    assert b.shape == (d_out, rank) and a.shape == (rank, d_in)
    s = torch.linalg.svdvals(b @ a)
    # r equal singular values 3/√r, and nothing else: rank exactly r
    torch.testing.assert_close(s[:rank], torch.full((rank,), 3.0 / rank ** 0.5, dtype=s.dtype))
    assert all(float(v) < 1e-12 for v in s[rank:])
    assert float(torch.linalg.norm(b @ a)) == pytest.approx(3.0, rel=1e-12)


def test_the_teachers_update_has_the_planted_rank_and_scale_on_every_target(minilm_slice):
    cfg = _cfg(minilm_slice, planted_rank={"query": 2, "value": 8}, planted_scale=0.3)
    model = load_task_model(cfg, kind="distill", num_labels=None)
    ranks = planted_ranks(model, cfg.targets, cfg.planted_rank)
    assert ranks == {f"encoder.layer.{i}.attention.self.{m}": r for i in (0, 1)
                     for m, r in (("query", 2), ("value", 8))}
    factors = planted_factors(model, ranks, scale=0.3, seed=0)
    assert len(factors) == 3 * 4 and all(t.dtype == torch.float32 for t in factors.values())
    for name, r in ranks.items():
        w0 = linear_weight(model.get_submodule(name)).detach().double()
        s = _svals(factors, name)
        fro = 0.3 * float(torch.linalg.norm(w0))
        torch.testing.assert_close(s[:r], torch.full((r,), fro / r ** 0.5, dtype=s.dtype),
                                   rtol=1e-6, atol=0)
        assert float(s[r]) < 1e-6 * float(s[0])                  # float32 factors: rank r
        assert float(s.square().sum().sqrt()) == pytest.approx(fro, rel=1e-6)

    # the teacher's weights are W₀ + ΔW*, and only on the targets
    teacher = prepare(cfg).teacher
    assert teacher.hash == tensor_hash(factors)
    for n, p in teacher.model.named_parameters():
        base = model.get_parameter(n)
        module = n.removesuffix(".weight")
        if module in ranks:
            delta = factors[f"{module}.lora_B"].double() @ factors[f"{module}.lora_A"].double()
            torch.testing.assert_close(p.double() - base.double(), delta, rtol=0, atol=1e-6)
        else:
            assert torch.equal(p, base), n


def test_the_planted_seed_alone_draws_the_update(minilm_slice):
    model = load_task_model(_cfg(minilm_slice), kind="distill", num_labels=None)
    ranks = planted_ranks(model, ("query", "value"), 4)
    one, again = (planted_factors(model, ranks, scale=0.2, seed=0) for _ in range(2))
    torch.manual_seed(123)                                         # the global stream: unused
    other = planted_factors(model, ranks, scale=0.2, seed=1)
    assert tensor_hash(one) == tensor_hash(again) != tensor_hash(other)


def test_smollm2s_targets_are_q_and_v_proj_with_gqas_shapes(smollm2_slice):
    cfg = _cfg(smollm2_slice, planted_rank={"q_proj": 2, "v_proj": 8})
    assert cfg.targets == ("q_proj", "v_proj")
    model = load_task_model(cfg, kind="distill", num_labels=None)
    factors = planted_factors(model, planted_ranks(model, cfg.targets, cfg.planted_rank),
                              scale=0.2, seed=0)
    name = "layers.1.self_attn.v_proj"                 # the backbone: no "model." prefix
    assert factors[f"{name}.lora_B"].shape == (192, 8)             # GQA: v_proj is 192 × 576
    assert factors[f"{name}.lora_A"].shape == (8, 576)
    assert int((_svals(factors, name) > 1e-6 * _svals(factors, name)[0]).sum()) == 8


# ---------------------------------------------------------------- config checks

def test_planted_with_no_other_flag_is_minilm_with_its_query_and_value():
    cfg = build_sweep(overrides={"task": "planted"})
    assert (cfg.model, cfg.targets) == ("minilm-l6", ("query", "value"))
    assert (cfg.planted_rank, cfg.planted_scale, cfg.planted_seed) == (4, PLANTED_SCALE, 0)
    slice_cfg = build_sweep(overrides={"task": "planted", "model": "minilm-l6@2l"})
    assert slice_cfg.targets == ("query", "value")                 # a slice of it too


@pytest.mark.parametrize("rank", [0, -2, {"query": 0}, {}, 2.5, {"query": "two"}])
def test_a_planted_rank_that_is_not_positive_is_a_value_error_naming_it(rank):
    with pytest.raises(ValueError, match="^planted_rank: "):
        build_sweep(overrides={"task": "planted", "planted_rank": rank})


@pytest.mark.parametrize("scale", [0.0, -0.1, float("inf")])
def test_a_planted_scale_that_is_not_positive_is_a_value_error_naming_it(scale):
    with pytest.raises(ValueError, match="^planted_scale: "):
        build_sweep(overrides={"task": "planted", "planted_scale": scale})


@pytest.mark.parametrize("rank, match", [
    (385, r"^planted_rank: 385 is larger than min\(d_out, d_in\) = 384 of query"),
    ({"query": 2, "value": 400}, r"^planted_rank: 400 is larger than .* = 384 of value"),
    ({"query": 2}, r"^planted_rank: no rank for target module encoder.layer.0.attention.self.value"),
    ({"query": 2, "value": 2, "key": 2}, r"^planted_rank: 'key' names no target module"),
])
def test_a_planted_rank_the_model_cannot_hold_is_refused_before_anything_is_written(
        minilm_slice, tmp_path, rank, match):
    from rankscope.train.sweep import run_sweep

    cfg = _cfg(minilm_slice, planted_rank=rank)
    with pytest.raises(InputError, match=match) as err:
        prepare(cfg)
    assert isinstance(err.value, ValueError)
    with pytest.raises(InputError, match=match):
        run_sweep(cfg, tmp_path / "out", progress=False, log=lambda s: None)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- data and the loss

def test_the_planted_rows_are_news_blocks_framed_as_each_tokenizer_frames_a_text(
        minilm_slice, smollm2_slice):
    from rankscope.train.data import load_tokenizer
    from rankscope.train.encoding import encode

    mini = encode("distill", load_tokenizer(str(minilm_slice)), [{"text": "one two three"}] * 9,
                  max_len=8)
    assert set(mini) == {"input_ids", "attention_mask"}                 # no labels: a teacher
    assert (mini["input_ids"][:, 0] == 101).all() and (mini["input_ids"][:, -1] == 102).all()
    assert mini["input_ids"].shape[1] == 8 and bool(mini["attention_mask"].all())
    smol = encode("distill", load_tokenizer(str(smollm2_slice)), [{"text": "one two three"}] * 9,
                  max_len=8)
    lm = encode("lm", load_tokenizer(str(smollm2_slice)), [{"text": "one two three"}] * 9,
                max_len=8)
    assert torch.equal(smol["input_ids"], lm["input_ids"])              # SmolLM2 adds nothing


@pytest.mark.parametrize("which", ["minilm", "smollm2"])
def test_the_distillation_loss_is_0_for_the_teacher_and_positive_for_the_base(
        which, minilm_slice, smollm2_slice):
    cfg = _cfg(minilm_slice if which == "minilm" else smollm2_slice)
    task = prepare(cfg)
    assert task.kind == "distill"
    student = load_task_model(cfg, kind="distill", num_labels=None)
    base = evaluate(student, task.eval, kind="distill", device=CPU, bf16=False)
    add_planted(student, task.teacher.factors)                     # the student is the teacher
    same = evaluate(student, task.eval, kind="distill", device=CPU, bf16=False)
    assert set(base) == {"loss"} and base["loss"] > 1e-4
    assert same == {"loss": 0.0}
    assert not [m for m in student.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]


@pytest.mark.slow
def test_a_few_full_fine_tuning_steps_reduce_the_distillation_loss(minilm_slice):
    cfg = _cfg(minilm_slice, steps=8, lr_full=1e-4, warmup=0.0, schedule="constant")
    task = prepare(cfg)
    model = build_model(cfg, task, RunId("full", None, 0))
    before = evaluate(model, task.eval, kind="distill", device=CPU, bf16=False)["loss"]
    opt, sched = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg,
                                method="full")
    order = batch_order(len(task.train["input_ids"]), steps=8, per_step=4, seed=0)
    model.train()
    losses = [s.loss for s in train_steps(model, task, order, cfg=cfg, dist=Dist(), bf16=False,
                                          opt=opt, sched=sched)]
    after = evaluate(model, task.eval, kind="distill", device=CPU, bf16=False)["loss"]
    assert after < 0.8 * before and losses[-1] < losses[0]


# ---------------------------------------------------------------- a planted sweep

@pytest.mark.slow
def test_a_planted_sweep_saves_its_teacher_once_and_names_it_in_every_run(minilm_slice,
                                                                          tmp_path):
    out = tmp_path / "planted"
    args = ["sweep", "--task", "planted", "--model", str(minilm_slice), "--targets",
            "query,value", "--ranks", "2", "--steps", "3", "--batch-size", "4", "--max-len", "32",
            "--max-eval-examples", "8", "--no-bf16", "--quiet", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    factors, meta = read_tensors(out / PLANTED)
    assert meta["method"] == "planted" and json.loads(meta["planted_rank"]) == 4
    assert json.loads(meta["planted_scale"]) == PLANTED_SCALE
    assert json.loads(meta["planted_seed"]) == 0
    for run in ("full-s0", "lora-r2-s0"):
        m = json.loads((out / run / "manifest.json").read_text())
        assert m["task"] == "planted" and m["task_kind"] == "distill"
        assert m["planted_hash"] == tensor_hash(factors)
        assert (m["planted_rank"], m["planted_seed"]) == (4, 0)
        assert set(m["eval_after"]) == {"loss"}
        assert 0 < m["eval_after"]["loss"] < m["eval_before"]["loss"]
    base = json.loads((out / "base_eval.json").read_text())
    assert base["planted_hash"] == tensor_hash(factors)

    # a rerun finds the same teacher; a folder holding another one is refused
    assert CliRunner().invoke(main, args).exit_code == 0
    torch.manual_seed(0)
    from safetensors.torch import save_file
    save_file({k: v + 1 for k, v in factors.items()}, out / PLANTED)
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "holds another planted update" in again.output
