"""The truncation test: gain shares from the k = 0 baseline and functional ranks on curves
built with known shares, k = 0 writing the base model's linear weights exactly, and the weight
slots of Conv1D models (the CLI, on a tiny real sweep: tests/cli/test_cli_truncate.py).
"""
from __future__ import annotations


import pandas as pd
import pytest

from rankscope.analysis.truncate import functional_rank, gain_shares

KS = (1, 2, 4, 8, 16, 32)
FULL_RANK = 576


def curve(shares, *, before=3.0, full=2.0, run="full-s0", metric="loss", extra=None, k0=None):
    """A truncation curve whose k = KS[i] keeps exactly ``shares[i]`` of the gain, then the
    full rank (share 1): the metric moves from the baseline towards ``full``. The baseline is
    ``before`` (the base model), or with ``k0`` a k = 0 row whose metric is ``k0``."""
    start = before if k0 is None else k0
    points = [*zip(KS, shares), (FULL_RANK, 1.0)]
    rows = [] if k0 is None else [{"k": 0, f"eval_{metric}": k0}]
    rows += [{"k": k, f"eval_{metric}": start + share * (full - start)} for k, share in points]
    return pd.DataFrame([{"run": run, "method": "full", "rank": None, "seed": 0,
                          "is_full_rank": r["k"] == FULL_RANK, **r, f"before_{metric}": before,
                          **(extra or {})} for r in rows])


def ranks(summary: pd.DataFrame, run: str = "full-s0") -> dict:
    s = summary[summary["run"] == run]
    return {share: (None if pd.isna(k) else int(k)) for share, k in zip(s["share"], s["k"])}


# ------------------------------------------------------------------ known by construction

def test_90_percent_first_at_k_4_and_95_percent_first_at_k_16():
    shares = (0.3, 0.6, 0.9, 0.93, 0.95, 0.97)
    g = gain_shares(curve(shares))
    assert g["gain_share"].tolist() == pytest.approx([*shares, 1.0])
    assert (g["metric"] == "loss").all()
    assert ranks(functional_rank(g)) == {0.9: 4, 0.95: 16}
    assert ranks(functional_rank(g, shares=(0.5, 0.99))) == {0.5: 2, 0.99: FULL_RANK}


def test_accuracy_is_the_metric_when_the_curve_has_it():
    # accuracy rises 0.5 → 0.9; the loss columns (here falling the other way) are ignored
    c = curve((0.1, 0.2, 0.5, 0.91, 0.96, 0.99), before=0.5, full=0.9, metric="accuracy",
              extra={"eval_loss": 1.0, "before_loss": 2.0})
    g = gain_shares(c)
    assert (g["metric"] == "accuracy").all()
    assert g["gain_share"].tolist() == pytest.approx([0.1, 0.2, 0.5, 0.91, 0.96, 0.99, 1.0])
    assert ranks(functional_rank(g)) == {0.9: 8, 0.95: 16}


def test_the_smallest_k_counts_even_when_a_larger_k_falls_back():
    g = gain_shares(curve((0.2, 0.92, 0.85, 0.96, 0.9, 0.97)))
    assert ranks(functional_rank(g)) == {0.9: 2, 0.95: 8}


def test_no_truncation_keeps_the_share_below_full_rank():
    g = gain_shares(curve((0.1, 0.2, 0.3, 0.4, 0.5, 0.6)))
    assert ranks(functional_rank(g)) == {0.9: FULL_RANK, 0.95: FULL_RANK}


@pytest.mark.parametrize("full", [3.0, 3.5])         # no gain, or full fine-tuning got worse
def test_no_gain_over_w0_leaves_every_share_undefined(full):
    g = gain_shares(curve((0.3, 0.6, 0.9, 0.93, 0.95, 0.97), full=full))
    assert g["gain_share"].isna().all()
    summary = functional_rank(g)
    assert summary["k"].isna().all() and str(summary["k"].dtype) == "Int64"


def test_runs_are_kept_apart():
    c = pd.concat([curve((0.3, 0.6, 0.9, 0.93, 0.95, 0.97)),
                   curve((0.95, 0.96, 0.97, 0.98, 0.99, 0.99), before=4.0, full=1.0,
                         run="full-s1")], ignore_index=True)
    summary = functional_rank(gain_shares(c))
    assert ranks(summary) == {0.9: 4, 0.95: 16}
    assert ranks(summary, "full-s1") == {0.9: 1, 0.95: 1}
    assert list(summary.columns) == ["run", "method", "rank", "seed", "share", "k", "k0_share",
                                     "k_max"]


def test_shares_are_measured_from_the_k0_baseline():
    """Base model 3.0, k = 0 (linear weights at W_0, the rest fine-tuned) 2.8, full 2.0: the
    non-linear parameters make 20% of the gain, and each k's share counts from 2.8."""
    shares = (0.3, 0.6, 0.9, 0.93, 0.95, 0.97)
    g = gain_shares(curve(shares, k0=2.8))
    assert g["gain_share"].tolist() == pytest.approx([0.0, *shares, 1.0])
    assert g["k0_share"].tolist() == pytest.approx([0.2] * 8)
    summary = functional_rank(g)
    assert ranks(summary) == {0.9: 4, 0.95: 16}
    assert summary["k0_share"].tolist() == pytest.approx([0.2, 0.2])
    assert summary["k_max"].tolist() == [FULL_RANK, FULL_RANK]
    # the same curve read from the base model would credit k = 1 with 0.2 + 0.8·0.3 = 44%
    base = gain_shares(curve(shares, k0=2.8).query("k > 0"))
    assert base["gain_share"].iloc[0] == pytest.approx(0.44)


def test_a_k0_baseline_that_keeps_all_the_gain_leaves_the_rank_undefined():
    """The non-linear parameters alone reach full fine-tuning's metric: no gain is left for the
    linear updates to share, and k0_share is 1."""
    g = gain_shares(curve((0.3, 0.6, 0.9, 0.93, 0.95, 0.97), k0=2.0))
    assert g["gain_share"].isna().all() and g["k0_share"].tolist() == pytest.approx([1.0] * 8)
    summary = functional_rank(g)
    assert summary["k"].isna().all() and summary["k0_share"].tolist() == pytest.approx([1.0] * 2)


def test_accuracy_shares_count_from_k0_too():
    g = gain_shares(curve((0.1, 0.2, 0.5, 0.91, 0.96, 0.99), before=0.5, full=0.9, k0=0.6,
                          metric="accuracy"))
    assert g["k0_share"].iloc[0] == pytest.approx(0.25)
    assert ranks(functional_rank(g)) == {0.9: 8, 0.95: 16}


# ------------------------------------------ weight slots of Conv1D models (GPT-2), CPU and CUDA

def _tiny_gpt2_pair(model_dir):
    """The tiny random GPT-2 of ``model_dir`` (every linear weight a Conv1D, stored (d_in, d_out))
    and a copy with a planted rank-2 ΔW in each; the updates' SVDs as (name, U, S, Vh), token ids."""
    import copy

    import torch
    from transformers import GPT2LMHeadModel

    from rankscope.analysis.decompose import update_svd
    from rankscope.analysis.deltas import ModuleDelta
    from rankscope.train.models import find_linear_modules, linear_weight

    base = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    tuned = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(1)
    svds = []
    with torch.no_grad():
        for info in find_linear_modules(tuned):
            assert info.fan_in_fan_out          # a Conv1D: its slot is a transposed view
            delta = torch.randn(info.d_out, 2, generator=gen) @ torch.randn(2, info.d_in,
                                                                           generator=gen) / 4
            linear_weight(tuned.get_submodule(info.name)).add_(delta)
            svds.append((info.name, *update_svd(ModuleDelta(
                info.name, info.layer, info.module, info.d_out, info.d_in, dense=delta))))
    return base, tuned, svds, torch.randint(0, 64, (2, 8), generator=gen)


def _write_and_run(model, slots, w0, svds, ids, k):
    """The logits of ``model`` with every slot set to W_0 + trunc_k(ΔW)."""
    import torch

    from rankscope.linalg.spectra import truncate

    with torch.no_grad():
        for name, U, S, Vh in svds:
            slots[name].copy_(w0[name] + truncate(U, S, Vh, min(k, S.numel())))
        return model(ids).logits


def _check_slots_write_through(model_dir, device, *, tol):
    import torch

    from rankscope.analysis.truncate import _weight_slots

    base, tuned, svds, ids = _tiny_gpt2_pair(model_dir)
    svds = [(name, *(t.to(device) for t in usv)) for name, *usv in svds]
    base, ids = base.to(device), ids.to(device)
    slots, w0 = _weight_slots(tuned, svds, device, merged=True)
    with torch.no_grad():
        want_base, want_tuned = base(ids).logits, tuned(ids).logits
    assert (want_tuned - want_base).abs().max() > 100 * tol     # the updates matter
    torch.testing.assert_close(_write_and_run(tuned, slots, w0, svds, ids, 0), want_base,
                               rtol=tol, atol=tol)
    torch.testing.assert_close(_write_and_run(tuned, slots, w0, svds, ids, 2), want_tuned,
                               rtol=tol, atol=tol)


def test_conv1d_slots_write_w0_plus_truncated_delta_into_the_model(tiny_gpt2):
    """k = 0 gives back the base model, k = 2 (the planted rank) the fine-tuned one."""
    import torch

    _check_slots_write_through(tiny_gpt2, torch.device("cpu"), tol=1e-5)


def test_slots_are_taken_after_the_model_moves(tiny_gpt2):
    """Moving a model replaces its tensors, so a Conv1D slot (a transposed view) taken before
    the move writes into a copy the model no longer uses. A move to the meta device shows it on
    the CPU: every slot and W_0 must be where the model's weights went."""
    import torch

    from rankscope.analysis.truncate import _weight_slots

    _, tuned, svds, _ = _tiny_gpt2_pair(tiny_gpt2)
    meta = torch.device("meta")
    slots, w0 = _weight_slots(tuned, [(n, *(t.to(meta) for t in usv)) for n, *usv in svds], meta,
                              merged=True)
    assert len(slots) == len(svds) == 8
    for name in slots:
        assert tuned.get_submodule(name).weight.device == meta
        assert slots[name].device == meta and w0[name].device == meta


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_conv1d_slots_write_through_on_cuda(tiny_gpt2):
    """On CUDA, W_0 + trunc_k(ΔW) reaches the model that is evaluated (not its CPU copy)."""
    import torch

    _check_slots_write_through(tiny_gpt2, torch.device("cuda"), tol=2e-3)   # TF32 matmuls allowed


# ------------------------------------------------------------------ the k = 0 baseline

def test_k0_writes_the_base_models_linear_weights_exactly(tiny_gpt2, monkeypatch, tmp_path):
    """``truncation_table`` on a full run of the tiny GPT-2 (planted rank-2 ΔW in every linear
    weight, a fine-tuned final norm): the model evaluated at k = 0 holds W_0 bit for bit and the
    fine-tuned norm; at the full rank it is the fine-tuned model."""
    import copy
    from types import SimpleNamespace

    import torch

    from rankscope.analysis import truncate as T
    from rankscope.train.models import linear_weight

    base, tuned, svds, _ = _tiny_gpt2_pair(tiny_gpt2)
    names = [n for n, *_ in svds]
    norm = {"transformer.ln_f.weight": torch.full((32,), 2.0)}
    seen = []

    def evaluate(model, data, *, kind, device, bf16):
        seen.append(({n: linear_weight(model.get_submodule(n)).detach().clone() for n in names},
                     model.transformer.ln_f.weight.detach().clone()))
        return {"loss": 1.0}

    monkeypatch.setattr(T, "read_manifest", lambda run_dir: {
        "method": "full", "rank": None, "seed": 0, "eval_before": {"loss": 2.0}})
    monkeypatch.setattr(T, "_svds", lambda run_dir, device: svds)
    monkeypatch.setattr(T, "load_task_model", lambda cfg, **kw: copy.deepcopy(base))
    monkeypatch.setattr(T, "read_tensors", lambda path: (norm, {}))
    monkeypatch.setattr(T, "evaluate", evaluate)
    table = T.truncation_table(tmp_path, SimpleNamespace(bf16=False),
                               SimpleNamespace(kind="lm", num_labels=None, eval=None), ks=(1, 2),
                               device=torch.device("cpu"), progress=False)
    assert table["k"].tolist() == [0, 1, 2, 32]          # 32: every module's full rank
    weights, ln_f = seen[0]
    for name in names:
        assert torch.equal(weights[name], linear_weight(base.get_submodule(name)))
    assert torch.equal(ln_f, norm["transformer.ln_f.weight"])
    weights, _ = seen[-1]
    for name in names:
        torch.testing.assert_close(weights[name], linear_weight(tuned.get_submodule(name)),
                                   rtol=1e-5, atol=1e-5)


def test_a_merged_lora_keeps_the_exact_base_weights_for_k0(tiny_gpt2, make_adapter, monkeypatch,
                                                           tmp_path):
    """For a LoRA run, W_0 is taken from the base model before the adapter is merged: exact,
    where W_0 + ΔW − ΔW would round."""
    from types import SimpleNamespace

    import torch
    from transformers import GPT2Model        # what make_adapter wraps: names "h.0.attn.c_attn"

    from rankscope.analysis import truncate as T
    from rankscope.analysis.deltas import from_adapter
    from rankscope.train.models import linear_weight

    make_adapter(tiny_gpt2, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["c_attn"],
                 fan_in_fan_out=True)
    deltas = {d.name: d.materialize() for d in from_adapter(tmp_path / "adapter")}
    base = GPT2Model.from_pretrained(tiny_gpt2)
    monkeypatch.setattr(T, "load_task_model", lambda cfg, **kw: GPT2Model.from_pretrained(tiny_gpt2))
    task = SimpleNamespace(kind="lm", num_labels=None)
    model, w0 = T._fine_tuned_model(None, tmp_path, {"method": "lora"}, task, list(deltas))
    assert len(w0) == 2
    for name, delta in deltas.items():
        want = linear_weight(base.get_submodule(name))
        assert torch.equal(w0[name], want)
        torch.testing.assert_close(linear_weight(model.get_submodule(name)), want + delta,
                                   rtol=1e-5, atol=1e-6)
