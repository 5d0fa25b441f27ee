"""``rankscope.export``: adapters that peft loads, checked against updates of known spectra.

Every update here is planted (``chosen_factors``: ΔW = U diag(s) Vᵀ with s chosen), so
trunc_k(ΔW) is known by construction: the first k columns of the planted factors.
"""
from __future__ import annotations

import json

import pytest
import torch

from rankscope.errors import InputError
from rankscope.export.adapters import export_adapter
from rankscope.export.ranks import RankRule, balanced_factors, planned_rank, retained_energy
from rankscope.export.sources import resolve_source
from rankscope.linalg.spectra import dense_svd, truncate
from rankscope.store.runs import LABELS, OTHERS, label_file, write_updates

# backbone module name → planted spectrum; shapes: q_proj 32×32, v_proj 16×32, down_proj 32×64
PLANTED = {"layers.0.self_attn.q_proj": (4.0, 2.0, 1.0, 0.5),
           "layers.1.self_attn.v_proj": (2.0,),
           "layers.1.mlp.down_proj": (3.0, 1.0)}
SHAPES = {"q_proj": (32, 32), "v_proj": (16, 32), "down_proj": (32, 64)}
IDS = torch.tensor([[5, 17, 33, 3, 42, 7, 60, 11]])           # < 64, the tiny GPT-2's vocabulary


def shape(name):
    return SHAPES[name.rsplit(".", 1)[-1]]


def factors(chosen_factors, k=None):
    """{backbone name: (B, A)} of the planted updates, cut to their first k directions."""
    out = {}
    for i, (name, s) in enumerate(PLANTED.items()):
        B, A = chosen_factors(s, *shape(name), seed=i)
        out[name] = (B[:, :k], A[:k]) if k else (B, A)
    return out


def causal(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def peft_logits(base_dir, adapter_dir):
    """The logits of the causal LM at ``base_dir`` with the adapter loaded by peft."""
    from peft import PeftModel

    with torch.no_grad():
        return PeftModel.from_pretrained(causal(base_dir), adapter_dir).eval()(IDS).logits


def logits(model_dir):
    with torch.no_grad():
        return causal(model_dir)(IDS).logits


def reference(make_finetuned, base, out, parts):
    """A model folder with W_0 + Σ B·A of ``parts`` ({name: (B, A)}) saved."""
    return make_finetuned(base, out, {n: B @ A for n, (B, A) in parts.items()})


def record(out):
    return json.loads((out / "export.json").read_text())


@pytest.fixture(scope="module")
def pair(tiny_llama, make_finetuned, chosen_factors, tmp_path_factory):
    """The tiny Llama fine-tuned by exactly the planted updates."""
    return reference(make_finetuned, tiny_llama, tmp_path_factory.mktemp("ft") / "model",
                     factors(chosen_factors))


def export_pair(base, ft, out, **kw):
    return export_adapter(resolve_source(base=str(base), finetuned=str(ft)), out=out, **kw)


# ------------------------------------------------------------------ pure rank arithmetic

def test_balanced_factors_rebuild_the_truncation_and_split_s_evenly(chosen_factors):
    B0, A0 = chosen_factors((4.0, 2.0, 1.0, 0.5), 24, 16, seed=3)
    U, S, Vh = dense_svd(B0 @ A0, dtype=torch.float64)
    B, A = balanced_factors(U, S, Vh, 2)
    assert B.shape == (24, 2) and A.shape == (2, 16) and B.dtype == torch.float32
    torch.testing.assert_close((B @ A).double(), truncate(U, S, Vh, 2), atol=1e-6, rtol=0)
    torch.testing.assert_close((B.T @ B).double(), torch.diag(torch.tensor([4.0, 2.0])).double(),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close((A @ A.T).double(), (B.T @ B).double(), atol=1e-6, rtol=0)
    assert retained_energy(S, 2) == pytest.approx(20 / 21.25)
    assert retained_energy(torch.zeros(3), 2) is None


def test_rank_rules_and_their_refusals():
    cfg = {"r": 2, "target_modules": ["q_proj"], "rank_pattern": {"model.layers.1.self_attn.q_proj": 5}}
    rule = RankRule(config=cfg, config_path="lora_config.json")
    q0, q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
    assert planned_rank(rule, q0, shape=(32, 32), source_rank=None) == 2
    assert planned_rank(rule, q1, shape=(32, 32), source_rank=None) == 5
    assert planned_rank(rule, "model.layers.0.self_attn.v_proj", shape=(16, 32), source_rank=None) == 0
    assert planned_rank(RankRule(energy=0.9), q0, shape=(32, 32), source_rank=None) is None
    with pytest.raises(InputError, match="above its min"):
        planned_rank(RankRule(rank=17), "v", shape=(16, 32), source_rank=None)
    with pytest.raises(InputError, match="above its LoRA rank 4"):
        planned_rank(rule, q1, shape=(32, 32), source_rank=4)
    for bad, match in [({"rank": 0}, "--rank must be"), ({"energy": 0.0}, "--energy must be"),
                       ({"energy": 1.5}, "--energy must be"), ({"energy": float("nan")}, "--energy"),
                       ({"rank": 2, "energy": 0.5}, "not --rank and --energy"), ({}, "give one of")]:
        with pytest.raises(InputError, match=match):
            RankRule(**bad)


# ---------------------------------------------------------------- full fine-tune → LoRA

def test_export_at_the_planted_rank_gives_back_the_fine_tuned_model(tiny_llama, pair, tmp_path):
    rec = export_pair(tiny_llama, pair, tmp_path / "a", rule=RankRule(rank=4))
    torch.testing.assert_close(peft_logits(tiny_llama, tmp_path / "a"), logits(pair),
                               atol=2e-5, rtol=1e-4)
    assert {m["name"]: m["rank"] for m in rec["modules"]} == {
        "model.layers.0.self_attn.q_proj": 4, "model.layers.1.self_attn.v_proj": 4,
        "model.layers.1.mlp.down_proj": 4}
    assert all(m["retained_energy"] == pytest.approx(1.0) for m in rec["modules"])


def test_export_at_rank_k_is_w0_plus_trunc_k(tiny_llama, pair, make_finetuned, chosen_factors,
                                             tmp_path):
    rec = export_pair(tiny_llama, pair, tmp_path / "a", rule=RankRule(rank=2))
    ref = reference(make_finetuned, tiny_llama, tmp_path / "ref", factors(chosen_factors, k=2))
    torch.testing.assert_close(peft_logits(tiny_llama, tmp_path / "a"), logits(ref),
                               atol=2e-5, rtol=1e-4)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"]) == (2, 2, {})
    assert sorted(cfg["target_modules"]) == sorted(m["name"] for m in rec["modules"])
    assert cfg["base_model_name_or_path"] == str(tiny_llama.resolve())
    kept = {m["module"]: m["retained_energy"] for m in rec["modules"]}
    assert kept["q_proj"] == pytest.approx(20 / 21.25) and kept["v_proj"] == pytest.approx(1.0)
    assert rec["source"]["kind"] == "model-pair" and rec["lora_params"] == 2 * (64 + 48 + 96)


def test_energy_share_picks_each_modules_smallest_k(tiny_llama, pair, make_finetuned,
                                                     chosen_factors, tmp_path):
    rec = export_pair(tiny_llama, pair, tmp_path / "a", rule=RankRule(energy=0.85))
    ranks = {m["module"]: m["rank"] for m in rec["modules"]}
    assert ranks == {"q_proj": 2, "v_proj": 1, "down_proj": 1}   # 16/21.25 < 0.85 ≤ 20/21.25; 9/10
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["r"] == 1 and cfg["rank_pattern"] == cfg["alpha_pattern"] == {
        "model.layers.0.self_attn.q_proj": 2}
    parts = {n: (B[:, :ranks[n.rsplit(".", 1)[-1]]], A[:ranks[n.rsplit(".", 1)[-1]]])
             for n, (B, A) in factors(chosen_factors).items()}
    ref = reference(make_finetuned, tiny_llama, tmp_path / "ref", parts)
    torch.testing.assert_close(peft_logits(tiny_llama, tmp_path / "a"), logits(ref),
                               atol=2e-5, rtol=1e-4)


def test_a_recommendations_ranks_and_targets(tiny_llama, pair, tmp_path):
    cfg = {"r": 1, "lora_alpha": 2, "target_modules": ["q_proj", "down_proj"],
           "rank_pattern": {"model.layers.0.self_attn.q_proj": 3}}
    rec = export_pair(tiny_llama, pair, tmp_path / "a",
                      rule=RankRule(config=cfg, config_path="lora_config.json"))
    assert {m["module"]: m["rank"] for m in rec["modules"]} == {"q_proj": 3, "v_proj": 0,
                                                               "down_proj": 1}
    left = next(m for m in rec["modules"] if m["module"] == "v_proj")
    assert left["retained_energy"] == 0.0 and "target_modules" in left["note"]
    assert rec["rule"]["from"] == "lora_config.json"


def test_gpt2_conv1d_weights_export_in_their_own_orientation(tiny_gpt2, make_finetuned,
                                                             chosen_factors, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    B, A = chosen_factors((2.0, 1.0), 96, 32, seed=5)                   # c_attn: y = W x, 96×32
    ft = make_finetuned(tiny_gpt2, tmp_path / "ft", {"h.0.attn.c_attn": B @ A})  # a GPT2Model
    rec = export_pair(tiny_gpt2, ft, tmp_path / "a", rule=RankRule(rank=2))
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] and cfg["task_type"] == rec["task_type"] == "FEATURE_EXTRACTION"
    with torch.no_grad():
        got = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_gpt2), tmp_path / "a")(IDS)
        want = AutoModel.from_pretrained(ft)(IDS)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------- run folders

def host_parameters(model_dir):
    """Every parameter of the causal LM that has no ΔW, as a full run's others.safetensors."""
    from rankscope.train.models import find_linear_modules

    model = causal(model_dir)
    covered = {f"{i.name}.weight" for i in find_linear_modules(model) if "lm_head" not in i.name}
    return {n: p.detach().clone() for n, p in model.named_parameters() if n not in covered}


@pytest.fixture
def full_run(tiny_llama, make_run, chosen_factors, tmp_path):
    """``make(changes)``: a full run folder of the planted updates, with others changed by
    ``changes`` ({parameter: added value})."""
    def make(changes=None, name="full-s0"):
        deltas = {f"model.{n}.delta": B @ A for n, (B, A) in factors(chosen_factors).items()}
        run = make_run(tmp_path / "sweep" / name, deltas, method="full", seed=0,
                       model="tiny", model_path=str(tiny_llama), task_kind="lm")
        others = host_parameters(tiny_llama)
        for n, v in (changes or {}).items():
            others[n] = others[n] + v
        write_updates(run / OTHERS, others, method="others")
        return run

    return make


def test_a_full_run_with_its_changed_norms_in_modules_to_save(tiny_llama, pair, full_run,
                                                              make_finetuned, tmp_path):
    run = full_run({"model.norm.weight": 0.5, "model.layers.0.input_layernorm.weight": -0.25})
    plain = export_adapter(resolve_source(run), rule=RankRule(rank=4), out=tmp_path / "plain")
    assert plain["changed_not_saved"] == ["model.layers.0.input_layernorm.weight",
                                          "model.norm.weight"]
    torch.testing.assert_close(peft_logits(tiny_llama, tmp_path / "plain"), logits(pair),
                               atol=2e-5, rtol=1e-4)
    rec = export_adapter(resolve_source(run), rule=RankRule(rank=4), out=tmp_path / "a",
                         save_changed=True)
    assert rec["modules_to_save"] == ["model.layers.0.input_layernorm", "model.norm"]
    assert rec["changed_not_saved"] == [] and rec["source"]["kind"] == "run"
    ft = causal(pair)
    with torch.no_grad():
        ft.model.norm.weight += 0.5
        ft.model.layers[0].input_layernorm.weight -= 0.25
        torch.testing.assert_close(peft_logits(tiny_llama, tmp_path / "a"), ft(IDS).logits,
                                   atol=2e-5, rtol=1e-4)


def test_changed_parameters_that_modules_to_save_cannot_carry_are_refused(full_run, tmp_path):
    run = full_run({"model.embed_tokens.weight": 0.1})        # tied to lm_head
    with pytest.raises(InputError, match="tied to lm_head.weight"):
        export_adapter(resolve_source(run), rule=RankRule(rank=1), out=tmp_path / "a",
                       save_changed=True)
    assert not (tmp_path / "a").exists()


def test_a_changed_bias_of_an_adapted_module_is_refused(tiny_bert, make_run, chosen_factors,
                                                        tmp_path):
    from transformers import AutoModel

    B, A = chosen_factors((1.0,), 32, 32)
    run = make_run(tmp_path / "full-s0", {"encoder.layer.0.attention.self.query.delta": B @ A},
                   method="full", seed=0, model_path=str(tiny_bert), task_kind="distill")
    others = {n: p.detach().clone() for n, p in AutoModel.from_pretrained(tiny_bert).named_parameters()
              if not n.endswith(".weight") or "LayerNorm" in n or "embeddings" in n}
    others["encoder.layer.0.attention.self.query.bias"] += 1.0
    write_updates(run / OTHERS, others, method="others")
    with pytest.raises(InputError, match="holds the LoRA adapter of encoder.layer.0.attention.self.query"):
        export_adapter(resolve_source(run), rule=RankRule(rank=1), out=tmp_path / "a",
                       save_changed=True)
    rec = export_adapter(resolve_source(run), rule=RankRule(rank=1), out=tmp_path / "b")
    assert rec["task_type"] == "FEATURE_EXTRACTION"
    assert rec["changed_not_saved"] == ["encoder.layer.0.attention.self.query.bias"]


# ------------------------------------------------------------------- LoRA → lower rank

@pytest.fixture(scope="module")
def lora(tiny_llama, make_adapter, chosen_factors, tmp_path_factory):
    """An rsLoRA r = 4 adapter on q/v (scale α/√r = 4) whose every s·B·A has a known spectrum:
    4·σ(B·A), σ(B·A) = (2, 1, 0.5, 0.25)."""
    names = [f"model.layers.{i}.self_attn.{m}_proj" for i in (0, 1) for m in ("q", "v")]
    chosen = {n: chosen_factors((2.0, 1.0, 0.5, 0.25), *shape(n), seed=i)
              for i, n in enumerate(names)}
    out = tmp_path_factory.mktemp("lora") / "adapter"
    make_adapter(tiny_llama, out, factors={n: (B.float(), A.float()) for n, (B, A) in chosen.items()},
                 r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"],
                 task_type="CAUSAL_LM")
    return out, chosen


def test_a_resize_at_the_adapters_own_rank_gives_back_the_adapter(tiny_llama, lora, tmp_path):
    src, _ = lora
    rec = export_adapter(resolve_source(adapter=src), rule=RankRule(rank=4), out=tmp_path / "a")
    torch.testing.assert_close(peft_logits(tiny_llama, tmp_path / "a"),
                               peft_logits(tiny_llama, src), atol=2e-5, rtol=1e-4)
    assert {m["source_rank"] for m in rec["modules"]} == {4}
    assert rec["source"] == {"kind": "adapter", "adapter": str(src), "method": "lora"}


def test_a_resize_to_rank_2_is_w0_plus_trunc_2_of_s_b_a(tiny_llama, lora, make_finetuned, tmp_path):
    src, chosen = lora
    rec = export_adapter(resolve_source(adapter=src), rule=RankRule(rank=2), out=tmp_path / "a")
    parts = {n.removeprefix("model."): (4 * B[:, :2], A[:2]) for n, (B, A) in chosen.items()}
    ref = reference(make_finetuned, tiny_llama, tmp_path / "ref", parts)
    torch.testing.assert_close(peft_logits(tiny_llama, tmp_path / "a"), logits(ref),
                               atol=2e-5, rtol=1e-4)
    assert all(m["retained_energy"] == pytest.approx(5 / 5.3125) for m in rec["modules"])
    with pytest.raises(InputError, match="above its LoRA rank 4"):
        export_adapter(resolve_source(adapter=src), rule=RankRule(rank=5), out=tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_a_lora_run_folder_is_resized_from_its_adapter(tiny_llama, lora, make_run, tmp_path):
    import shutil

    src, _ = lora
    run = make_run(tmp_path / "lora-r4-s0", {"x.lora_A": torch.zeros(4, 2), "x.lora_B": torch.zeros(2, 4),
                                             "x.scaling": torch.tensor(1.0)},
                   method="lora", rank=4, seed=0, model_path=str(tiny_llama), task_kind="lm")
    shutil.copytree(src, run / "adapter")
    rec = export_adapter(resolve_source(run), rule=RankRule(energy=0.75), out=tmp_path / "a")
    assert {m["rank"] for m in rec["modules"]} == {1}                  # 4/5.3125 = 0.753
    assert rec["source"]["kind"] == "run" and rec["source"]["method"] == "lora"
    with pytest.raises(InputError, match="--save-changed-modules is for full fine-tunes"):
        export_adapter(resolve_source(run), rule=RankRule(rank=1), out=tmp_path / "b",
                       save_changed=True)


# ------------------------------------------------------------- sequence classification

def test_a_classifiers_new_head_travels_in_modules_to_save(tiny_bert, make_run, chosen_factors,
                                                          tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification as Classifier

    from rankscope.train.models import HEADS, find_linear_modules

    def classifier():
        return Classifier.from_pretrained(tiny_bert, num_labels=3).eval()

    q = "bert.encoder.layer.0.attention.self.query"
    B, A = chosen_factors((1.0, 0.5), 32, 32)
    torch.manual_seed(1)
    ft = classifier()                                        # its head: the "trained" one
    with torch.no_grad():
        ft.get_submodule(q).weight += (B @ A).float()
    covered = {f"{i.name}.weight" for i in find_linear_modules(ft) if not HEADS & set(i.name.split("."))}
    labels = label_file(["greetings", "food", "money"])     # as a classification run records
    run = make_run(tmp_path / "full-s0", {f"{q}.delta": B @ A}, method="full", seed=0,
                   model_path=str(tiny_bert), task_kind="cls", **labels)
    write_updates(run / OTHERS, {n: p for n, p in ft.named_parameters() if n not in covered},
                  method="others")
    with pytest.raises(InputError, match="new classification head"):
        export_adapter(resolve_source(run), rule=RankRule(rank=2), out=tmp_path / "a")
    rec = export_adapter(resolve_source(run), rule=RankRule(rank=2), out=tmp_path / "a",
                         save_changed=True)
    assert rec["modules_to_save"] == ["classifier"] and rec["task_type"] == "SEQ_CLS"
    # the head's labels travel with it, so the export loads without guessing their count
    assert json.loads((tmp_path / "a" / LABELS).read_text()) == json.loads(json.dumps(labels))
    with torch.no_grad():
        want = ft(IDS).logits
        torch.testing.assert_close(PeftModel.from_pretrained(classifier(), tmp_path / "a")(IDS).logits,
                                   want, atol=2e-5, rtol=1e-4)
        lora = get_peft_model(classifier(), LoraConfig(r=2, lora_alpha=4, target_modules=["query"],
                                                       task_type="SEQ_CLS"))
        for mod in lora.modules():                           # B ≠ 0, so that ΔW ≠ 0
            if hasattr(mod, "lora_B"):
                mod.lora_B["default"].weight.normal_()
        lora.save_pretrained(tmp_path / "src")
        export_adapter(resolve_source(adapter=tmp_path / "src"), rule=RankRule(rank=2),
                       out=tmp_path / "no-labels")
        assert not (tmp_path / "no-labels" / LABELS).exists()   # none to copy
        (tmp_path / "src" / LABELS).write_text(json.dumps(labels))
        export_adapter(resolve_source(adapter=tmp_path / "src"), rule=RankRule(rank=2),
                       out=tmp_path / "b")
        assert json.loads((tmp_path / "b" / LABELS).read_text()) == json.loads(json.dumps(labels))
        torch.testing.assert_close(PeftModel.from_pretrained(classifier(), tmp_path / "b")(IDS).logits,
                                   lora.eval()(IDS).logits, atol=2e-5, rtol=1e-4)
