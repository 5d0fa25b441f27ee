"""ΔW of full fine-tuning and LoRA's factors, checked against updates chosen by construction."""
from __future__ import annotations

import math

import pytest
import torch

from rankscope.store.runs import RunId
from rankscope.train.model_setup import build_model, load_task_model
from rankscope.train.models import find_linear_modules, linear_weight
from rankscope.train.updates import full_updates, lora_updates

EPS32 = torch.finfo(torch.float32).eps


# ---------------------------------------------------------------- ΔW of full fine-tuning

def test_full_updates_are_w_ft_minus_w0_for_every_backbone_linear(smollm2_slice, tiny_cfg):
    model = load_task_model(tiny_cfg(smollm2_slice), kind="lm", num_labels=None)
    gen = torch.Generator().manual_seed(0)
    chosen = {"model.layers.0.self_attn.q_proj": torch.randn(576, 576, generator=gen) * 1e-3,
              "model.layers.1.mlp.down_proj": torch.randn(576, 1536, generator=gen) * 1e-4}
    with torch.no_grad():
        for name, p in chosen.items():
            linear_weight(model.get_submodule(name)).add_(p)
    deltas, _ = full_updates(model, str(smollm2_slice))
    linears = [i for i in find_linear_modules(model)]              # lm_head is tied: not here
    assert sorted(deltas) == sorted(f"{i.name}.delta" for i in linears) and len(deltas) == 14
    for info in linears:
        d = deltas[f"{info.name}.delta"]
        assert d.dtype == torch.float32 and d.shape == (info.d_out, info.d_in)
        w = linear_weight(model.get_submodule(info.name)).detach()
        expected = chosen.get(info.name, torch.zeros_like(d))
        # (W0 + P) − W0 is P up to the rounding of W0 + P: one float32 ulp of the weight
        torch.testing.assert_close(d, expected, rtol=0, atol=EPS32 * float(w.abs().max()))


def test_full_updates_leave_out_a_new_classification_head(minilm_slice, tiny_cfg):
    cfg = tiny_cfg(minilm_slice, task="sentiment", targets=("query", "value"))
    model = load_task_model(cfg, kind="cls", num_labels=2)
    deltas, _ = full_updates(model, str(minilm_slice))
    assert not any("classifier" in k for k in deltas)
    assert "bert.pooler.dense.delta" in deltas and len(deltas) == 13   # backbone linears only
    assert all(float(d.abs().max()) == 0.0 for d in deltas.values())


# ---------------------------------------------------------------- LoRA factors

@pytest.mark.parametrize("policy, scaling", [
    ("fixed", 2.0 / 4),                 # α / r with α = 2
    ("scaled", 2.0),                    # α = 2·r, so α / r = 2 at every rank
    ("rslora", 2.0 / math.sqrt(4)),     # α / √r
])
def test_lora_updates_hold_the_factors_and_scaling_that_peft_applies(
        smollm2_slice, policy, scaling, tiny_cfg, stand_in_task):
    cfg = tiny_cfg(smollm2_slice, alpha_policy=policy, alpha=2.0)
    model = build_model(cfg, stand_in_task("lm"), RunId("lora", 4, 0))
    gen = torch.Generator().manual_seed(1)
    layers = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if hasattr(mod, "lora_B") and "default" in mod.lora_B:
                mod.lora_B["default"].weight.copy_(torch.randn(mod.lora_B["default"].weight.shape,
                                                               generator=gen))
                layers[name.removeprefix("base_model.model.")] = mod
    ups = lora_updates(model)
    assert len(layers) == 4                                          # q, v in 2 blocks
    assert sorted(ups) == sorted(f"{n}.{k}" for n in layers
                                 for k in ("lora_A", "lora_B", "scaling"))
    for name, mod in layers.items():
        a, b, s = ups[f"{name}.lora_A"], ups[f"{name}.lora_B"], ups[f"{name}.scaling"]
        assert a.shape == (4, mod.in_features) and b.shape == (mod.out_features, 4)
        assert s.ndim == 0 and float(s) == pytest.approx(scaling)
        torch.testing.assert_close(s * b @ a, mod.get_delta_weight("default"))


def test_lora_starts_from_a_zero_update_and_a_seeded_init(smollm2_slice, tiny_cfg, stand_in_task):
    cfg = tiny_cfg(smollm2_slice)
    ups = [lora_updates(build_model(cfg, stand_in_task("lm"), RunId("lora", 4, s)))
           for s in (0, 0, 1)]
    key = "model.layers.0.self_attn.q_proj"
    assert float(ups[0][f"{key}.lora_B"].abs().max()) == 0.0        # ΔW = 0 at step 0
    assert torch.equal(ups[0][f"{key}.lora_A"], ups[1][f"{key}.lora_A"])
    assert not torch.equal(ups[0][f"{key}.lora_A"], ups[2][f"{key}.lora_A"])


def test_lora_and_full_name_modules_alike(smollm2_slice, tiny_cfg, stand_in_task):
    cfg = tiny_cfg(smollm2_slice, targets=("all-linear",))
    lora = lora_updates(build_model(cfg, stand_in_task("lm"), RunId("lora", 2, 0)))
    full, _ = full_updates(load_task_model(cfg, kind="lm", num_labels=None), str(smollm2_slice))
    assert {k.removesuffix(".lora_A") for k in lora if k.endswith(".lora_A")} == \
        {k.removesuffix(".delta") for k in full}
