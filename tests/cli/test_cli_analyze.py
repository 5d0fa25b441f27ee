"""``rankscope analyze`` through click's CliRunner: the three forms, and every bad input.

Every bad input must end with exit status 2 and one line ``rankscope: error: …`` naming the
problem, with no traceback and no output folder left behind.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from rankscope.cli import main

OUTPUTS = ["manifest.json", "modules.csv", "spectra.csv"]


def invoke(*args):
    return CliRunner().invoke(main, ["analyze", *map(str, args)])


def visible_lines(text: str) -> list[str]:
    """The non-blank lines a terminal would show: a carriage return redraws its line."""
    lines = (line.rsplit("\r", 1)[-1] for line in text.split("\n"))
    return [line for line in lines if line.strip()]


def assert_one_line_error(result, out, *fragments):
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = visible_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("rankscope: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0]
    assert result.stdout == ""
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


# ------------------------------------------------------------------------ inputs

@pytest.fixture(scope="module")
def minilm_adapter(minilm_slice, make_adapter, tmp_path_factory):
    """A real peft LoRA adapter on the MiniLM slice (query, value of both blocks)."""
    out = tmp_path_factory.mktemp("cli") / "adapter"
    make_adapter(minilm_slice, out, r=4, lora_alpha=8, target_modules=["query", "value"])
    return out


@pytest.fixture(scope="module")
def sweep(make_run, tmp_path_factory):
    """A sweep folder with one full and one LoRA run of two modules."""
    gen = torch.Generator().manual_seed(0)
    root = tmp_path_factory.mktemp("cli") / "sweep"
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    make_run(root / "full-s0", {f"{n}.delta": torch.randn(24, 16, generator=gen) for n in names},
             method="full", rank=None, seed=0)
    lora = {}
    for n in names:
        lora |= {f"{n}.lora_A": torch.randn(4, 16, generator=gen),
                 f"{n}.lora_B": torch.randn(24, 4, generator=gen), f"{n}.scaling": torch.tensor(2.0)}
    make_run(root / "lora-r4-s0", lora, method="lora", rank=4, seed=0)
    return root


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_tensor(path, key, value):
    tensors = load_file(path)
    tensors[key].view(-1)[0] = value
    save_file(tensors, path, metadata={"format": "rankscope.updates/1", "method": "full"}
              if path.name == "updates.safetensors" else {"format": "pt"})


# ------------------------------------------------------------------- happy paths

def test_adapter_form_prints_the_summary(minilm_adapter, minilm_slice, tmp_path):
    out = tmp_path / "out"
    result = invoke("--adapter", minilm_adapter, "--base", minilm_slice, "--out", out)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().split("\n")
    assert lines[0].split() == ["run", "module", "layers", "d_out", "d_in", "fro_norm",
                                "stable_rank", "entropy_rank", "energy_rank_90", "energy_rank_99",
                                "energy_rank_90_noise", "gd_rank"]       # beside its noise floors
    assert [line.split()[:3] for line in lines[1:3]] == [["adapter", "query", "2"],
                                                         ["adapter", "value", "2"]]
    assert lines[-1] == f"4 modules analysed; wrote {out}/spectra.csv, modules.csv, manifest.json"
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS


def test_run_and_sweep_forms(sweep, tmp_path):
    result = invoke(sweep, "--out", tmp_path / "all", "--float64")
    assert result.exit_code == 0, result.output
    assert "4 modules analysed" in result.stdout
    assert {line.split()[0] for line in result.stdout.strip().split("\n")[1:-1]} == {
        "full-s0", "lora-r4-s0"}
    assert json.loads((tmp_path / "all" / "manifest.json").read_text())["svd_dtype"] == "float64"
    result = invoke(sweep / "lora-r4-s0", "--out", tmp_path / "one")
    assert result.exit_code == 0 and "2 modules analysed" in result.stdout


def test_model_pair_form(smollm2_slice, make_finetuned, tmp_path):
    delta = torch.outer(torch.ones(192, dtype=torch.float64), torch.ones(576, dtype=torch.float64))
    ft = make_finetuned(smollm2_slice, tmp_path / "ft", {"layers.1.self_attn.v_proj": delta / 100})
    result = invoke("--base", smollm2_slice, "--finetuned", ft, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().split("\n")[1].split()[:5] == ["ft", "v_proj", "1", "192", "576"]
    assert "1 modules analysed" in result.stdout


def test_topk_svd_prints_ranks_beyond_it(smollm2_slice, make_finetuned, tmp_path):
    """A flat 40-direction update under ``--svd topk:16``: its k₉₀ (36) prints as "> 16"."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(192, 40, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(576, 40, generator=g, dtype=torch.float64))
    ft = make_finetuned(smollm2_slice, tmp_path / "ft", {"layers.1.self_attn.k_proj": u @ v.T / 100})
    result = invoke("--base", smollm2_slice, "--finetuned", ft, "--out", tmp_path / "out",
                    "--svd", "topk:16")
    assert result.exit_code == 0, result.output
    header, row = result.stdout.strip().split("\n")[:2]
    assert row.split()[:5] == ["ft", "k_proj", "1", "192", "576"]
    # the k₉₀ column holds "> 16", the entropy rank (it needs every σ) is empty
    at = header.index("energy_rank_90") + len("energy_rank_90")
    assert row[:at].split()[-3:] == ["NaN", ">", "16"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["svd"] == "topk:16"


def test_overwrite(sweep, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = invoke(sweep, "--out", out)
    assert result.exit_code == 2
    assert visible_lines(result.stderr) == [
        f"rankscope: error: output folder {out} exists with other content (use --overwrite)"]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    result = invoke(sweep, "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS


# -------------------------------------------------------------------- bad inputs

def _missing_runs(c):
    return [c.tmp / "nope"], ["missing run or sweep folder"]


def _runs_is_a_file(c):
    (c.tmp / "file.txt").write_text("x")
    return [c.tmp / "file.txt"], ["missing run or sweep folder"]


def _no_finished_run(c):
    (c.tmp / "empty-sweep" / "lora-r4-s0").mkdir(parents=True)
    return [c.tmp / "empty-sweep"], ["no finished runs"]


def _missing_adapter(c):
    return ["--adapter", c.tmp / "nope"], ["missing adapter folder"]


def _not_an_adapter(c):
    return ["--adapter", c.minilm_slice], ["not a PEFT adapter folder"]


def _missing_base(c):
    return ["--adapter", c.adapter, "--base", c.tmp / "nope"], ["does not exist"]


def _missing_finetuned(c):
    return ["--base", c.minilm_slice, "--finetuned", c.tmp / "nope"], ["does not exist"]


def _base_without_config(c):
    (c.tmp / "bare").mkdir()
    return ["--adapter", c.adapter, "--base", c.tmp / "bare"], ["has no config.json"]


def _adapter_for_other_model_names(c):
    return ["--adapter", c.adapter, "--base", c.smollm2_slice], ["does not exist in base model"]


def _adapter_for_other_model_shapes(c):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    LlamaForCausalLM(config).save_pretrained(c.tmp / "tiny")
    c.make_adapter(c.tmp / "tiny", c.tmp / "a", r=2, target_modules=["q_proj"])
    return ["--adapter", c.tmp / "a", "--base", c.smollm2_slice], ["made for another model"]


def _adapter_truncated(c):
    a = _copy(c.adapter, c.tmp / "a")
    data = (a / "adapter_model.safetensors").read_bytes()
    (a / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    return ["--adapter", a], ["corrupt or truncated safetensors"]


def _adapter_garbage(c):
    a = _copy(c.adapter, c.tmp / "a")
    (a / "adapter_model.safetensors").write_bytes(b"\x89garbage" * 100)
    return ["--adapter", a], ["corrupt or truncated safetensors"]


def _adapter_weights_a_folder(c):
    a = _copy(c.adapter, c.tmp / "a")
    (a / "adapter_model.safetensors").unlink()
    (a / "adapter_model.safetensors").mkdir()
    return ["--adapter", a], ["adapter_model.safetensors"]


def _adapter_config_garbage(c):
    a = _copy(c.adapter, c.tmp / "a")
    (a / "adapter_config.json").write_bytes(b"\xff\xfe not json")
    return ["--adapter", a], ["corrupt adapter config"]


def _adapter_edited_to_ia3(c):
    a = _copy(c.adapter, c.tmp / "a")
    cfg = json.loads((a / "adapter_config.json").read_text()) | {"peft_type": "IA3"}
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    return ["--adapter", a], ["method 'IA3', not LoRA"]


def _dora_without_base(c):
    c.make_adapter(c.minilm_slice, c.tmp / "dora", r=2, target_modules=["query"], use_dora=True)
    return ["--adapter", c.tmp / "dora"], ["is DoRA: its update needs the base weights W0, give --base"]


def _real_loha_adapter(c):
    from peft import LoHaConfig, get_peft_model
    from transformers import AutoModel

    model = get_peft_model(AutoModel.from_pretrained(c.minilm_slice),
                           LoHaConfig(target_modules=["query"]))
    model.save_pretrained(c.tmp / "loha")
    return ["--adapter", c.tmp / "loha", "--base", c.minilm_slice], ["method 'LOHA', not LoRA"]


def _adapter_nan(c):
    a = _copy(c.adapter, c.tmp / "a")
    _edit_tensor(a / "adapter_model.safetensors",
                 "base_model.model.encoder.layer.1.attention.self.value.lora_A.weight", math.nan)
    return ["--adapter", a, "--base", c.minilm_slice], ["lora_A of encoder.layer.1", "NaN or Inf"]


def _finetuned_nan(c):
    bad = torch.zeros(1536, 384, dtype=torch.float64)
    bad[0, 0] = math.inf
    ft = c.make_finetuned(c.minilm_slice, c.tmp / "ft", {"encoder.layer.0.intermediate.dense": bad})
    return ["--base", c.minilm_slice, "--finetuned", ft], ["encoder.layer.0.intermediate.dense",
                                                           "NaN or Inf"]


def _finetuned_truncated(c):
    ft = _copy(c.minilm_slice, c.tmp / "ft")
    data = (ft / "model.safetensors").read_bytes()
    (ft / "model.safetensors").write_bytes(data[: len(data) // 3])
    return ["--base", c.minilm_slice, "--finetuned", ft], ["cannot load model"]


def _finetuned_garbage(c):
    ft = _copy(c.minilm_slice, c.tmp / "ft")
    (ft / "model.safetensors").write_bytes(os.urandom(4096))
    return ["--base", c.minilm_slice, "--finetuned", ft], ["cannot load model"]


def _run_update_inf(c):
    run = _copy(c.sweep / "full-s0", c.tmp / "full-s0")
    _edit_tensor(run / "updates.safetensors", "model.layers.1.self_attn.q_proj.delta", -math.inf)
    return [run], ["update model.layers.1.self_attn.q_proj", "NaN or Inf"]


def _run_updates_truncated(c):
    sweep = _copy(c.sweep, c.tmp / "sweep")
    path = sweep / "lora-r4-s0" / "updates.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    return [sweep], ["corrupt or truncated safetensors"]


def _run_manifest_corrupt(c):
    run = _copy(c.sweep / "full-s0", c.tmp / "full-s0")
    (run / "manifest.json").write_text("{")
    return [run], ["corrupt manifest"]


def _different_architectures(c):
    return ["--base", c.minilm_slice, "--finetuned", c.smollm2_slice], [
        "different architectures", "bert", "llama"]


def _unknown_model_name(c):
    return ["--base", "no-such-model", "--finetuned", c.minilm_slice], ["unknown model 'no-such-model'"]


def _hub_id_offline(c):
    return ["--base", c.minilm_slice, "--finetuned", "no-such-owner/model"], ["offline"]


def _two_forms(c):
    return [c.sweep, "--adapter", c.adapter], ["not several"]


def _nothing(c):
    return [], ["nothing to analyze"]


def _finetuned_without_base(c):
    return ["--finetuned", c.minilm_slice], ["needs --base"]


def _edited_config(c, **changes):
    a = _copy(c.adapter, c.tmp / "a")
    cfg = json.loads((a / "adapter_config.json").read_text()) | changes
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    return a


def _adapter_config_a_list(c):
    a = _copy(c.adapter, c.tmp / "a")
    (a / "adapter_config.json").write_text("[]")
    return ["--adapter", a], ["not a JSON object"]


def _adapter_alpha_null(c):
    return ["--adapter", _edited_config(c, lora_alpha=None)], ["lora_alpha must be a positive"]


def _adapter_rank_pattern_bad_regex(c):
    a = _edited_config(c, rank_pattern={"(": 2})
    return ["--adapter", a], ["rank_pattern key '(' is no regex"]


def _svd_option_bad(c):
    return [c.sweep, "--svd", "topk:0"], ["--svd: expected exact, auto or topk:K", "'topk:0'"]


def _cuda_without_cuda(c):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    return [c.sweep, "--device", "cuda"], ["no CUDA device"]


BAD = [_missing_runs, _runs_is_a_file, _no_finished_run, _missing_adapter, _not_an_adapter,
       _missing_base, _missing_finetuned, _base_without_config, _adapter_for_other_model_names,
       _adapter_for_other_model_shapes, _adapter_truncated, _adapter_garbage,
       _adapter_weights_a_folder, _adapter_config_garbage, _adapter_edited_to_ia3,
       _real_loha_adapter, _dora_without_base, _adapter_nan, _finetuned_nan,
       _finetuned_truncated, _finetuned_garbage,
       _run_update_inf, _run_updates_truncated, _run_manifest_corrupt, _different_architectures,
       _unknown_model_name, _hub_id_offline, _two_forms, _nothing, _finetuned_without_base,
       _adapter_config_a_list, _adapter_alpha_null, _adapter_rank_pattern_bad_regex,
       _svd_option_bad, _cuda_without_cuda]


@pytest.fixture
def inputs(tmp_path, minilm_slice, smollm2_slice, minilm_adapter, sweep, make_adapter,
           make_finetuned):
    return SimpleNamespace(tmp=tmp_path, minilm_slice=minilm_slice, smollm2_slice=smollm2_slice,
                  adapter=minilm_adapter, sweep=sweep, make_adapter=make_adapter,
                  make_finetuned=make_finetuned)


@pytest.mark.parametrize("case", BAD, ids=[f.__name__.strip("_") for f in BAD])
def test_bad_input_is_one_line_and_exit_2(case, inputs):
    args, fragments = case(inputs)
    out = inputs.tmp / "results"
    assert_one_line_error(invoke(*args, "--out", out), out, *fragments)


def test_out_folder_holding_the_input_is_refused(inputs):
    run = _copy(inputs.sweep / "full-s0", inputs.tmp / "full-s0")
    result = invoke(run, "--out", run, "--overwrite")
    assert result.exit_code == 2
    assert visible_lines(result.stderr) == [
        f"rankscope: error: output folder {run} is or holds the input {run}; choose another --out"]
    assert (run / "updates.safetensors").is_file()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root reads files whatever their permissions")
@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_unreadable_adapter_file(name, inputs):
    a = _copy(inputs.adapter, inputs.tmp / "a")
    (a / name).chmod(0)
    out = inputs.tmp / "results"
    try:
        assert_one_line_error(invoke("--adapter", a, "--out", out), out)
    finally:
        (a / name).chmod(0o644)


@pytest.mark.parametrize("args", [["x"], ["x", "--out", "o", "--bogus"]])
def test_usage_errors_are_one_line(args):
    result = invoke(*args)
    assert result.exit_code == 2
    lines = visible_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("rankscope: error: ")


def test_a_failed_analysis_creates_no_output_parents(inputs):
    out = inputs.tmp / "new" / "sub" / "results"
    result = invoke(inputs.tmp / "missing", "--out", out)
    assert result.exit_code == 2 and "missing" in result.stderr
    assert not (inputs.tmp / "new").exists()


def test_out_parents_are_made_when_the_result_is_written(inputs):
    out = inputs.tmp / "new" / "sub" / "results"
    result = invoke(inputs.sweep, "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS
