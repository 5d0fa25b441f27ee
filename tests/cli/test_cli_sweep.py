"""`rankscope sweep` through the CLI: the user's own files, and bad input as one line, exit 2."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from rankscope.cli import main
from rankscope.train.data import data_hash
from rankscope.train.user_files import load_user_file

REPO = Path(__file__).resolve().parents[2]


def _cli(*args):
    return CliRunner().invoke(main, ["sweep", *map(str, args), "--quiet"])


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def _manifest(run_dir) -> dict:
    return json.loads((Path(run_dir) / "manifest.json").read_text())


# ---------------------------------------------------------------- the user's own files

def _write_user_file(path: Path, kind: str) -> Path:
    words = "river stone market violin cloud paper garden engine silver orange".split()
    rows = []
    for i in range(30):
        text = " ".join(words[(i + j) % 10] for j in range(8 + i % 5)) + f" number {i}."
        rows.append({"lm": {"text": text},
                     "sft": {"prompt": f"What is item {i}?", "response": text},
                     "cls": {"text": text, "label": ["good", "bad", "neutral"][i % 3]}}[kind])
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        path.write_text("\n\n".join(r["text"] for r in rows) + "\n")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("kind, suffix", [("lm", ".jsonl"), ("sft", ".jsonl"), ("cls", ".jsonl"),
                                          ("cls", ".csv"), ("sft", ".csv"), ("lm", ".txt")])
def test_a_users_file_trains_through_the_cli(kind, suffix, smollm2_slice, minilm_slice, tmp_path):
    data = _write_user_file(tmp_path / f"mine{suffix}", kind)
    model, targets = (minilm_slice, "query,value") if kind == "cls" else (smollm2_slice, "q_proj")
    max_len = 64 if kind == "sft" else 32              # room for SmolLM2's chat template
    out = tmp_path / "out"
    # float32: this checks a file's way through the CLI; bf16 training is test_bf16's (forced
    # on a CPU without native bf16, the SmolLM2 runs here would take ~1 min each, not 10 s)
    result = _cli("--model", model, "--data", data, "--task-kind", kind, "--methods", "lora",
                  "--ranks", 2, "--targets", targets, "--steps", 2, "--batch-size", 4,
                  "--max-len", max_len, "--max-eval-examples", 8, "--no-bf16", "--out", out)
    assert result.exit_code == 0, result.output
    m = _manifest(out / "lora-r2-s0")
    assert m["task"] is None and m["data"] == str(data) and m["task_kind"] == kind
    assert m["data_hash"] == data_hash(load_user_file(data, kind=kind))
    n_modules = 2 * len(targets.split(","))                  # 2 blocks
    assert m["n_eval_examples"] >= 1 and len(load_file(out / "lora-r2-s0" / "updates.safetensors")) == 4 * n_modules
    metric = "accuracy" if kind == "cls" else "perplexity"
    assert metric in m["eval_after"]


# ---------------------------------------------------------------- bad input: one line, exit 2

def _not_writable_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        (locked / "probe").write_text("")
    except PermissionError:
        return locked / "out"
    pytest.skip("running as root: a 0o500 folder is still writable (the file case covers it)")


def _files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(10)))
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(30)))
    (tmp_path / "file.txt").write_text("not a folder")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("alpha: x\n")
    return SimpleNamespace(empty=empty, few=few, texts=texts, bad_yaml=bad_yaml)


BAD = {
    "unknown task": (lambda s, f: ["--task", "nope"], r"unknown task 'nope'; known tasks: news"),
    "unknown model": (lambda s, f: ["--model", "no-such-model", "--task", "news"],
                      r"no-such-model"),
    "rank 0": (lambda s, f: ["--ranks", "2,0"], r"ranks: every rank must be a positive integer"),
    "rank -1": (lambda s, f: ["--ranks", "-1"], r"ranks: every rank must be a positive integer"),
    "rank above min(d_out, d_in)": (lambda s, f: ["--ranks", "4,1000", "--targets", "q_proj"],
                                    r"rank 1000 is larger than min\(d_out, d_in\) = 576 of q_proj"),
    "missing target": (lambda s, f: ["--targets", "q_proj,query"],
                       r"target module 'query' not in the model; it has: down_proj"),
    "empty data file": (lambda s, f: ["--data", f.empty, "--task-kind", "lm"],
                        r"empty.jsonl: no examples in the file"),
    "file not matching the schema": (lambda s, f: ["--data", f.texts, "--task-kind", "sft"],
                                     r"texts.jsonl: row 1 is missing field 'prompt'"),
    "too few examples to split": (lambda s, f: ["--data", f.few, "--task-kind", "lm"],
                                  r"10 examples are too few to split"),
    "missing data file": (lambda s, f: ["--data", f.empty.with_name("none.jsonl"),
                                        "--task-kind", "lm"], r"none.jsonl: file not found"),
    "all-linear rank above the smallest module": (
        lambda s, f: ["--ranks", "193", "--targets", "all-linear"],
        r"rank 193 is larger than min\(d_out, d_in\) = 192 of the smallest linear module"),
    "max_len beyond the model's positions": (
        lambda s, f: ["--max-len", "100000"], r"max_len 100000 is longer than the 8192 positions"),
    "planted rank not a number": (lambda s, f: ["--task", "planted", "--planted-rank", "four"],
                                  r"--planted-rank: expected comma-separated integers, got 'four'"),
    "planted rank per module not a number": (
        lambda s, f: ["--task", "planted", "--planted-rank", "q_proj=2,v_proj=x"],
        r"--planted-rank: expected an integer or kind=rank pairs"),
    "planted rank a list": (lambda s, f: ["--task", "planted", "--planted-rank", "4,8"],
                            r"--planted-rank: expected one integer or kind=rank pairs .* got '4,8'"),
    "planted rank 0": (lambda s, f: ["--task", "planted", "--planted-rank", "q_proj=0"],
                       r"planted_rank: expected a positive integer"),
    "planted scale 0": (lambda s, f: ["--task", "planted", "--planted-scale", "0"],
                        r"planted_scale: must be a finite positive number, got 0.0"),
    "wrongly typed YAML value": (lambda s, f: [f.bad_yaml], r"alpha: expected a number, got 'x'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, smollm2_slice, tmp_path):
    make_args, match = BAD[case]
    out = tmp_path / "out"
    args = ["--model", smollm2_slice, "--task", "news", "--max-len", 32, "--steps", 2,
            *make_args(smollm2_slice, _files(tmp_path)), "--out", out]
    if "--data" in args or args.count("--task") > 1:       # a file or a case's task replaces it
        i = args.index("--task")
        del args[i:i + 2]
    result = _cli(*args)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)         # no traceback
    lines = _error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("rankscope: error: "), lines
    assert re.search(match, lines[0]), lines[0]
    assert not out.exists()                                 # nothing half-written


@pytest.mark.parametrize("where", ["under a file", "read-only folder"])
def test_an_output_folder_that_cannot_be_written_is_refused(where, smollm2_slice, tmp_path):
    if where == "under a file":
        (tmp_path / "file.txt").write_text("not a folder")
        out = tmp_path / "file.txt" / "sub"
    else:
        out = _not_writable_dir(tmp_path)
    result = _cli("--model", smollm2_slice, "--task", "news", "--max-len", 32, "--out", out)
    assert result.exit_code == 2
    lines = _error_lines(result)
    assert len(lines) == 1 and lines[0].startswith(f"rankscope: error: output folder {out}")
    assert "is not writable" in lines[0] and not out.exists()


def test_a_bad_input_in_a_real_process_prints_one_line_and_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "rankscope", "sweep", "--task", "nope",
                           "--model", "minilm-l6", "--out", str(tmp_path / "out"), "--quiet"],
                          capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "rankscope: error: unknown task 'nope'; known tasks: news, qa, sentiment, topic, planted"]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_planted_flags_reach_every_runs_manifest(minilm_slice, tmp_path):
    out = tmp_path / "out"
    result = _cli("--model", minilm_slice, "--task", "planted", "--planted-rank", "query=2,value=3",
                  "--planted-scale", 0.3, "--planted-seed", 5, "--full-scope", "linear", "--targets", "query,value",
                  "--ranks", 1, "--steps", 1, "--batch-size", 2, "--max-len", 16,
                  "--max-eval-examples", 2, "--no-bf16", "--out", out)
    assert result.exit_code == 0, result.output
    for run in ("full-s0", "lora-r1-s0"):
        m = _manifest(out / run)
        assert (m["planted_rank"], m["planted_scale"], m["planted_seed"], m["full_scope"]) == (
            {"query": 2, "value": 3}, 0.3, 5, "linear")
        assert m["task_kind"] == "distill" and m["targets"] in ("all", ["query", "value"])
