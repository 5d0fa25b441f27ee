"""``rankscope run``, the whole job (sweep → compare → truncate → recommend → report), through
click's CliRunner: its resumption, the user-data form, and every bad input.

The job trains the first 2 pretrained blocks of SmolLM2 on news: full fine-tuning and LoRA
r = 2, 4 on {q_proj, v_proj}, 2 steps of 2 × 32 tokens each, evaluated on 4 blocks. Bad inputs
must fail before anything trains: one line ``rankscope: error: …``, exit status 2, no output.
"""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
from clichecks import assert_one_line_error as one_line_error
import yaml
from click.testing import CliRunner

from rankscope.cli import main

# every field the quick profile (the job's base on a CPU) sets is pinned: one seed, no rate
# search, full fine-tuning of every parameter, no evaluation but the 80% one
TINY = dict(task="news", ranks=[2, 4], steps=2, batch_size=2, max_len=32, max_eval_examples=4,
            max_train_examples=8, checkpoint_every=2, bf16=False, seeds=[0], lr_search=False,
            full_scope="all", eval_every=0)
STAGE_NAMES = ["sweep", "compare", "truncate", "recommend", "report"]
OUTPUTS = ["report.html", "report.md", "lora_config.json", "recommendation.csv", "rationale.md",
           "verdict.md", "metrics.csv", "truncation_summary.csv"]


def invoke(*args):
    return CliRunner().invoke(main, ["run", *map(str, args), "--quiet"])


def write_yaml(path, values: dict):
    path.write_text("# rankscope run " + path.name + " --out OUT\n" + yaml.safe_dump(values))
    return path


def undated(data: bytes) -> bytes:
    return re.sub(rb"Written by rankscope on [^<\n]*", b"", data)


def stage_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if re.match(r"\[\d/5\] ", line)]


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory):
    """The job's config: the 2-block SmolLM2 slice by its registry name, news, tiny sizes."""
    return write_yaml(tmp_path_factory.mktemp("job-config") / "tiny.yaml",
                      {"model": "smollm2-135m@2l", **TINY})


@pytest.fixture(scope="module")
def sizes_yaml(tmp_path_factory):
    """Sizes and a LoRA r = 2 grid, no model or task: for ``--model … --data … --task-kind …``
    (no full run: the quickest job, whose truncation stage is skipped; 96 tokens hold the
    chat template's system prompt and an answer)."""
    return write_yaml(tmp_path_factory.mktemp("job-sizes") / "sizes.yaml",
                      {**{k: v for k, v in TINY.items() if k != "task"},
                       "methods": ["lora"], "ranks": [2], "max_len": 96})


@pytest.fixture(scope="module")
def study(tiny_yaml, tmp_path_factory):
    """The job run twice into one folder: the second run finds every stage done."""
    out = tmp_path_factory.mktemp("job") / "study"
    first = invoke(tiny_yaml, "--out", out)
    assert first.exit_code == 0, first.output
    res = out / "results"
    before = {f: (res / f).read_bytes() for f in OUTPUTS}
    mtimes = {f: (res / f).stat().st_mtime_ns for f in ("metrics.csv", "truncation.csv")}
    second = invoke(tiny_yaml, "--out", out)
    assert second.exit_code == 0, second.output
    return SimpleNamespace(out=out, results=res, first=first, second=second, before=before,
                           mtimes=mtimes)


@pytest.mark.slow
def test_the_job_prints_each_stage_in_order_and_the_report_path(study):
    lines = stage_lines(study.first.stdout)
    assert [line[:5] for line in lines] == [f"[{i}/5]" for i in range(1, 6)]
    for line, name in zip(lines, STAGE_NAMES):
        assert line[6:].startswith(name + ":"), line
    assert "3 runs of smollm2-135m@2l on news (2 steps each" in lines[0]
    assert "k = 1, 2, 4, 8, 16, 32, 64" in lines[2]
    for run in ("full-s0", "lora-r2-s0", "lora-r4-s0"):
        assert re.search(rf"^\s+{run}\s+loss [\d.]+ → [\d.]+", study.first.stdout, re.M), run
    last = study.first.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"done in \d+s; report: .*", last)
    assert last.endswith(str(study.results / "report.html"))
    assert study.first.stderr == ""


@pytest.mark.slow
def test_the_job_writes_the_report_the_config_and_every_table(study):
    from peft import LoraConfig

    for f in OUTPUTS:
        assert (study.results / f).is_file(), f
    for run in ("full-s0", "lora-r2-s0", "lora-r4-s0"):
        assert (study.out / "runs" / run / "manifest.json").is_file()
    config = LoraConfig(**json.loads((study.results / "lora_config.json").read_text()))
    assert config.r >= 1 and set(config.target_modules) <= {"q_proj", "v_proj"}
    page = (study.results / "report.html").read_text()
    for anchor in ("setup", "truncation", "verdict", "recommendation"):
        assert f'<section id="{anchor}">' in page, anchor


@pytest.mark.slow
def test_a_second_run_skips_every_finished_stage_and_gives_the_same_outputs(study):
    out = study.second.stdout
    assert [line[:5] for line in stage_lines(out)] == [f"[{i}/5]" for i in range(1, 6)]
    for run in ("full-s0", "lora-r2-s0", "lora-r4-s0"):
        assert re.search(rf"^\s+{run}\s+finished earlier, skipped$", out, re.M), run
    # compare and truncate: skipped, their tables untouched
    skipped = [line.split()[0] for line in out.splitlines()
               if line.endswith("up to date, skipped")]
    assert skipped[:2] == ["compare", "truncate"], out
    for f, mtime in study.mtimes.items():
        assert (study.results / f).stat().st_mtime_ns == mtime, f
    for f, data in study.before.items():          # the same, but for the report's time
        assert undated((study.results / f).read_bytes()) == undated(data), f
    assert out.strip().splitlines()[-1].endswith(str(study.results / "report.html"))


# ------------------------------------------------------------------ the user-data form

@pytest.mark.slow
def test_the_job_on_a_local_model_folder_and_a_jsonl_file(smollm2_slice, sizes_yaml, tmp_path):
    """``rankscope run --model <folder> --data train.jsonl --task-kind sft --out study/``,
    sized by a YAML file, with LoRA r = 2 only."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} plus {b}?",
                                        "response": f"{a} plus {b} is {a + b}."}) + "\n"
                            for a in range(8) for b in range(5)))
    out = tmp_path / "study"
    res = invoke(sizes_yaml, "--model", smollm2_slice, "--data", data, "--task-kind", "sft",
                 "--out", out)
    assert res.exit_code == 0, res.output
    lines = stage_lines(res.stdout)
    assert len(lines) == 5
    assert f"1 runs of {smollm2_slice} on {data}" in lines[0]
    assert "truncate: skipped (the sweep has no full fine-tuning run)" in lines[2]
    manifest = json.loads((out / "runs" / "lora-r2-s0" / "manifest.json").read_text())
    assert manifest["task_kind"] == "sft" and manifest["method"] == "lora"
    assert (manifest["n_train_examples"], manifest["n_eval_examples"]) == (8, 4)   # the caps
    config = json.loads((out / "results" / "lora_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["r"] == 2
    assert (out / "results" / "report.html").is_file() and (out / "results" / "report.md").is_file()


# ------------------------------------------------------------------------ bad inputs

def assert_one_line_error(res, out, *fragments):
    one_line_error(res, *fragments, out=out)


@pytest.mark.parametrize("budget, fragment", [("1.5X", "cannot read '1.5X'"),
                                              ("-1", "must be a positive parameter count"),
                                              ("767", "smaller than one rank-1 adapter (768 ")])
def test_a_bad_budget_fails_before_the_sweep_trains(tiny_yaml, tmp_path, budget, fragment):
    # LoRA on {q_proj, v_proj}: the cheapest rank-1 adapter is v_proj's 192 + 576 = 768
    out = tmp_path / "study"
    assert_one_line_error(invoke(tiny_yaml, "--out", out, "--budget", budget), out,
                          "budget", fragment)


def test_a_budget_for_a_sweep_without_lora_counts_every_linear_module(tiny_yaml, tmp_path):
    # no LoRA run: the candidates are every linear module; the smallest, k_proj and v_proj
    # (192 × 576), cost 768 at rank 1; the MLP's up_proj (1536 × 576) 2,112
    from rankscope.train.config import build_sweep
    from rankscope.pipeline.job import cheapest_adapter

    cfg = build_sweep(yaml_path=tiny_yaml, overrides={"methods": ("full",)})
    assert cheapest_adapter(cfg) == 192 + 576
    cfg = build_sweep(yaml_path=tiny_yaml, overrides={"targets": ("up_proj",)})
    assert cheapest_adapter(cfg) == 1536 + 576
    cfg = build_sweep(yaml_path=tiny_yaml, overrides={"targets": ("nothing_like_this",)})
    assert cheapest_adapter(cfg) is None        # the sweep itself names the bad target


def test_a_missing_data_file_is_one_line(sizes_yaml, tmp_path):
    out = tmp_path / "study"
    res = invoke(sizes_yaml, "--model", "smollm2-135m@2l", "--data", tmp_path / "nope.jsonl",
                 "--task-kind", "sft", "--out", out)
    assert_one_line_error(res, out, "nope.jsonl: file not found")


def test_a_data_file_that_breaks_its_schema_fails_before_training(sizes_yaml, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
    out = tmp_path / "study"
    res = invoke(sizes_yaml, "--model", "smollm2-135m@2l", "--data", data, "--task-kind", "sft",
                 "--out", out)
    assert_one_line_error(res, out, "row 2 is missing field 'response'")


def test_an_out_folder_that_is_a_file_is_one_line(tiny_yaml, tmp_path):
    out = tmp_path / "study"
    out.write_text("not a folder")
    assert_one_line_error(invoke(tiny_yaml, "--out", out), None, "exists and is not a folder")
    assert out.read_text() == "not a folder"
    (tmp_path / "s2").mkdir()
    (tmp_path / "s2" / "results").write_text("")
    assert_one_line_error(invoke(tiny_yaml, "--out", tmp_path / "s2"), None,
                          "s2/results exists and is not a folder")
    assert [p.name for p in (tmp_path / "s2").iterdir()] == ["results"]


@pytest.mark.parametrize("args, fragment", [
    (["--ranks", "2,x"], "--ranks: expected comma-separated integers"),
    (["--ranks", "0"], "every rank must be a positive integer"),
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--model", "./no/such/folder"], "does not exist"),
    (["--steps", "0"], "steps: must be positive"),
])
def test_other_bad_flags_are_one_line(tiny_yaml, tmp_path, args, fragment):
    out = tmp_path / "study"
    assert_one_line_error(invoke(tiny_yaml, *args, "--out", out), out, fragment)


def test_a_missing_config_file_is_one_line(tmp_path):
    out = tmp_path / "study"
    assert_one_line_error(invoke(tmp_path / "nope.yaml", "--out", out), out,
                          "missing config file")


def test_a_job_folder_in_use_by_another_process_is_one_line(tiny_yaml, tmp_path):
    """A second ``rankscope run`` on a folder whose job is running is refused before it
    trains (the holder here is a process holding the folder's lock, as a running job does)."""
    import subprocess
    import sys

    out = tmp_path / "study"
    out.mkdir()
    hold = ("import sys, time\nfrom rankscope.store.lock import folder_lock\n"
            "with folder_lock(sys.argv[1], what='job'):\n    print('held', flush=True)\n"
            "    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert_one_line_error(invoke(tiny_yaml, "--out", out), None,
                              f"job folder {out} is in use by process {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    assert [p.name for p in out.iterdir()] == [".rankscope.lock"]      # nothing trained
