"""Sweeps end to end on tiny real models: every task and user file, the run-folder format, shared
data, determinism, resume after ``kill -9``, and every bad input as one line with exit status 2.

SmolLM2 and MiniLM are cut to their first 2 pretrained blocks (conftest); runs take 2–4 steps of
4 sequences of 32–64 tokens, so a run is seconds on 2 CPU cores.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from rankscope.cli import main
from rankscope.train import run as run_module
from rankscope.store.lock import LOCK_FILE
from rankscope.train.config import build_sweep
from rankscope.train.data import prepare
from rankscope.train.loop import lr_lambda
from rankscope.train.model_setup import load_task_model
from rankscope.train.models import find_linear_modules, load_backbone, match_name
from rankscope.train.run_folder import CKPT
from rankscope.train.sweep import precision_line, run_sweep

REPO = Path(__file__).resolve().parents[2]
TINY = dict(batch_size=4, max_len=32, max_eval_examples=8, max_train_examples=32, bf16=False)
RUN_FILES = {"config.yaml", "manifest.json", "metrics.jsonl", "updates.safetensors"}


def _sweep(out, *, log=None, **values):
    """run_sweep in this process; returns the manifests and the log lines."""
    lines = []
    manifests = run_sweep(build_sweep(overrides={**TINY, **values}), out, progress=False,
                          log=lines.append if log is None else log)
    return manifests, lines


def _cli(*args):
    return CliRunner().invoke(main, ["sweep", *map(str, args), "--quiet"])


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def _updates(run_dir) -> dict[str, torch.Tensor]:
    return load_file(Path(run_dir) / "updates.safetensors")


def _manifest(run_dir) -> dict:
    return json.loads((Path(run_dir) / "manifest.json").read_text())


def _assert_same_updates(a_dir, b_dir):
    a, b = _updates(a_dir), _updates(b_dir)
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{Path(a_dir).name}: {k} differs"


# ---------------------------------------------------------------- the news sweep (SmolLM2 slice)

@pytest.mark.slow
def test_a_sweep_writes_one_folder_per_run_and_logs_each(news_sweep):
    out = news_sweep.out
    assert [m["run"] for m in news_sweep.manifests] == ["full-s0", "lora-r2-s0"]
    assert {p.name for p in out.iterdir()} == {"sweep.yaml", "base_eval.json", "full-s0",
                                               "lora-r2-s0", LOCK_FILE}
    assert build_sweep(yaml_path=out / "sweep.yaml") == news_sweep.cfg
    assert [line.split()[0] for line in news_sweep.log] == ["full-s0", "lora-r2-s0"]
    for run in (news_sweep.full, news_sweep.lora):
        names = {p.name for p in run.iterdir()}
        assert RUN_FILES <= names
        assert not [n for n in names if n.startswith(".") or n == CKPT]   # nothing left over
    assert (news_sweep.lora / "adapter").is_dir() and not (news_sweep.full / "adapter").exists()


@pytest.mark.slow
def test_a_runs_config_records_its_grid_cell_and_the_training_settings(news_sweep):
    for run, method, rank in ((news_sweep.full, "full", None), (news_sweep.lora, "lora", 2)):
        doc = yaml.safe_load((run / "config.yaml").read_text())
        assert (doc["method"], doc["rank"], doc["seed"]) == (method, rank, 0)
        assert doc["lora_alpha"] == (4.0 if method == "lora" else None)   # scaled: α = 2·r
        view = yaml.safe_load(yaml.safe_dump(news_sweep.cfg.training_view()))
        assert {k: doc[k] for k in view} == view


@pytest.mark.slow
def test_the_manifest_carries_provenance_and_measurements(news_sweep):
    for run in (news_sweep.full, news_sweep.lora):
        m = _manifest(run)
        assert m["format"] == "rankscope.run/1" and m["seed"] == 0 and m["steps"] == 4
        assert {"torch", "transformers", "peft", "python", "rankscope"} <= set(m["versions"])
        assert m["versions"]["torch"] == torch.__version__
        assert m["git"] and "time" in m and m["machine"]["cpus"] >= 1
        assert len(m["data_hash"]) == 64 and len(m["split_hash"]) == 64
        assert m["device"] == "cpu" and m["world_size"] == 1 and m["bf16_autocast"] is False
        assert m["wall_time_s"] > 0 and m["tokens_per_s"] > 0 and m["peak_memory_mb"] > 100
        assert m["tokens_per_step"] == 4 * 32
        assert m["n_train_examples"] == 32 and m["n_eval_examples"] == 8
        for key in ("eval_before", "eval_after"):
            assert set(m[key]) == {"loss", "perplexity"} and m[key]["loss"] > 0
        assert m["eval_after"] != m["eval_before"]
    full, lora = _manifest(news_sweep.full), _manifest(news_sweep.lora)
    assert full["n_modules"] == 14 and lora["n_modules"] == 4
    assert lora["trainable_params"] == 2 * 2 * ((576 + 576) + (576 + 192))  # r(d_in+d_out)
    assert full["trainable_params"] > 1000 * lora["trainable_params"]


@pytest.mark.slow
def test_metrics_are_json_lines_that_pandas_reads(news_sweep):
    cfg = news_sweep.cfg
    for run, peak in ((news_sweep.full, cfg.lr_full), (news_sweep.lora, cfg.lr_lora)):
        df = pd.read_json(run / "metrics.jsonl", lines=True)
        train = df[df["kind"] == "train"]
        assert train["step"].tolist() == [1, 2, 3, 4]
        assert train["loss"].notna().all() and (train["tokens_per_s"] > 0).all()
        # each row logs the rate its step applied: step s (from 1) used lr_lambda(s − 1)
        assert train["lr"].tolist() == pytest.approx([peak * lr_lambda(
            s, total=4, warmup=cfg.warmup, schedule=cfg.schedule) for s in range(4)])
        last = df.iloc[-1]
        assert last["kind"] == "eval" and last["step"] == 4
        assert last["loss"] == pytest.approx(_manifest(run)["eval_after"]["loss"])


@pytest.mark.slow
def test_full_updates_cover_every_linear_module_and_analyze_reads_them(news_sweep,
                                                                       smollm2_slice):
    from rankscope.analysis.analyze import analyze

    ups = _updates(news_sweep.full)
    linears = find_linear_modules(load_task_model(news_sweep.cfg, kind="lm", num_labels=None))
    deltas = {k.removesuffix(".delta"): v for k, v in ups.items() if k.endswith(".delta")}
    assert sorted(deltas) == sorted(i.name for i in linears)
    for info in linears:
        d = deltas[info.name]
        assert d.dtype == torch.float32 and d.shape == (info.d_out, info.d_in)
        assert 0 < float(d.abs().max()) < 1e-3                         # 4 steps at lr 3e-5
    _, modules = analyze(news_sweep.out, progress=False)
    full = modules[modules["run"] == "full-s0"]
    assert len(full) == 14 and len(modules[modules["run"] == "lora-r2-s0"]) == 4
    shapes = {i.name: (i.d_out, i.d_in) for i in linears}
    assert {n: (a, b) for n, a, b in zip(full["name"], full["d_out"], full["d_in"])} == shapes


@pytest.mark.slow
def test_lora_updates_are_the_adapters_factors_with_scaling_alpha_over_r(news_sweep,
                                                                        smollm2_slice):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ups = _updates(news_sweep.lora)
    names = sorted(k.removesuffix(".lora_A") for k in ups if k.endswith(".lora_A"))
    assert names == [f"model.layers.{i}.self_attn.{m}" for i in (0, 1)
                     for m in ("q_proj", "v_proj")]
    assert sorted(ups) == sorted(f"{n}.{k}" for n in names
                                 for k in ("lora_A", "lora_B", "scaling", "lora_A0"))
    adapter_cfg = json.loads((news_sweep.lora / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 2 and adapter_cfg["lora_alpha"] == 4.0
    adapter = load_file(news_sweep.lora / "adapter" / "adapter_model.safetensors")
    for n in names:
        assert float(ups[f"{n}.scaling"]) == 4.0 / 2                    # α / r
        assert ups[f"{n}.lora_A"].shape[0] == 2 and ups[f"{n}.lora_B"].shape[1] == 2
        for f in ("lora_A", "lora_B"):
            assert torch.equal(adapter[f"base_model.model.{n}.{f}.weight"], ups[f"{n}.{f}"])
        assert float(ups[f"{n}.lora_B"].abs().max()) > 0                # B left zero: trained

    # the standard PEFT folder loads on the base and computes W0 + scaling·B·A
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_slice),
                                           news_sweep.lora / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(smollm2_slice).eval()
    with torch.no_grad():
        for n in names:
            w = merged.get_submodule(n).weight
            w += ups[f"{n}.scaling"] * ups[f"{n}.lora_B"] @ ups[f"{n}.lora_A"]
        got, expected = peft_model(input_ids=ids).logits, merged(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_base_weights_are_never_copied_into_a_run(news_sweep, smollm2_slice):
    model_bytes = sum(p.stat().st_size for p in Path(smollm2_slice).glob("*.safetensors"))
    base_keys = {f"{i.name}.weight" for i in find_linear_modules(load_backbone(smollm2_slice))}
    for run in (news_sweep.full, news_sweep.lora):
        for path in run.rglob("*.safetensors"):
            keys = load_file(path).keys()
            assert not [k for k in keys if match_name(k, base_keys)], path   # no W_0, no W_ft
    lora_bytes = sum(p.stat().st_size for p in news_sweep.lora.rglob("*") if p.is_file())
    assert lora_bytes < 0.01 * model_bytes
    ups = _updates(news_sweep.full)                  # ΔW of the 14 linears and nothing else
    delta_bytes = 4 * sum(v.numel() for v in ups.values())
    assert (news_sweep.full / "updates.safetensors").stat().st_size < delta_bytes + 10_000


@pytest.mark.slow
def test_every_run_sees_the_same_data_split_and_base_evaluation(news_sweep):
    ms = [_manifest(r) for r in (news_sweep.full, news_sweep.lora)]
    base = json.loads((news_sweep.out / "base_eval.json").read_text())
    for key in ("data_hash", "split_hash", "n_train_examples", "n_eval_examples", "steps",
                "tokens_per_step"):
        assert ms[0][key] == ms[1][key], key
    assert ms[0]["eval_before"] == ms[1]["eval_before"] == base["metrics"]
    assert base["split_hash"] == ms[0]["split_hash"]


@pytest.mark.slow
def test_a_rerun_skips_finished_runs(news_sweep, news_yaml):
    # every file but the lock, which names its latest holder
    stamps = {p: p.stat().st_mtime_ns for p in news_sweep.out.rglob("*")
              if p.is_file() and p.name != LOCK_FILE}
    result = _cli(news_yaml, "--out", news_sweep.out)
    assert result.exit_code == 0, result.output
    for run in ("full-s0", "lora-r2-s0"):
        assert any(line.startswith(run) and "skipped" in line
                   for line in result.output.splitlines())
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


@pytest.mark.slow
def test_a_rerun_with_another_config_is_refused(news_sweep, news_yaml):
    before = (news_sweep.out / "sweep.yaml").read_text()
    result = _cli(news_yaml, "--out", news_sweep.out, "--steps", 5, "--lr-lora", 1e-4)
    assert result.exit_code == 2
    assert _error_lines(result) == [
        f"rankscope: error: {news_sweep.out} holds a sweep started with another config "
        "(differs in: lr_lora, steps); rerun with the same config or another --out"]
    assert (news_sweep.out / "sweep.yaml").read_text() == before


@pytest.mark.slow
def test_a_sweep_resumed_in_another_precision_says_it_mixes_them(news_sweep, tmp_path):

    runs = news_sweep.cfg.runs()                  # full-s0 and lora-r2-s0, trained in float32
    assert [m["bf16_autocast"] for m in news_sweep.manifests] == [False, False]
    out = tmp_path / "sweep"
    shutil.copytree(news_sweep.full, out / "full-s0")       # one run finished, one left
    assert precision_line(out, runs, bf16=True) == (
        f"sweep {out}: 1 of its finished runs trained in float32 and this machine trains the 1 "
        "left in bf16 autocast, so the sweep mixes precisions; set bf16 in its config to pin one")
    assert precision_line(out, runs, bf16=False) is None            # the same precision
    assert precision_line(news_sweep.out, runs, bf16=True) is None  # nothing left to train
    assert precision_line(tmp_path / "new", runs, bf16=True) is None   # nothing finished
    assert not any("mixes precisions" in line for line in news_sweep.log)


# ---------------------------------------------------------------- resume after kill -9

def _kill_at_checkpoint(cmd, run_dir: Path, log: Path) -> None:
    """Start ``cmd`` and kill -9 it as soon as ``run_dir`` holds a checkpoint."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 300
    try:
        while not (run_dir / CKPT).is_dir():
            assert proc.poll() is None, f"sweep ended before a checkpoint:\n{log.read_text()}"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "manifest.json").exists(), "killed too late: the run had finished"


@pytest.mark.slow
def test_a_sweep_killed_twice_resumes_to_bit_identical_updates(news_sweep, news_yaml, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "rankscope", "sweep", str(news_yaml), "--out", str(out),
           "--quiet"]
    # killed inside the full run after step 2, then (resumed) inside the LoRA run after step 2;
    # the reference ran uninterrupted in this process, so this is also determinism across processes;
    # each rerun takes the folder's lock that the killed process held (rankscope.store.lock)
    _kill_at_checkpoint(cmd, out / "full-s0", tmp_path / "first.log")
    _kill_at_checkpoint(cmd, out / "lora-r2-s0", tmp_path / "second.log")
    assert (out / "full-s0" / "manifest.json").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert any(line.startswith("full-s0") and "skipped" in line
               for line in done.stdout.splitlines())
    for run in ("full-s0", "lora-r2-s0"):
        _assert_same_updates(news_sweep.out / run, out / run)
        a, b = (pd.read_json(d / run / "metrics.jsonl", lines=True) for d in (news_sweep.out, out))
        pd.testing.assert_frame_equal(a[["step", "kind", "loss", "lr"]],
                                      b[["step", "kind", "loss", "lr"]])
        assert _manifest(out / run)["eval_after"] == _manifest(news_sweep.out / run)["eval_after"]
        assert not (out / run / CKPT).exists()


@pytest.mark.slow
def test_two_sweeps_started_on_one_folder_the_second_refuses_and_the_first_is_unharmed(
        news_sweep, news_yaml, tmp_path):
    """The second process is refused in one line while the first trains (frozen by SIGSTOP
    after its first checkpoint, so the overlap is certain); the first then finishes with the
    updates of an undisturbed sweep."""
    out = tmp_path / "shared"
    cmd = [sys.executable, "-m", "rankscope", "sweep", str(news_yaml), "--out", str(out),
           "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(tmp_path / "first.log", "w") as f:
        first = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 300
        while not (out / "full-s0" / CKPT).is_dir():
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                                env=env)
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2
    (line,) = second.stderr.strip().splitlines()
    assert re.fullmatch(rf"rankscope: error: sweep folder {re.escape(str(out))} is in use by "
                        rf"process {first.pid} on \S+ \(since [^)]+\); wait for it to finish "
                        r"or stop it, then rerun \(finished runs are kept\)", line), line
    for run in ("full-s0", "lora-r2-s0"):
        _assert_same_updates(news_sweep.out / run, out / run)
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(f".{CKPT}*"))


# ---------------------------------------------------------------- the other shipped tasks

@pytest.mark.slow
def test_qa_runs_a_few_steps_on_the_smollm2_slice(smollm2_slice, tmp_path):
    (m,), _ = _sweep(tmp_path / "qa", model=str(smollm2_slice), task="qa", methods=("lora",),
                     ranks=(2,), steps=2, max_len=64)
    assert m["task_kind"] == "sft" and m["eval_after"]["loss"] != m["eval_before"]["loss"]
    assert m["n_train_examples"] == 32 and set(m["eval_after"]) == {"loss", "perplexity"}
    assert len(_updates(tmp_path / "qa" / "lora-r2-s0")) == 4 * 4       # A, B, scaling, A₀


def _capture_trained(monkeypatch, eval_data: dict):
    """Record, at the end of each run, the trained model's logits on ``eval_data`` and its
    trainable head weights."""
    seen = {}
    save = run_module.save_outputs

    def spy(run_dir, model, run, **kw):
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=eval_data["input_ids"],
                           attention_mask=eval_data["attention_mask"]).logits
        head = {n: p.detach().clone() for n, p in model.named_parameters()
                if p.requires_grad and "classifier" in n}
        seen[run_dir.name] = SimpleNamespace(logits=logits, head=head)
        return save(run_dir, model, run, **kw)

    monkeypatch.setattr(run_module, "save_outputs", spy)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("task", ["sentiment", "topic"])
def test_classification_heads_train_in_every_method_but_are_not_part_of_delta_w(
        task, minilm_slice, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    cfg = build_sweep(overrides={**TINY, "model": str(minilm_slice), "task": task})
    ev = prepare(cfg).eval                                 # the split the sweep evaluates on
    seen = _capture_trained(monkeypatch, ev)
    out = tmp_path / task
    (full, lora), _ = _sweep(out, model=str(minilm_slice), task=task, ranks=(2,), steps=2,
                             targets=("query", "value"))
    n_labels = seen["lora-r2-s0"].logits.shape[1]
    assert n_labels == 2 if task == "sentiment" else n_labels > 2
    for m in (full, lora):
        assert m["task_kind"] == "cls" and set(m["eval_after"]) == {"loss", "accuracy"}

    # ΔW: the backbone's 13 linears (full) or the 4 adapted ones (LoRA); never the new head
    backbone = {i.name for i in find_linear_modules(load_backbone(minilm_slice))}
    full_ups, lora_ups = _updates(out / "full-s0"), _updates(out / "lora-r2-s0")
    assert not [k for k in [*full_ups, *lora_ups] if "classifier" in k]
    assert len(full_ups) == 13 and all(match_name(k.removesuffix(".delta"), backbone)
                                       for k in full_ups)
    assert len(lora_ups) == 4 * 4

    # the head trains in both methods: it moved away from the (seeded) initial head
    start = load_task_model(cfg, kind="cls", num_labels=n_labels).classifier.weight
    for run in ("full-s0", "lora-r2-s0"):
        (weight,) = [w for n, w in seen[run].head.items() if n.endswith("weight")]
        assert weight.shape == start.shape and not torch.equal(weight, start), run

    # the labels are recorded: in both manifests and beside the adapter, in the head's order
    labels = json.loads((out / "lora-r2-s0" / "adapter" / "labels.json").read_text())
    names = list(prepare(cfg).label_names)
    assert labels["num_labels"] == n_labels == len(names)
    assert list(labels["id2label"].values()) == names == list(full["id2label"].values())
    assert not (out / "full-s0" / "adapter").exists() and full["num_labels"] == n_labels

    # the adapter (LoRA factors and the saved head) reproduces the trained model's logits,
    # loaded as the README shows: the base with the recorded labels, then the adapter
    base = AutoModelForSequenceClassification.from_pretrained(
        minilm_slice, num_labels=labels["num_labels"],
        id2label={int(k): v for k, v in labels["id2label"].items()}, label2id=labels["label2id"])
    loaded = PeftModel.from_pretrained(base, out / "lora-r2-s0" / "adapter").eval()
    with torch.no_grad():
        got = loaded(input_ids=ev["input_ids"], attention_mask=ev["attention_mask"]).logits
    torch.testing.assert_close(got, seen["lora-r2-s0"].logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_the_same_config_and_seed_give_bit_identical_updates(minilm_slice, tmp_path):
    """Twice, in one process, with another LoRA run (r=1) in between the second time: a run is a
    function of its config and seed only (LoRA init, classification head, order, dropout)."""
    common = dict(model=str(minilm_slice), task="sentiment", steps=2, targets=("query", "value"))
    _sweep(tmp_path / "one", ranks=(2,), **common)
    _sweep(tmp_path / "two", ranks=(1, 2), **common)
    for run in ("full-s0", "lora-r2-s0"):
        _assert_same_updates(tmp_path / "one" / run, tmp_path / "two" / run)
        a, b = (pd.read_json(tmp_path / d / run / "metrics.jsonl", lines=True)
                for d in ("one", "two"))
        pd.testing.assert_frame_equal(a[["step", "kind", "loss"]], b[["step", "kind", "loss"]])
    adapters = [load_file(tmp_path / d / "lora-r2-s0" / "adapter" / "adapter_model.safetensors")
                for d in ("one", "two")]
    for k in adapters[0]:                                  # the trained head too
        assert torch.equal(adapters[0][k], adapters[1][k]), k
