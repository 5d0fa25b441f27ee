"""The one training loop: the objective, its normalisation over micro-batches and processes,
and ``train_steps`` (steps, rates, resumption), on a tiny random GPT-2.

The whole-sweep behaviour (run folders, resume after kill -9, determinism) is in test_sweep.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rankscope.train.device import Dist
from rankscope.train.loop import _gradients, lr_lambda, make_optimizer, train_steps
from rankscope.train.objective import loss_sum, n_targets, tokens_in


def test_loss_sum_sums_over_the_labelled_next_tokens(tiny_gpt2, padded_batch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    loss, n = loss_sum(model, padded_batch, kind="lm")
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
        loss, _ = loss_sum(model, {k: v[rows] for k, v in padded_batch.items()}, kind="lm")
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


def test_a_step_over_micro_batches_equals_one_batch(tiny_gpt2, padded_batch, tiny_cfg,
                                                    stand_in_task):
    from transformers import AutoModelForCausalLM

    task = stand_in_task("sft", train=padded_batch)
    idx = torch.tensor([2, 0, 3, 1])
    out = []
    for batch_size, accum in ((4, 1), (2, 2), (1, 4)):
        cfg = tiny_cfg(tiny_gpt2, batch_size=batch_size, grad_accum=accum, clip=0.0)
        model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
        params = list(model.parameters())
        loss = _gradients(model, task, idx, cfg=cfg, dist=Dist(), bf16=False)
        out.append((loss, torch.cat([p.grad.flatten() for p in params])))
    for loss, g in out[1:]:
        assert loss == pytest.approx(out[0][0], rel=1e-6)
        torch.testing.assert_close(g, out[0][1], rtol=1e-5, atol=1e-7)


def test_targets_and_tokens_count_labels_or_rows(padded_batch):
    idx = torch.tensor([0, 2])
    assert n_targets(padded_batch, idx, kind="sft") == 9 + 4          # labelled tokens
    assert tokens_in(padded_batch, idx, kind="sft") == 9 + 4
    cls = {**padded_batch, "labels": torch.tensor([0, 1, 1, 0])}
    assert n_targets(cls, idx, kind="cls") == 2                       # the rows
    assert tokens_in(cls, idx, kind="cls") == 12 + 5                  # their attended tokens


def _steps(model_dir, cfg, task, order, *, start=0, state=None):
    """train_steps on a fresh tiny GPT-2, from ``state`` (weights, optimizer, scheduler)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    opt, sched = make_optimizer(list(model.parameters()), cfg, method="full")
    if state is not None:
        model.load_state_dict(state[0])
        opt.load_state_dict(state[1])
        sched.load_state_dict(state[2])
    model.eval()            # no dropout: restoring the RNG is the checkpoint's job (test_run_folder)
    steps = list(train_steps(model, task, order, cfg=cfg, dist=Dist(), bf16=False, opt=opt,
                             sched=sched, start=start))
    return model, opt, sched, steps


def test_train_steps_yields_each_step_with_the_rate_it_applied(tiny_gpt2, padded_batch, tiny_cfg,
                                                                stand_in_task):
    cfg = tiny_cfg(tiny_gpt2, steps=4, batch_size=2, warmup=0.25, lr_full=1e-3)
    task = stand_in_task("sft", train=padded_batch)
    order = torch.tensor([[0, 1], [2, 3], [1, 3], [0, 2]])
    model, _, _, steps = _steps(tiny_gpt2, cfg, task, order)
    assert [s.step for s in steps] == [1, 2, 3, 4]
    assert [s.lr for s in steps] == pytest.approx(
        [1e-3 * lr_lambda(k, total=4, warmup=0.25, schedule="cosine") for k in range(4)])
    assert all(s.loss > 0 for s in steps)
    assert all(p.grad is None for p in model.parameters())       # zeroed after every step


def test_train_steps_resumed_midway_end_where_an_uninterrupted_run_ends(tiny_gpt2, padded_batch,
                                                                        tiny_cfg, stand_in_task):
    cfg = tiny_cfg(tiny_gpt2, steps=4, batch_size=2)
    task = stand_in_task("sft", train=padded_batch)
    order = torch.tensor([[0, 1], [2, 3], [1, 3], [0, 2]])
    whole, _, _, all_steps = _steps(tiny_gpt2, cfg, task, order)
    half, opt, sched, first = _steps(tiny_gpt2, cfg, task, order[:2])
    state = (half.state_dict(), opt.state_dict(), sched.state_dict())
    resumed, _, _, rest = _steps(tiny_gpt2, cfg, task, order, start=2, state=state)
    assert [s.step for s in rest] == [3, 4] and first + rest == all_steps
    for (n, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n
