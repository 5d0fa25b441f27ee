"""Tests of rankscope.analysis.deltas: ΔW from real peft adapters, model pairs and run folders.

peft itself is the reference for adapters: each module's ``get_delta_weight`` (ΔW with peft's
own scaling for α/r, rsLoRA and rank/alpha patterns) must equal rankscope's ΔW.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import rankscope.train.models as models_module
from rankscope.analysis.analyze import analyze
from rankscope.analysis.deltas import (
    ModuleDelta,
    from_adapter,
    from_model_pair,
    from_run,
    from_runs,
    lora_scale,
    pattern_value,
)
from rankscope.errors import InputError

MINILM = {"target_modules": ["query", "value", "dense"],          # "dense": 3 per block + pooler
          "rank_pattern": {"intermediate.dense": 2, r"layer\.1\.attention\.self\.query": 6},
          "alpha_pattern": {"value": 3, r"output\.dense": 5}}
SMOLLM2 = {"target_modules": ["q_proj", "v_proj", "gate_proj", "down_proj"],
           "rank_pattern": {"down_proj": 2, "layers.1.self_attn.q_proj": 6},
           "alpha_pattern": {"v_proj": 3, "gate_proj": 12}}
VARIANTS = {
    "alpha/r": {},
    "rslora": {"use_rslora": True},
    "patterns": {"rank_pattern": True},
    "patterns+rslora": {"rank_pattern": True, "use_rslora": True},
}


def _lora_kwargs(family: dict, variant: str) -> dict:
    kw = {"r": 4, "lora_alpha": 8, "target_modules": family["target_modules"],
          "use_rslora": VARIANTS[variant].get("use_rslora", False)}
    if VARIANTS[variant].get("rank_pattern"):
        kw |= {"rank_pattern": family["rank_pattern"], "alpha_pattern": family["alpha_pattern"]}
    return kw


def _lora_layers(peft_model) -> dict:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}


def _check_against_peft(peft_model, adapter_dir, base_dir, *, transpose=False):
    """Every module: rankscope's r, scale and ΔW equal peft's; analyze's σ equal σ(peft ΔW)."""
    layers = _lora_layers(peft_model)
    deltas = {d.name: d for d in from_adapter(adapter_dir, base=base_dir)}
    assert set(deltas) == set(layers)
    refs = {}
    for name, mod in layers.items():
        d, ref = deltas[name], mod.get_delta_weight("default").detach()
        ref = ref.T if transpose else ref                        # peft stores Conv1D ΔW (d_in, d_out)
        assert d.factored and d.rank == mod.r["default"]
        assert d.scale == pytest.approx(mod.scaling["default"], rel=1e-12)
        assert (d.d_out, d.d_in) == tuple(ref.shape)
        torch.testing.assert_close(d.materialize(), ref, rtol=0, atol=1e-6)
        refs[name] = ref
    spectra, modules = analyze(adapter=adapter_dir, base=str(base_dir), progress=False)
    for name, ref in refs.items():
        sigma = torch.tensor(spectra.loc[spectra["name"] == name, "sigma"].to_numpy())
        expected = torch.linalg.svdvals(ref)[: layers[name].r["default"]].double()
        torch.testing.assert_close(sigma, expected, rtol=0, atol=1e-5 * float(expected[0]))
    assert modules.set_index("name")["rank"].to_dict() == {n: m.r["default"] for n, m in layers.items()}
    return deltas


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_adapter_on_minilm(variant, minilm_dir, make_adapter, tmp_path):
    model = make_adapter(minilm_dir, tmp_path / "adapter", **_lora_kwargs(MINILM, variant))
    deltas = _check_against_peft(model, tmp_path / "adapter", minilm_dir)
    assert len(deltas) == 6 * 5 + 1
    assert deltas["pooler.dense"].layer is None
    if variant.startswith("patterns"):
        assert deltas["encoder.layer.1.attention.self.query"].rank == 6
        assert deltas["encoder.layer.0.attention.self.query"].rank == 4
        assert deltas["encoder.layer.3.intermediate.dense"].rank == 2


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_adapter_on_smollm2_slice(variant, smollm2_slice, make_adapter, tmp_path):
    model = make_adapter(smollm2_slice, tmp_path / "adapter", **_lora_kwargs(SMOLLM2, variant))
    deltas = _check_against_peft(model, tmp_path / "adapter", smollm2_slice)
    assert sorted({(d.layer, d.module) for d in deltas.values()}) == sorted(
        (i, k) for i in range(2) for k in ("q_proj", "v_proj", "gate_proj", "down_proj"))
    expected_scale = {"alpha/r": 2.0, "rslora": 4.0}.get(variant)
    if expected_scale is not None:
        assert {d.scale for d in deltas.values()} == {expected_scale}


def test_peft_adapter_fan_in_fan_out_conv1d(tiny_gpt2, make_adapter, tmp_path):
    model = make_adapter(tiny_gpt2, tmp_path / "adapter", r=3, lora_alpha=6,
                         target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    deltas = _check_against_peft(model, tmp_path / "adapter", tiny_gpt2, transpose=True)
    assert (deltas["h.0.attn.c_attn"].d_out, deltas["h.0.attn.c_attn"].d_in) == (96, 32)
    assert {d.module for d in deltas.values()} == {"c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"}


def test_adapter_without_base_reads_the_same(minilm_slice, make_adapter, tmp_path):
    make_adapter(minilm_slice, tmp_path / "a", r=2, target_modules=["query"])
    ds = from_adapter(tmp_path / "a")
    assert (ds.method, ds.rank, ds.n_modules, ds.run) == ("lora", 2, 2, "a")
    assert ds.meta["base_model_name_or_path"] == str(minilm_slice)
    assert [d.name for d in ds] == [f"encoder.layer.{i}.attention.self.query" for i in range(2)]


# ------------------------------------------------------------------ peft pattern rules

@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                                  "model.layers.11.self_attn.q_proj", "model.layers.1.mlp.down_proj",
                                  "model.layers.1.mlp.xdown_proj", "encoder.layer.1.output.dense"])
def test_pattern_value_follows_peft(name):
    from peft.utils.other import get_pattern_key

    pattern = {"down_proj": 2, r"layers\.1\.self_attn\.q_proj": 6, "output.dense": 3,
               r"layers\.1\d\..*q_proj": 7}
    key = get_pattern_key(pattern.keys(), name)
    assert pattern_value(pattern, name, 8) == pattern.get(key, 8)


def test_lora_scale():
    assert lora_scale(16, 4, rslora=False) == 4.0
    assert lora_scale(16, 4, rslora=True) == 8.0


def test_materialize_dense_and_factored():
    B, A = torch.ones(3, 1), torch.arange(4.0)[None]
    d = ModuleDelta("x", 0, "x", 3, 4, B=B, A=A, scale=0.5)
    torch.testing.assert_close(d.materialize(torch.float64), 0.5 * (B @ A).double())
    dense = ModuleDelta("x", 0, "x", 3, 4, dense=torch.eye(3, 4, dtype=torch.bfloat16))
    assert dense.rank is None and not dense.factored
    assert dense.materialize().dtype == torch.float32


# ---------------------------------------------------------------------- adapter errors

@pytest.fixture
def minilm_adapter(minilm_slice, make_adapter, tmp_path):
    make_adapter(minilm_slice, tmp_path / "adapter", r=4, target_modules=["query", "value"])
    return tmp_path / "adapter"


def _edit_config(adapter_dir, **changes):
    path = adapter_dir / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _edit_tensors(adapter_dir, edit):
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_adapter_missing_folder_or_config(tmp_path):
    with pytest.raises(InputError, match="missing adapter folder"):
        from_adapter(tmp_path / "nope")
    with pytest.raises(InputError, match="no adapter_config.json"):
        from_adapter(tmp_path)


def test_adapter_corrupt_config(minilm_adapter):
    (minilm_adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(InputError, match="corrupt adapter config"):
        from_adapter(minilm_adapter)


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty", "missing"])
def test_adapter_corrupt_weights(how, minilm_adapter):
    path = minilm_adapter / "adapter_model.safetensors"
    data = path.read_bytes()
    if how == "missing":
        path.unlink()
    else:
        path.write_bytes({"truncated": data[: len(data) * 2 // 3], "empty": b"",
                          "garbage": bytes(range(256)) * 40}[how])
    message = "no adapter_model" if how == "missing" else "corrupt or truncated safetensors"
    with pytest.raises(InputError, match=message):
        from_adapter(minilm_adapter)


@pytest.mark.parametrize("method", ["IA3", "LOHA"])
def test_real_non_lora_adapter_is_refused(method, minilm_slice, tmp_path):
    from peft import IA3Config, LoHaConfig, get_peft_model
    from transformers import AutoModel

    config = (IA3Config(target_modules=["query", "value"], feedforward_modules=[])
              if method == "IA3" else LoHaConfig(target_modules=["query", "value"]))
    get_peft_model(AutoModel.from_pretrained(minilm_slice), config).save_pretrained(tmp_path / "a")
    with pytest.raises(InputError, match=f"of method '{method}', not LoRA"):
        from_adapter(tmp_path / "a")


def test_dora_adapter_is_refused(minilm_slice, make_adapter, tmp_path):
    make_adapter(minilm_slice, tmp_path / "a", r=2, target_modules=["query"], use_dora=True)
    with pytest.raises(InputError, match="DoRA"):
        from_adapter(tmp_path / "a")


def test_adapter_missing_factor(minilm_adapter):
    key = "base_model.model.encoder.layer.1.attention.self.value.lora_B.weight"
    _edit_tensors(minilm_adapter, lambda t: t.pop(key))
    with pytest.raises(InputError, match="encoder.layer.1.attention.self.value lacks its lora_B"):
        from_adapter(minilm_adapter)


def test_adapter_without_lora_weights(minilm_adapter):
    save_file({"classifier.weight": torch.ones(2, 384)}, minilm_adapter / "adapter_model.safetensors")
    with pytest.raises(InputError, match="holds no LoRA weights"):
        from_adapter(minilm_adapter)


def test_adapter_rank_disagrees_with_config(minilm_adapter):
    _edit_config(minilm_adapter, r=5)
    with pytest.raises(InputError, match="not rank 5 as its config says"):
        from_adapter(minilm_adapter)


@pytest.mark.parametrize("factor, bad", [("lora_A", float("nan")), ("lora_B", float("inf"))])
def test_adapter_nan_or_inf_factor(factor, bad, minilm_adapter):
    key = f"base_model.model.encoder.layer.0.attention.self.query.{factor}.weight"
    _edit_tensors(minilm_adapter, lambda t: t[key].view(-1).__setitem__(3, bad))
    with pytest.raises(InputError, match=f"{factor} of encoder.layer.0.attention.self.query .*NaN or Inf"):
        from_adapter(minilm_adapter)


def test_adapter_for_another_model_names(minilm_adapter, smollm2_slice):
    with pytest.raises(InputError, match="does not exist in base model"):
        from_adapter(minilm_adapter, base=smollm2_slice)


def test_adapter_for_another_model_shapes(smollm2_slice, make_adapter, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny-llama")
    make_adapter(tmp_path / "tiny-llama", tmp_path / "a", r=2, target_modules=["q_proj"])
    with pytest.raises(InputError, match=re.escape("is (64, 64) but base model") + ".*(576, 576)"):
        from_adapter(tmp_path / "a", base=smollm2_slice)


# ------------------------------------------------------------------------ model pairs

def test_model_pair_recovers_perturbation(minilm_slice, make_finetuned, chosen_factors, tmp_path):
    B, A = chosen_factors([2.0, 1.0], 1536, 384)
    perturb = {"encoder.layer.1.intermediate.dense": B @ A,
               "pooler.dense": torch.full((384, 384), 0.25, dtype=torch.float64)}
    ft = make_finetuned(minilm_slice, tmp_path / "ft", perturb)
    ds = from_model_pair(minilm_slice, ft)
    assert (ds.method, ds.rank, ds.run, ds.n_modules) == ("full", None, "ft", 13)
    deltas = list(ds)
    assert [d.name for d in deltas] == list(perturb)                  # unchanged ones skipped
    for d in deltas:
        assert not d.factored and d.rank is None
        torch.testing.assert_close(d.materialize(), perturb[d.name].float(), rtol=0, atol=1e-6)
    assert (deltas[0].layer, deltas[0].module) == (1, "intermediate.dense")


def test_model_pair_conv1d_orientation(tiny_gpt2, make_finetuned, chosen_factors, tmp_path):
    B, A = chosen_factors([1.0], 128, 32)                              # c_fc is (d_out 128, d_in 32)
    ft = make_finetuned(tiny_gpt2, tmp_path / "ft", {"h.1.mlp.c_fc": B @ A})
    (d,) = list(from_model_pair(tiny_gpt2, ft))
    assert (d.name, d.d_out, d.d_in) == ("h.1.mlp.c_fc", 128, 32)
    torch.testing.assert_close(d.materialize(), (B @ A).float(), rtol=0, atol=1e-6)


def test_model_pair_different_architectures(minilm_slice, smollm2_slice):
    with pytest.raises(InputError, match="different architectures.*llama.*bert"):
        from_model_pair(smollm2_slice, minilm_slice)


def test_model_pair_missing_module_and_shape_mismatch(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    def tiny(name, **kw):
        config = LlamaConfig(**({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                 "num_attention_heads": 4, "num_key_value_heads": 2,
                                 "vocab_size": 64} | kw))
        LlamaForCausalLM(config).save_pretrained(tmp_path / name)
        return tmp_path / name

    base, short, wide = tiny("base"), tiny("short", num_hidden_layers=1), tiny("wide", intermediate_size=96)
    with pytest.raises(InputError, match="layers.1.self_attn.q_proj of .* is missing from"):
        from_model_pair(base, short)
    with pytest.raises(InputError, match=r"shape mismatch at layers.0.mlp.gate_proj: base \(64, 32\), "
                                         r"finetuned \(96, 32\)"):
        from_model_pair(base, wide)


def test_model_pair_nan_weight(minilm_slice, make_finetuned, tmp_path):
    bad = torch.zeros(384, 384, dtype=torch.float64)
    bad[5, 7] = float("nan")
    ft = make_finetuned(minilm_slice, tmp_path / "ft", {"encoder.layer.1.attention.self.value": bad})
    with pytest.raises(InputError, match="encoder.layer.1.attention.self.value of .*ft contains NaN"):
        list(from_model_pair(minilm_slice, ft))


# ------------------------------------------------------- model pairs, streamed from safetensors

def _tiny(arch: str):
    """A tiny random model of ``arch``, as its checkpoints are saved (with or without a head)."""
    from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM)

    torch.manual_seed(0)
    if arch == "llama":                                    # keys carry a "model." prefix
        return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, vocab_size=64,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2))
    if arch == "bert":                                     # keys as the backbone names them
        return BertModel(BertConfig(hidden_size=32, intermediate_size=64, vocab_size=64,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    max_position_embeddings=32))
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64,   # Conv1D
                                      n_positions=32))


def _save(model, out, *, sharded: bool):
    from transformers.utils import logging

    logging.disable_progress_bar()
    model.save_pretrained(out, max_shard_size="20KB" if sharded else "50GB")
    return out


def _planted_pair(root, arch, chosen_factors, *, sharded=True, dtype=torch.float32, skip=1):
    """Base and fine-tuned folders of a tiny model whose linear weights but the ``skip``-th get
    W += P, P = U diag(1, 0.5) Vᵀ. Returns (base, ft, {name: P}, {name: ΔW as saved, float32})."""
    from rankscope.train.models import find_linear_modules, linear_weight

    model = _tiny(arch).to(dtype)
    base = _save(model, root / "base", sharded=sharded)
    backbone = model.base_model                             # the AutoModel part, its names
    planted, saved = {}, {}
    with torch.no_grad():
        for i, info in enumerate(find_linear_modules(backbone)):
            if i == skip:
                continue
            w = linear_weight(backbone.get_submodule(info.name))    # (d_out, d_in), a view
            before = w.float().clone()
            B, A = chosen_factors([1.0, 0.5], info.d_out, info.d_in, seed=i)
            w.add_((B @ A).to(dtype))
            planted[info.name], saved[info.name] = (B @ A).float(), w.float() - before
    return base, _save(model, root / "ft", sharded=sharded), planted, saved


def _whole_model_path(monkeypatch):
    """Make ``from_model_pair`` take its whole-model path (as for a folder without safetensors)."""
    monkeypatch.setattr(models_module, "has_safetensors", lambda folder: False)


@pytest.fixture
def no_whole_model_load(monkeypatch):
    """Fail any whole-model load: a streamed pair must never call one."""
    from transformers import AutoModel

    import rankscope.train.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("a whole model was loaded")

    monkeypatch.setattr(AutoModel, "from_pretrained", refuse)
    monkeypatch.setattr(models, "load_pretrained", refuse)
    monkeypatch.setattr(models_module, "load_backbone", refuse)


@pytest.mark.parametrize("arch, sharded, dtype", [
    ("llama", False, torch.float32), ("llama", True, torch.float32), ("llama", True, torch.bfloat16),
    ("bert", True, torch.float32), ("gpt2", True, torch.float32), ("gpt2", False, torch.float16)])
def test_streamed_pair_equals_the_whole_model_path_and_the_plant(
        arch, sharded, dtype, chosen_factors, tmp_path, monkeypatch):
    base, ft, planted, saved = _planted_pair(tmp_path, arch, chosen_factors, sharded=sharded,
                                             dtype=dtype)
    assert len(list(base.glob("*.safetensors"))) > (2 if sharded else 0)
    with monkeypatch.context() as m:
        _whole_model_path(m)
        loaded = list(from_model_pair(base, ft))
    streamed_set = from_model_pair(base, ft)
    streamed = list(streamed_set)
    assert streamed_set.n_modules == len(planted) + 1                  # the skipped one counted
    assert [d.name for d in streamed] == [d.name for d in loaded] == list(planted)
    tolerance = 1e-6 if dtype == torch.float32 else 2e-3              # the plant, rounded
    for s, w in zip(streamed, loaded):
        assert (s.layer, s.module, s.d_out, s.d_in) == (w.layer, w.module, w.d_out, w.d_in)
        assert s.dense.dtype == w.dense.dtype == torch.float32
        assert tuple(s.dense.shape) == (s.d_out, s.d_in)
        assert torch.equal(s.dense, w.dense) and torch.equal(s.dense, saved[s.name])
        torch.testing.assert_close(s.dense, planted[s.name], rtol=0, atol=tolerance)


def test_a_safetensors_pair_is_streamed_not_loaded(chosen_factors, tmp_path, no_whole_model_load):
    base, ft, planted, _ = _planted_pair(tmp_path, "llama", chosen_factors)
    assert [d.name for d in from_model_pair(base, ft)] == list(planted)


def test_registry_names_stream_and_unchanged_weights_are_skipped(no_whole_model_load):
    ds = from_model_pair("minilm-l6", "minilm-l6")
    assert ds.n_modules == 37 and list(ds) == []


def test_a_folder_without_safetensors_is_loaded_whole_and_its_pair_still_streams(
        chosen_factors, tmp_path, monkeypatch):
    from rankscope.train.models import load_backbone

    base, ft, _, saved = _planted_pair(tmp_path, "llama", chosen_factors, sharded=False)
    streamed = {d.name: d.dense for d in from_model_pair(base, ft)}
    state = load_file(ft / "model.safetensors")
    (ft / "model.safetensors").unlink()
    torch.save(state, ft / "pytorch_model.bin")
    calls = []
    monkeypatch.setattr(models_module, "load_backbone",
                        lambda name: calls.append(name) or load_backbone(name))
    loaded = {d.name: d.dense for d in from_model_pair(base, ft)}
    assert calls == [ft]                    # the base, in safetensors, still streams
    assert loaded.keys() == streamed.keys() == saved.keys()
    assert all(torch.equal(loaded[n], streamed[n]) for n in saved)


@pytest.mark.parametrize("model", ["llama", "bert", "gpt2", "minilm-l6"])
def test_meta_backbone_has_the_loaded_backbones_modules(model, tmp_path):
    from rankscope.train.models import find_linear_modules, load_backbone, meta_backbone

    path = model if "-" in model else _save(_tiny(model), tmp_path / model, sharded=False)
    meta = meta_backbone(path)
    assert all(p.is_meta for p in meta.parameters())
    assert find_linear_modules(meta) == find_linear_modules(load_backbone(path))


def _one_line(match, base, ft):
    with pytest.raises(InputError, match=match) as e:
        list(from_model_pair(base, ft))
    assert "\n" not in str(e.value)


@pytest.fixture
def sharded_pair(chosen_factors, tmp_path):
    base, ft, _, _ = _planted_pair(tmp_path, "llama", chosen_factors)
    return base, ft, json.loads((ft / "model.safetensors.index.json").read_text())["weight_map"]


def test_pair_with_a_missing_shard(sharded_pair):
    base, ft, weight_map = sharded_pair
    shard = ft / weight_map["model.layers.1.self_attn.v_proj.weight"]
    shard.unlink()
    _one_line(re.escape(f"missing shard {shard} named by {ft}"), base, ft)


def test_pair_with_a_truncated_shard(sharded_pair):
    base, ft, weight_map = sharded_pair
    shard = ft / weight_map["model.layers.0.mlp.down_proj.weight"]
    shard.write_bytes(shard.read_bytes()[:-64])
    _one_line(re.escape(f"corrupt or truncated safetensors file {shard}"), base, ft)


def _drop_or_edit(folder, key, edit=None):
    """Rewrite the single-file checkpoint of ``folder`` without ``key``, or with ``edit(t)``."""
    tensors = load_file(folder / "model.safetensors")
    if edit is None:
        del tensors[key]
    else:
        tensors[key] = edit(tensors[key])
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_pair_with_a_missing_tensor(chosen_factors, tmp_path):
    base, ft, _, _ = _planted_pair(tmp_path, "llama", chosen_factors, sharded=False)
    _drop_or_edit(ft, "model.layers.1.mlp.up_proj.weight")
    _one_line(f"module layers.1.mlp.up_proj of {base} is missing from {ft}", base, ft)
    _drop_or_edit(base, "model.layers.0.self_attn.k_proj.weight")
    _one_line(f"module layers.0.self_attn.k_proj of {base} has no weight in its checkpoint",
              base, ft)


def test_pair_with_a_stored_shape_or_dtype_that_does_not_fit(chosen_factors, tmp_path):
    base, ft, _, _ = _planted_pair(tmp_path, "gpt2", chosen_factors, sharded=False)
    _drop_or_edit(ft, "transformer.h.0.attn.c_attn.weight", lambda t: t.T.contiguous())
    _one_line(re.escape("shape mismatch at h.0.attn.c_attn: base (96, 32), finetuned (32, 96)"),
              base, ft)
    _drop_or_edit(base, "transformer.h.1.mlp.c_fc.weight", lambda t: t[:, :64].contiguous())
    _one_line(re.escape(f"checkpoint of {base} stores transformer.h.1.mlp.c_fc.weight as "
                        "(32, 64), but its config makes h.1.mlp.c_fc (128, 32)"), base, base)
    _drop_or_edit(ft, "transformer.h.0.attn.c_attn.weight", lambda t: t.T.contiguous().to(torch.int8))
    _one_line("h.0.attn.c_attn.weight of .* is stored as I8, not a float type", ft, ft)


def test_streamed_pair_of_different_architectures(tmp_path):
    llama = _save(_tiny("llama"), tmp_path / "llama", sharded=True)
    gpt2 = _save(_tiny("gpt2"), tmp_path / "gpt2", sharded=True)
    _one_line(f"different architectures: base {llama} is llama, finetuned {gpt2} is gpt2",
              llama, gpt2)


# ------------------------------------------------------------------------ run folders

def _lora_tensors(chosen_factors, names, r=4):
    tensors = {}
    for i, name in enumerate(names):
        B, A = chosen_factors([4.0, 2.0, 1.0, 0.5][:r], 24, 16, seed=i)
        tensors |= {f"{name}.lora_A": A, f"{name}.lora_B": B, f"{name}.scaling": torch.tensor(2.0)}
    return tensors


NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
         "model.layers.1.self_attn.q_proj", "model.layers.10.self_attn.q_proj"]


def test_run_folder_lora(chosen_factors, make_run, tmp_path):
    run = make_run(tmp_path / "lora-r4-s1", _lora_tensors(chosen_factors, NAMES),
                   method="lora", rank=4, seed=1)
    ds = from_run(run)
    assert (ds.run, ds.method, ds.rank, ds.seed, ds.n_modules) == ("lora-r4-s1", "lora", 4, 1, 4)
    deltas = list(ds)
    assert [d.name for d in deltas] == sorted(NAMES, key=lambda n: [int(p) if p.isdigit() else p
                                                                   for p in n.split(".")])
    assert [(d.layer, d.module) for d in deltas] == [(0, "down_proj"), (0, "q_proj"), (1, "q_proj"),
                                                     (10, "q_proj")]
    assert all(d.scale == 2.0 and d.rank == 4 and (d.d_out, d.d_in) == (24, 16) for d in deltas)


def test_run_folder_lora_with_a_at_initialisation(chosen_factors, make_run, tmp_path):
    tensors = _lora_tensors(chosen_factors, NAMES[:2])
    a0 = 0.5 * tensors[f"{NAMES[0]}.lora_A"]
    run = make_run(tmp_path / "lora-r4-s0", {**tensors, f"{NAMES[0]}.lora_A0": a0},
                   method="lora", rank=4, seed=0)
    deltas = {d.name: d for d in from_run(run)}
    torch.testing.assert_close(deltas[NAMES[0]].A0, a0.float())
    assert deltas[NAMES[1]].A0 is None                                  # an older run's module
    make_run(run, {**tensors, f"{NAMES[0]}.lora_A0": torch.ones(3, 16)}, method="lora", rank=4,
             seed=0)
    with pytest.raises(InputError, match=r"lora_A0 is \(3, 16\), lora_A \(4, 16\)"):
        list(from_run(run))


@pytest.mark.parametrize("edit, message", [
    ({"rank": 8}, r"manifest says rank 8, its factors of .* have rank 4; the manifest was edited"),
    ({"rank": "4"}, r"manifest says rank '4'"),
    ({"method": "full"}, r"updates are lora, manifest says full"),
    ({"method": "dora"}, r"unknown method 'dora' in its manifest"),
    ({"format": "x"}, r"is not a rankscope run manifest \(format 'x'\)"),
])
def test_a_manifest_edited_by_hand_to_disagree_with_its_run_is_one_line(
        chosen_factors, make_run, tmp_path, edit, message):
    import json

    run = make_run(tmp_path / "lora-r4-s0", _lora_tensors(chosen_factors, NAMES[:2]),
                   method="lora", rank=4, seed=0)
    path = run / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(InputError, match=message) as e:
        list(from_run(run))
    assert "\n" not in str(e.value)


def test_run_folder_full_and_sweep(chosen_factors, make_run, tmp_path):
    dense = {f"{n}.delta": torch.randn(8, 6, generator=torch.Generator().manual_seed(i))
             for i, n in enumerate(NAMES)}
    make_run(tmp_path / "sweep" / "full-s0", dense, method="full", rank=None, seed=0)
    make_run(tmp_path / "sweep" / "lora-r4-s0", _lora_tensors(chosen_factors, NAMES[:2]),
             method="lora", rank=4, seed=0)
    (tmp_path / "sweep" / "lora-r8-s0").mkdir()                        # unfinished: no manifest
    sets = from_runs(tmp_path / "sweep")
    assert [(s.run, s.method, s.rank) for s in sets] == [("full-s0", "full", None),
                                                         ("lora-r4-s0", "lora", 4)]
    full = {d.name: d for d in sets[0]}
    for key, t in dense.items():
        torch.testing.assert_close(full[key.removesuffix(".delta")].materialize(), t)


@pytest.mark.parametrize("problem, message", [
    ("no-manifest", "not a finished run"),
    ("bad-method", "unknown method 'qlora'"),
    ("no-scaling", "lacks model.layers.0.self_attn.q_proj.scaling"),
    ("unchained", "do not chain"),
    ("nan", "NaN or Inf"),
    ("method-mismatch", "updates are full, manifest says lora"),
    ("empty", "holds no lora updates"),
    ("truncated", "corrupt or truncated safetensors"),
])
def test_run_folder_errors(problem, message, chosen_factors, make_run, tmp_path):
    from rankscope.store.runs import UPDATES, MANIFEST, write_updates

    tensors = _lora_tensors(chosen_factors, NAMES[:1])
    run = make_run(tmp_path / "run", tensors, method="lora", rank=4, seed=0)
    if problem == "no-manifest":
        (run / MANIFEST).unlink()
    elif problem == "bad-method":
        make_run(run, tensors, method="qlora", rank=4, seed=0)
    elif problem == "truncated":
        data = (run / UPDATES).read_bytes()
        (run / UPDATES).write_bytes(data[: len(data) - 10])
    else:
        name = NAMES[0]
        if problem == "no-scaling":
            tensors.pop(f"{name}.scaling")
        elif problem == "unchained":
            tensors[f"{name}.lora_B"] = torch.ones(24, 3)
        elif problem == "nan":
            tensors[f"{name}.lora_B"][0, 0] = float("nan")
        elif problem == "empty":
            tensors = {"unrelated": torch.ones(2)}
        write_updates(run / UPDATES, tensors,
                      method="full" if problem == "method-mismatch" else "lora")
    with pytest.raises(InputError, match=message):
        list(from_run(run))
