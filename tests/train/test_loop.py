"""One run's pieces: ΔW and LoRA factors by construction, targets, loss normalisation, checkpoints.

The whole-sweep behaviour (run folders, resume, determinism) is in test_sweep.py; these tests
call ``rankscope.train.parts`` and ``rankscope.train.loop`` directly on tiny real models, without training
for more than a step or two.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from rankscope.train import loop as R
from rankscope.train import parts as T
from rankscope.train.config import build_sweep
from rankscope.errors import InputError
from rankscope.train.models import find_linear_modules, linear_weight

EPS32 = torch.finfo(torch.float32).eps


def _cfg(model, **kw):
    base = dict(model=str(model), task="news", ranks=(4,), steps=4, batch_size=4, max_len=32,
                max_eval_examples=8, max_train_examples=32, bf16=False)    # float32 tolerances
    return build_sweep(overrides={**base, **kw})


def _task(kind, num_labels=None, train=None):
    """A stand-in for TaskData: what build_model, _step and tokens_in read."""
    return SimpleNamespace(kind=kind, num_labels=num_labels, train=train)


@pytest.fixture(scope="module")
def padded_batch():
    """Four sft-like rows of the tiny GPT-2 (vocab 64, L 12), padded unevenly, prompts ignored."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (4, 12), generator=gen)           # (B, L)
    lengths, prompts = [12, 9, 5, 7], [3, 2, 1, 4]
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for r, (n, p) in enumerate(zip(lengths, prompts)):
        mask[r, :n] = 1
        labels[r, p:n] = ids[r, p:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------- ΔW of full fine-tuning

def test_full_updates_are_w_ft_minus_w0_for_every_backbone_linear(smollm2_slice):
    model = T.load_task_model(_cfg(smollm2_slice), kind="lm", num_labels=None)
    gen = torch.Generator().manual_seed(0)
    chosen = {"model.layers.0.self_attn.q_proj": torch.randn(576, 576, generator=gen) * 1e-3,
              "model.layers.1.mlp.down_proj": torch.randn(576, 1536, generator=gen) * 1e-4}
    with torch.no_grad():
        for name, p in chosen.items():
            linear_weight(model.get_submodule(name)).add_(p)
    deltas, _ = T.full_updates(model, str(smollm2_slice))
    linears = [i for i in find_linear_modules(model)]              # lm_head is tied: not here
    assert sorted(deltas) == sorted(f"{i.name}.delta" for i in linears) and len(deltas) == 14
    for info in linears:
        d = deltas[f"{info.name}.delta"]
        assert d.dtype == torch.float32 and d.shape == (info.d_out, info.d_in)
        w = linear_weight(model.get_submodule(info.name)).detach()
        expected = chosen.get(info.name, torch.zeros_like(d))
        # (W0 + P) − W0 is P up to the rounding of W0 + P: one float32 ulp of the weight
        torch.testing.assert_close(d, expected, rtol=0, atol=EPS32 * float(w.abs().max()))


def test_full_updates_leave_out_a_new_classification_head(minilm_slice):
    cfg = _cfg(minilm_slice, task="sentiment", targets=("query", "value"))
    model = T.load_task_model(cfg, kind="cls", num_labels=2)
    deltas, _ = T.full_updates(model, str(minilm_slice))
    assert not any("classifier" in k for k in deltas)
    assert "bert.pooler.dense.delta" in deltas and len(deltas) == 13   # backbone linears only
    assert all(float(d.abs().max()) == 0.0 for d in deltas.values())


# ---------------------------------------------------------------- LoRA factors

@pytest.mark.parametrize("policy, scaling", [
    ("fixed", 2.0 / 4),                 # α / r with α = 2
    ("scaled", 2.0),                    # α = 2·r, so α / r = 2 at every rank
    ("rslora", 2.0 / math.sqrt(4)),     # α / √r
])
def test_lora_updates_hold_the_factors_and_scaling_that_peft_applies(smollm2_slice, policy,
                                                                     scaling):
    cfg = _cfg(smollm2_slice, alpha_policy=policy, alpha=2.0)
    model = R.build_model(cfg, _task("lm"), method="lora", rank=4, seed=0)
    gen = torch.Generator().manual_seed(1)
    layers = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if hasattr(mod, "lora_B") and "default" in mod.lora_B:
                mod.lora_B["default"].weight.copy_(torch.randn(mod.lora_B["default"].weight.shape,
                                                               generator=gen))
                layers[name.removeprefix("base_model.model.")] = mod
    ups = T.lora_updates(model)
    assert len(layers) == 4                                          # q, v in 2 blocks
    assert sorted(ups) == sorted(f"{n}.{k}" for n in layers
                                 for k in ("lora_A", "lora_B", "scaling"))
    for name, mod in layers.items():
        a, b, s = ups[f"{name}.lora_A"], ups[f"{name}.lora_B"], ups[f"{name}.scaling"]
        assert a.shape == (4, mod.in_features) and b.shape == (mod.out_features, 4)
        assert s.ndim == 0 and float(s) == pytest.approx(scaling)
        torch.testing.assert_close(s * b @ a, mod.get_delta_weight("default"))


def test_lora_starts_from_a_zero_update_and_a_seeded_init(smollm2_slice):
    cfg = _cfg(smollm2_slice)
    ups = [T.lora_updates(R.build_model(cfg, _task("lm"), method="lora", rank=4, seed=s))
           for s in (0, 0, 1)]
    key = "model.layers.0.self_attn.q_proj"
    assert float(ups[0][f"{key}.lora_B"].abs().max()) == 0.0        # ΔW = 0 at step 0
    assert torch.equal(ups[0][f"{key}.lora_A"], ups[1][f"{key}.lora_A"])
    assert not torch.equal(ups[0][f"{key}.lora_A"], ups[2][f"{key}.lora_A"])


def test_lora_and_full_name_modules_alike(smollm2_slice):
    cfg = _cfg(smollm2_slice, targets=("all-linear",))
    lora = T.lora_updates(R.build_model(cfg, _task("lm"), method="lora", rank=2, seed=0))
    full, _ = T.full_updates(T.load_task_model(cfg, kind="lm", num_labels=None), str(smollm2_slice))
    assert {k.removesuffix(".lora_A") for k in lora if k.endswith(".lora_A")} == \
        {k.removesuffix(".delta") for k in full}


# ---------------------------------------------------------------- targets and ranks

def test_a_target_the_model_lacks_is_named_with_the_ones_it_has(smollm2_slice):
    model = T.load_task_model(_cfg(smollm2_slice), kind="lm", num_labels=None)
    with pytest.raises(InputError, match=r"target module 'query' not in the model; it has: "
                                         r"down_proj, gate_proj, k_proj"):
        T.check_targets(model, ("q_proj", "query"), (2,))


def test_a_rank_above_a_targets_min_dimension_is_refused(smollm2_slice):
    model = T.load_task_model(_cfg(smollm2_slice), kind="lm", num_labels=None)
    T.check_targets(model, ("q_proj", "v_proj"), (1, 192))         # v_proj is (192, 576)
    with pytest.raises(InputError, match=r"rank 193 is larger than min\(d_out, d_in\) = 192 "
                                         r"of v_proj"):
        T.check_targets(model, ("q_proj", "v_proj"), (1, 193))
    T.check_targets(model, ("all-linear",), (192,))                 # k_proj, v_proj: (192, 576)
    with pytest.raises(InputError, match="rank 193 is larger .* all-linear adapts"):
        T.check_targets(model, ("all-linear",), (193,))


# ---------------------------------------------------------------- loss and its normalisation

def test_loss_sum_sums_over_the_labelled_next_tokens(tiny_gpt2, padded_batch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    loss, n = T.loss_sum(model, padded_batch, kind="lm")
    labels = padded_batch["labels"]
    assert n == int((labels[:, 1:] != -100).sum())
    logits = model(input_ids=padded_batch["input_ids"],
                   attention_mask=padded_batch["attention_mask"]).logits
    manual = sum(F.cross_entropy(logits[r, t - 1], labels[r, t], reduction="sum")
                 for r in range(4) for t in range(1, 12) if labels[r, t] != -100)
    torch.testing.assert_close(loss, manual)


def test_sharded_gradients_averaged_as_ddp_does_equal_the_global_gradient(tiny_gpt2, padded_batch):
    """DDP averages over processes; each scaling its summed loss by world / N_global gives Σ/N."""
    from transformers import AutoModelForCausalLM

    def grads(model, rows, scale):
        model.zero_grad()
        loss, _ = T.loss_sum(model, {k: v[rows] for k, v in padded_batch.items()}, kind="lm")
        (loss * scale).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    n = int((padded_batch["labels"][:, 1:] != -100).sum())
    whole = grads(model, slice(None), 1 / n)
    world = 2
    shards = [slice(r, None, world) for r in range(world)]
    ddp = sum(grads(model, s, world / n) for s in shards) / world
    torch.testing.assert_close(ddp, whole, rtol=1e-5, atol=1e-7)
    # the test can tell: normalising by each shard's own count would weight rows differently
    local = sum(grads(model, s, 1 / int((padded_batch["labels"][s, 1:] != -100).sum()))
                for s in shards) / world
    assert not torch.allclose(local, whole, rtol=1e-3, atol=1e-6)


def test_a_step_over_micro_batches_equals_one_batch(tiny_gpt2, padded_batch):
    from transformers import AutoModelForCausalLM

    task = _task("sft", train=padded_batch)
    idx = torch.tensor([2, 0, 3, 1])
    out = []
    for batch_size, accum in ((4, 1), (2, 2), (1, 4)):
        cfg = _cfg(tiny_gpt2, batch_size=batch_size, grad_accum=accum, clip=0.0)
        model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
        params = list(model.parameters())
        loss = R._step(model, task, idx, cfg=cfg, dist=T.Dist(), bf16=False, params=params)
        out.append((loss, torch.cat([p.grad.flatten() for p in params])))
    for loss, g in out[1:]:
        assert loss == pytest.approx(out[0][0], rel=1e-6)
        torch.testing.assert_close(g, out[0][1], rtol=1e-5, atol=1e-7)


def test_tokens_in_counts_targets_or_classified_tokens(padded_batch):
    idx = torch.tensor([0, 2])
    assert T.tokens_in(_task("sft", train=padded_batch), idx) == 9 + 4
    cls = {**padded_batch, "labels": torch.tensor([0, 1, 1, 0])}
    assert T.tokens_in(_task("cls", train=cls), idx) == 12 + 5


# ---------------------------------------------------------------- classification head

def test_a_new_classification_head_is_drawn_from_the_split_seed(minilm_slice):
    cfg = _cfg(minilm_slice, task="sentiment", targets=("query", "value"))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = T.load_task_model(cfg, kind="cls", num_labels=2).classifier.weight
    assert torch.equal(torch.get_rng_state(), state)                 # global stream untouched
    torch.rand(17)                                                   # any history in between
    again = T.load_task_model(cfg, kind="cls", num_labels=2).classifier.weight
    other = T.load_task_model(_cfg(minilm_slice, task="sentiment", split_seed=1), kind="cls",
                              num_labels=2).classifier.weight
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.slow
def test_eval_before_is_where_every_run_starts(minilm_slice, tmp_path):
    """The sweep's base evaluation is each run's own starting point (same head, ΔW = 0)."""
    from rankscope.train.sweep import base_evaluation, load_checked_model, prepare

    cfg = _cfg(minilm_slice, task="sentiment", targets=("query", "value"), ranks=(2,))
    task = prepare(cfg)
    dist = T.Dist()
    torch.rand(5)
    base = base_evaluation(cfg, task, tmp_path, dist, model=load_checked_model(cfg, task, world=1))
    for method, rank in (("full", None), ("lora", 2)):
        torch.rand(5)
        model = R.build_model(cfg, task, method=method, rank=rank, seed=0)
        got = T.evaluate(model, task.eval, kind="cls", device=dist.device, bf16=False)
        assert got == pytest.approx(base, rel=1e-6), method


# ---------------------------------------------------------------- checkpoints and run folders

def _train_bits(model_dir, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: T.lr_lambda(
        s, total=6, warmup=0.3, schedule="cosine"))
    return model, opt, sched


def _one_step(model, opt, sched, batch):
    loss, n = T.loss_sum(model, batch, kind="lm")
    (loss / n).backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("killed_between_renames", [False, True])
def test_a_checkpoint_restores_weights_optimizer_schedule_and_rng(tiny_gpt2, padded_batch,
                                                                  tmp_path,
                                                                  killed_between_renames):
    model, opt, sched = _train_bits(tiny_gpt2)
    for _ in range(2):
        _one_step(model, opt, sched, padded_batch)
    metrics = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}]
    R._save_checkpoint(tmp_path, 2, model, opt, sched, metrics)
    R._save_checkpoint(tmp_path, 2, model, opt, sched, metrics)     # replaces the first
    assert sorted(p.name for p in tmp_path.iterdir()) == [R.CKPT]
    if killed_between_renames:
        (tmp_path / R.CKPT).rename(tmp_path / f".{R.CKPT}.old")
    expected_rand = torch.rand(4)
    _one_step(model, opt, sched, padded_batch)                       # the reference goes on

    fresh, opt2, sched2 = _train_bits(tiny_gpt2, seed=5)
    step, got_metrics = R._load_checkpoint(tmp_path, fresh, opt2, sched2)
    assert step == 2 and got_metrics == metrics
    assert sched2.last_epoch == 2
    assert torch.equal(torch.rand(4), expected_rand)                 # RNG where it was saved
    _one_step(fresh, opt2, sched2, padded_batch)
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n


def test_no_checkpoint_means_a_fresh_start(tiny_gpt2, tmp_path):
    model, opt, sched = _train_bits(tiny_gpt2)
    assert R._load_checkpoint(tmp_path, model, opt, sched) == (0, [])


def test_a_run_folder_refuses_a_run_of_another_config(tmp_path):
    cfg = build_sweep(overrides=dict(model="m", steps=4))
    text = R.run_config_text(cfg, method="lora", rank=2, seed=0)
    R.claim_run_dir(tmp_path / "lora-r2-s0", text)
    R.claim_run_dir(tmp_path / "lora-r2-s0", text)                   # same config: fine
    other = R.run_config_text(build_sweep(overrides=dict(model="m", steps=5, lr_lora=1e-4)),
                              method="lora", rank=2, seed=0)
    with pytest.raises(InputError, match=r"another config \(differs in: lr_lora, steps\)"):
        R.claim_run_dir(tmp_path / "lora-r2-s0", other)


def test_a_run_folder_under_a_file_is_an_input_error(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InputError, match="cannot create run folder"):
        R.claim_run_dir(tmp_path / "file.txt" / "run", "method: full\n")


def test_bf16_autocast_by_default_only_where_the_chip_has_native_bf16(monkeypatch):
    monkeypatch.delenv(T.FORCE_BF16_ENV, raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert T.use_bf16(True, cpu) is True and T.use_bf16(False, cuda) is False   # as set
    assert T.use_bf16(None, cuda) is True
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert T.use_bf16(None, cpu) is bool(native)      # no reference-GEMM bf16 on other CPUs


@pytest.mark.parametrize("forced, expected", [("1", True), ("0", False)])
def test_the_force_variable_replaces_the_chips_answer_but_not_a_setting(monkeypatch, forced,
                                                                          expected):
    monkeypatch.setenv(T.FORCE_BF16_ENV, forced)
    for device in (torch.device("cpu"), torch.device("cuda")):
        assert T.use_bf16(None, device) is expected
        assert T.use_bf16(not expected, device) is (not expected)


def test_a_bad_force_value_is_an_input_error(monkeypatch):
    monkeypatch.setenv(T.FORCE_BF16_ENV, "yes")
    with pytest.raises(InputError, match="RANKSCOPE_FORCE_BF16 must be 1 or 0, got 'yes'"):
        T.use_bf16(None, torch.device("cpu"))
