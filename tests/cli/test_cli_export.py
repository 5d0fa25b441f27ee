"""``rankscope export`` through click's CliRunner: the folders it writes load in peft, and every
bad input is one line, exit status 2, with nothing written.
"""
from __future__ import annotations

import json

import pytest
import torch
from clichecks import assert_one_line_error
from click.testing import CliRunner

from rankscope.cli import main

Q = "layers.0.self_attn.q_proj"          # 32×32 in the tiny Llama; v_proj is 16×32


def invoke(*args):
    return CliRunner().invoke(main, ["export", *map(str, args)])


@pytest.fixture(scope="module")
def pair(tiny_llama, make_finetuned, chosen_factors, tmp_path_factory):
    """The tiny Llama fine-tuned by a rank-2 update of q_proj (σ = 2, 1)."""
    B, A = chosen_factors((2.0, 1.0), 32, 32)
    return make_finetuned(tiny_llama, tmp_path_factory.mktemp("ft") / "model", {Q: B @ A})


@pytest.fixture(scope="module")
def adapter(tiny_llama, make_adapter, tmp_path_factory):
    """A LoRA r = 2 adapter on q_proj and v_proj."""
    out = tmp_path_factory.mktemp("lora") / "adapter"
    make_adapter(tiny_llama, out, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                 task_type="CAUSAL_LM")
    return out


def test_export_writes_a_folder_peft_loads(tiny_llama, pair, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter"
    res = invoke("--base", tiny_llama, "--finetuned", pair, "--rank", 2, "--out", out)
    assert res.exit_code == 0, res.output
    assert "1 of 1 modules at rank 2" in res.stdout and f"wrote {out}" in res.stdout
    assert {"adapter_config.json", "adapter_model.safetensors", "export.json"} <= {
        p.name for p in out.iterdir()}
    rec = json.loads((out / "export.json").read_text())
    assert rec["modules"][0]["retained_energy"] == pytest.approx(1.0)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        got = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out)(ids)
        want = AutoModelForCausalLM.from_pretrained(pair)(ids)
    torch.testing.assert_close(got.logits, want.logits, atol=2e-5, rtol=1e-4)


def test_a_resize_and_a_recommendation(adapter, tmp_path):
    res = invoke("--adapter", adapter, "--rank", 1, "--out", tmp_path / "a")
    assert res.exit_code == 0, res.output
    assert "4 of 4 modules at rank 1" in res.stdout
    rec_file = tmp_path / "lora_config.json"
    rec_file.write_text(json.dumps({"r": 1, "target_modules": ["q_proj"],
                                    "rank_pattern": {"model.layers.1.self_attn.q_proj": 2}}))
    res = invoke("--adapter", adapter, "--from", rec_file, "--out", tmp_path / "b")
    assert res.exit_code == 0, res.output
    assert "2 of 4 modules at rank 1–2" in res.stdout
    cfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 2                # a tie of counts: the larger rank
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] == {"model.layers.0.self_attn.q_proj": 1}


# ------------------------------------------------------------------------ bad inputs

@pytest.fixture(scope="module")
def runs(tiny_llama, make_run, chosen_factors, tmp_path_factory):
    """A sweep folder with two full runs, the second with NaN in its update."""
    sweep = tmp_path_factory.mktemp("sweep")
    B, A = chosen_factors((1.0,), 32, 32)
    for name, bad in (("full-s0", False), ("full-s1", True)):
        delta = B @ A
        if bad:
            delta[0, 0] = float("nan")
        make_run(sweep / name, {f"model.{Q}.delta": delta}, method="full", seed=0,
                 model_path=str(tiny_llama), task_kind="lm")
    return sweep


@pytest.fixture(scope="module")
def nan_pair(tiny_llama, make_finetuned, tmp_path_factory):
    delta = torch.zeros(32, 32)
    delta[1, 2] = float("nan")
    return make_finetuned(tiny_llama, tmp_path_factory.mktemp("nan") / "model", {Q: delta})


BAD = [
    (lambda d: ["/no/such/run", "--rank", 1], "missing run or sweep folder /no/such/run"),
    (lambda d: ["--adapter", "/no/such/adapter", "--rank", 1], "missing adapter folder"),
    (lambda d: ["--base", d["base"], "--finetuned", "/no/such/model", "--rank", 1],
     "model path /no/such/model does not exist"),
    (lambda d: [*d["pair"], "--rank", 0], "--rank must be an integer >= 1, got 0"),
    (lambda d: [*d["pair"], "--rank", 33], "above its min(d_out, d_in) = 32"),
    (lambda d: [*d["pair"], "--energy", 0], "--energy must be in (0, 1], got 0.0"),
    (lambda d: [*d["pair"], "--energy", 1.5], "--energy must be in (0, 1], got 1.5"),
    (lambda d: [*d["pair"], "--energy", "nan"], "--energy must be in (0, 1]"),
    (lambda d: ["--adapter", d["adapter"], "--rank", 3], "above its LoRA rank 2"),
    (lambda d: [*d["pair"], "--rank", 2, "--energy", 0.5], "not --rank and --energy"),
    (lambda d: [*d["pair"]], "give one of --rank, --energy or --from"),
    (lambda d: [d["runs"] / "full-s0", "--adapter", d["adapter"], "--rank", 1], "not several"),
    (lambda d: ["--finetuned", d["ft"], "--rank", 1], "--finetuned needs --base"),
    (lambda d: ["--adapter", d["adapter"], "--rank", 1, "--save-changed-modules"],
     "--save-changed-modules is for full fine-tunes"),
    (lambda d: [*d["pair"], "--from", "/no/such/lora_config.json"], "missing recommendation"),
    (lambda d: [d["runs"], "--rank", 1], "holds 2 finished runs"),
    (lambda d: [d["runs"] / "full-s1", "--rank", 1], "contains NaN or Inf"),
    (lambda d: ["--base", d["base"], "--finetuned", d["nan"], "--rank", 1], "contains NaN or Inf"),
    (lambda d: [*d["pair"], "--rank", "two"], "'two' is not a valid integer"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_line_and_writes_nothing(args, message, tiny_llama, pair, adapter,
                                                  runs, nan_pair, tmp_path):
    paths = {"base": tiny_llama, "ft": pair, "pair": ["--base", tiny_llama, "--finetuned", pair],
             "adapter": adapter, "runs": runs, "nan": nan_pair}
    out = tmp_path / "out"
    assert_one_line_error(invoke(*args(paths), "--out", out), message, out=out)


def test_a_corrupt_recommendation_and_an_occupied_or_input_out(pair, tiny_llama, adapter, tmp_path):
    bad = tmp_path / "lora_config.json"
    bad.write_text(json.dumps({"r": 0, "target_modules": ["q_proj"]}))
    out = tmp_path / "out"
    assert_one_line_error(invoke("--base", tiny_llama, "--finetuned", pair, "--from", bad,
                                 "--out", out), "r must be an integer >= 1", out=out)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = invoke("--base", tiny_llama, "--finetuned", pair, "--rank", 1, "--out", out)
    assert_one_line_error(res, "exists with other content")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    res = invoke("--adapter", adapter, "--rank", 1, "--out", adapter, "--overwrite")
    assert_one_line_error(res, "is or holds the input")
    assert (adapter / "adapter_config.json").is_file()


@pytest.mark.slow
def test_a_sweep_runs_export_is_evaluated_beside_the_run(news_sweep, tmp_path):
    """A real LoRA run of the news sweep, resized at its own rank: the adapter peft loads from
    the export gives back the run's own held-out loss (known by construction: the resize is
    exact), and the CLI prints both; a run moved out of its sweep exports without it."""
    manifest = json.loads((news_sweep.lora / "manifest.json").read_text())
    res = invoke(news_sweep.lora, "--rank", manifest["rank"], "--out", tmp_path / "a")
    assert res.exit_code == 0, res.output
    held = json.loads((tmp_path / "a" / "export.json").read_text())["heldout"]
    assert held["source"] == manifest["eval_after"] and held["base"] == manifest["eval_before"]
    assert held["exported"]["loss"] == pytest.approx(manifest["eval_after"]["loss"], rel=1e-4)
    assert held["n_examples"] == manifest["n_eval_examples"] and held["precision"] == "float32"
    assert f"held-out loss ({held['n_examples']} examples): exported" in res.output
    cut = invoke(news_sweep.full, "--rank", 1, "--out", tmp_path / "b")      # rank 1 of a full
    held = json.loads((tmp_path / "b" / "export.json").read_text())["heldout"]
    assert cut.exit_code == 0 and held["exported"]["loss"] != held["source"]["loss"]

    import shutil

    alone = shutil.copytree(news_sweep.lora, tmp_path / "alone" / news_sweep.lora.name)
    res = invoke(alone, "--rank", 1, "--out", tmp_path / "c")
    assert res.exit_code == 0 and "no held-out evaluation" in res.output
    assert "skipped" in json.loads((tmp_path / "c" / "export.json").read_text())["heldout"]
    skip = invoke(news_sweep.lora, "--rank", 1, "--no-eval", "--out", tmp_path / "d")
    assert skip.exit_code == 0
    assert "heldout" not in json.loads((tmp_path / "d" / "export.json").read_text())
