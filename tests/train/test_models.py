"""Tests of rankscope.train.models: name parsing, linear-module discovery, the registry, slices."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from rankscope.errors import InputError, ModelNotFoundError
from rankscope.train.models import (
    find_linear_modules,
    linear_weight,
    load_backbone,
    load_pretrained,
    match_name,
    model_type,
    parse_names,
    resolve_model,
    save_slice,
)

# ------------------------------------------------------------------------- parse_names

LLAMA_KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def test_parse_names_llama():
    names = [f"model.layers.{i}.{k}" for i in range(3) for k in LLAMA_KINDS] + ["lm_head"]
    parsed = parse_names(names)
    assert parsed["model.layers.2.self_attn.q_proj"] == (2, "q_proj")
    assert parsed["model.layers.0.mlp.down_proj"] == (0, "down_proj")
    assert parsed["lm_head"] == (None, "lm_head")
    assert {kind for layer, kind in parsed.values() if layer is not None} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_parse_names_bert_disambiguates_the_dense_layers():
    kinds = ["attention.self.query", "attention.self.key", "attention.self.value",
             "attention.output.dense", "intermediate.dense", "output.dense"]
    names = [f"encoder.layer.{i}.{k}" for i in range(2) for k in kinds] + ["pooler.dense"]
    parsed = parse_names(names)
    assert [parsed[f"encoder.layer.1.{k}"] for k in kinds] == [
        (1, "query"), (1, "key"), (1, "value"), (1, "attention.output.dense"),
        (1, "intermediate.dense"), (1, "output.dense")]
    assert parsed["pooler.dense"] == (None, "pooler.dense")


def test_parse_names_gpt2_c_proj_in_attn_and_mlp():
    kinds = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    parsed = parse_names([f"transformer.h.{i}.{k}" for i in range(2) for k in kinds])
    assert [parsed[f"transformer.h.0.{k}"][1] for k in kinds] == [
        "c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]
    assert parsed["transformer.h.1.mlp.c_proj"] == (1, "mlp.c_proj")


def test_parse_names_t5_layer_is_the_block_index():
    enc = ["layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v",
           "layer.0.SelfAttention.o", "layer.1.DenseReluDense.wi", "layer.1.DenseReluDense.wo"]
    dec = ["layer.0.SelfAttention.q", "layer.0.SelfAttention.o", "layer.1.EncDecAttention.q",
           "layer.1.EncDecAttention.o", "layer.2.DenseReluDense.wi", "layer.2.DenseReluDense.wo"]
    names = ([f"encoder.block.{i}.{k}" for i in range(4) for k in enc]
             + [f"decoder.block.{i}.{k}" for i in range(4) for k in dec] + ["lm_head"])
    parsed = parse_names(names)
    assert parsed["encoder.block.3.layer.0.SelfAttention.q"] == (3, "SelfAttention.q")
    assert parsed["encoder.block.2.layer.1.DenseReluDense.wi"] == (2, "wi")
    assert parsed["decoder.block.1.layer.1.EncDecAttention.q"] == (1, "EncDecAttention.q")
    assert parsed["decoder.block.3.layer.2.DenseReluDense.wo"] == (3, "wo")
    assert parsed["lm_head"] == (None, "lm_head")
    assert {layer for layer, _ in parsed.values() if layer is not None} == {0, 1, 2, 3}


def test_parse_names_moe_experts_belong_to_their_block():
    names = [f"model.layers.{i}.mlp.experts.{e}.{w}" for i in range(2) for e in range(4)
             for w in ("w1", "w2")] + [f"model.layers.{i}.mlp.gate" for i in range(2)]
    parsed = parse_names(names)
    assert parsed["model.layers.1.mlp.experts.3.w2"] == (1, "w2")
    assert parsed["model.layers.0.mlp.gate"] == (0, "gate")


def test_parse_names_trailing_integer_and_no_integer():
    parsed = parse_names(["projector.0", "projector.2", "classifier"])
    assert parsed == {"projector.0": (0, "projector"), "projector.2": (2, "projector"),
                      "classifier": (None, "classifier")}


# ---------------------------------------------------------------- find_linear_modules

def test_find_linear_modules_minilm_slice(minilm_slice):
    infos = find_linear_modules(load_backbone(minilm_slice))
    assert len(infos) == 2 * 6 + 1                        # 6 per block, and the pooler
    by_kind = {(i.layer, i.module): (i.d_out, i.d_in) for i in infos}
    assert by_kind[(0, "query")] == (384, 384)
    assert by_kind[(1, "attention.output.dense")] == (384, 384)
    assert by_kind[(1, "intermediate.dense")] == (1536, 384)
    assert by_kind[(0, "output.dense")] == (384, 1536)
    assert by_kind[(None, "pooler.dense")] == (384, 384)
    assert not any(i.fan_in_fan_out for i in infos)


def test_find_linear_modules_smollm2_slice_excludes_tied_head(smollm2_slice):
    from transformers import AutoModelForCausalLM

    model = load_pretrained(AutoModelForCausalLM, smollm2_slice)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    infos = find_linear_modules(model)
    assert len(infos) == 2 * 7
    assert all(i.name.startswith("model.layers.") for i in infos)
    shapes = {i.module: (i.d_out, i.d_in) for i in infos}
    assert shapes == {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576),
                      "o_proj": (576, 576), "gate_proj": (1536, 576), "up_proj": (1536, 576),
                      "down_proj": (576, 1536)}
    assert [i.name for i in find_linear_modules(load_backbone(smollm2_slice))] == [
        i.name.removeprefix("model.") for i in infos]


def test_find_linear_modules_keeps_an_untied_head(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                         tie_word_embeddings=False)
    infos = find_linear_modules(LlamaForCausalLM(config))
    assert [(i.name, i.layer, i.d_out, i.d_in) for i in infos][-1] == ("lm_head", None, 50, 32)
    assert len(infos) == 8


def test_find_linear_modules_gpt2_conv1d(tiny_gpt2):
    model = load_backbone(tiny_gpt2)
    infos = find_linear_modules(model)
    assert len(infos) == 2 * 4 and all(i.fan_in_fan_out for i in infos)
    shapes = {i.module: (i.d_out, i.d_in) for i in infos}
    assert shapes == {"c_attn": (96, 32), "attn.c_proj": (32, 32), "c_fc": (128, 32),
                      "mlp.c_proj": (32, 128)}
    conv = model.get_submodule("h.0.mlp.c_fc")
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    w = linear_weight(conv)                                   # (d_out, d_in) as y = W x
    torch.testing.assert_close(conv(x), x @ w.T + conv.bias)


def test_linear_weight_of_nn_linear_is_the_weight():
    lin = nn.Linear(3, 5)
    assert linear_weight(lin) is lin.weight


def test_model_type(minilm_slice, smollm2_slice):
    assert model_type(load_backbone(minilm_slice)) == "bert"
    assert model_type(load_backbone(smollm2_slice)) == "llama"


@pytest.mark.slow
def test_find_linear_modules_full_smollm2():
    infos = find_linear_modules(load_backbone("smollm2-135m"))
    assert len(infos) == 30 * 7 == 210
    assert {i.layer for i in infos} == set(range(30))


# ---------------------------------------------------------------------- resolve_model

def test_resolve_model_registry_and_folders(minilm_dir, smollm2_slice):
    assert (minilm_dir / "config.json").is_file()
    assert (resolve_model("smollm2-135m") / "config.json").is_file()   # cached conversion
    assert resolve_model(smollm2_slice) == smollm2_slice
    assert resolve_model(str(smollm2_slice)) == smollm2_slice


def test_resolve_model_unknown_name():
    with pytest.raises(ModelNotFoundError, match="unknown model 'no-such-model'"):
        resolve_model("no-such-model")


def test_resolve_model_hub_id_offline():
    with pytest.raises(ModelNotFoundError, match="offline"):
        resolve_model("no-such-owner/no-such-model")


@pytest.mark.parametrize("name", ["/no/such/dir", "./no-such-dir", "a/b/c"])
def test_resolve_model_missing_path(name):
    with pytest.raises(InputError, match="does not exist"):
        resolve_model(name)


def test_resolve_model_folder_without_config(tmp_path):
    with pytest.raises(InputError, match="no config.json"):
        resolve_model(tmp_path)


def test_load_pretrained_corrupt_weights_is_input_error(minilm_slice, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(minilm_slice, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(InputError, match="cannot load model"):
        load_backbone(broken)


# ------------------------------------------------------------------------- match_name

@pytest.mark.parametrize("key, expected", [
    ("layers.0.self_attn.q_proj", "layers.0.self_attn.q_proj"),           # equal
    ("model.layers.0.self_attn.q_proj", "layers.0.self_attn.q_proj"),     # key has a prefix
    ("0.self_attn.q_proj", "layers.0.self_attn.q_proj"),                  # name has a prefix
    ("q_proj", "layers.0.self_attn.q_proj"),                              # the one name ending so
    ("layers.1.self_attn.q_proj", None),
    ("layers.0.self_attn.xq_proj", None),                                 # not on a dot boundary
    ("proj", None),
])
def test_match_name(key, expected):
    names = {"layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj"}
    assert match_name(key, names) == expected


def test_match_name_prefers_the_longest_common_suffix():
    names = ["attn.q", "layers.0.attn.q"]
    assert match_name("model.layers.0.attn.q", names) == "layers.0.attn.q"


# -------------------------------------------------------------------------- save_slice

def test_save_slice_keeps_the_pretrained_blocks(minilm_slice, minilm_dir):
    sliced, full = load_backbone(minilm_slice), load_backbone(minilm_dir)
    assert sliced.config.num_hidden_layers == 2 and len(sliced.encoder.layer) == 2
    for name, p in sliced.named_parameters():
        torch.testing.assert_close(p, full.get_parameter(name), rtol=0, atol=0)
    assert (minilm_slice / "tokenizer.json").is_file()


def test_save_slice_smollm2_config(smollm2_slice):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(smollm2_slice)
    assert config.num_hidden_layers == 2 and config.hidden_size == 576
    if getattr(config, "layer_types", None) is not None:
        assert len(config.layer_types) == 2


@pytest.mark.parametrize("n_layers", [0, 7])
def test_save_slice_rejects_bad_layer_count(n_layers, tmp_path):
    with pytest.raises(InputError, match=r"n_layers must be in \[1, 6\]"):
        save_slice("minilm-l6", tmp_path / "x", n_layers=n_layers)


# ------------------------------------------------------------ registry slices (name@<n>l)

def test_registry_slice_name_is_cached(minilm_dir):
    from transformers import AutoConfig

    path = resolve_model("minilm-l6@2l")
    assert AutoConfig.from_pretrained(path).num_hidden_layers == 2
    assert resolve_model("minilm-l6@2l") == path                        # second call: the cache
    assert len(find_linear_modules(load_backbone("minilm-l6@2l"))) == 13


def test_registry_slice_errors():
    with pytest.raises(InputError, match=r"n_layers must be in \[1, 6\]"):
        resolve_model("minilm-l6@9l")
    with pytest.raises(ModelNotFoundError, match="unknown model"):
        resolve_model("no-such-model@2l")
