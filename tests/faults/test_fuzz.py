"""Bad-input fuzzing: generated configs, flags, adapter configs and data files either work or
end in one ``InputError`` line (exit 2 at the CLI), never another exception.

Property-based (``hypothesis``), derandomized so that CI tries the same inputs every time; each
test counts the inputs it tried and checks the count, so a strategy that silently generates
nothing fails. ``pytest tests/faults -m faults`` runs these alone.
"""
from __future__ import annotations

import json
import math
import string
from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rankscope.analysis.deltas import lora_scale, pattern_value, read_adapter_config
from rankscope.cli import main
from rankscope.errors import InputError
from rankscope.train.config import SweepConfig, build_sweep
from rankscope.train.user_files import load_user_file

pytestmark = pytest.mark.faults


def fuzz(n: int) -> settings:
    """n inputs, the same ones on every run (derandomized), no example database on disk."""
    return settings(max_examples=n, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


N_CONFIG, N_FLAGS, N_ADAPTER, N_DATA = 400, 120, 300, 300

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 2 ** 40),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=10))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=4),
                   st.dictionaries(st.text(max_size=8), SCALARS, max_size=3))
FIELDS = [f.name for f in fields(SweepConfig)]
KEYS = st.one_of(st.sampled_from(FIELDS), st.text(string.ascii_lowercase + "_", max_size=12))


def _outcome(fn, *args, **kwargs) -> str:
    """'ok' or 'refused' (an InputError of one non-empty line); any other exception fails."""
    try:
        fn(*args, **kwargs)
    except InputError as e:
        assert str(e).strip() and "\n" not in str(e).strip(), repr(e)
        return "refused"
    return "ok"


# ---------------------------------------------------------------- the YAML config

@given(doc=st.one_of(st.dictionaries(KEYS, VALUES, max_size=6), VALUES,
                     st.text(max_size=60).map(lambda t: {"__raw__": t})))
@fuzz(N_CONFIG)
def test_any_yaml_config_builds_or_is_refused_in_one_line(doc, tmp_path_factory, tally):
    path = tmp_path_factory.mktemp("cfg", numbered=True) / "sweep.yaml"
    if isinstance(doc, dict) and "__raw__" in doc:
        path.write_text(doc["__raw__"])                     # text that may not be YAML at all
    else:
        path.write_text(yaml.safe_dump(doc))
    tally["config", _outcome(build_sweep, yaml_path=path)] += 1


# ---------------------------------------------------------------- the flags

FLAGS = {"--ranks": st.text("0123456789,-x ", max_size=8), "--seeds": st.text("0123456789,-", max_size=6),
         "--steps": st.text("0123456789-.e", max_size=5), "--lr-lora": st.text("0123456789.-einaf", max_size=6),
         "--planted-rank": st.text("0123456789,=qvuery_", max_size=12),
         "--planted-scale": st.text("0123456789.-nai", max_size=5),
         "--alpha-policy": st.sampled_from(["fixed", "scaled", "rslora", "other", ""]),
         "--full-scope": st.sampled_from(["all", "linear", "targets", "none"]),
         "--targets": st.text("qvk_proj,all-linear", max_size=12),
         "--task": st.sampled_from(["news", "qa", "sentiment", "topic", "planted", "nope"]),
         "--max-len": st.text("0123456789-", max_size=4),
         "--batch-size": st.text("0123456789-", max_size=3)}


@given(flags=st.dictionaries(st.sampled_from(sorted(FLAGS)), st.just(None), min_size=1,
                             max_size=4).flatmap(
    lambda d: st.fixed_dictionaries({k: FLAGS[k] for k in d})))
@fuzz(N_FLAGS)
def test_any_sweep_flags_end_in_one_line(flags, tmp_path_factory, tally):
    """The model is a missing folder, so a valid combination ends at its first check (one line)
    rather than training: every input must be one ``rankscope: error:`` line and exit 2."""
    out = tmp_path_factory.mktemp("flags", numbered=True) / "out"
    args = ["sweep", "--out", str(out), "--model", "./no-such-model", "--quiet"]
    for k, v in flags.items():
        args += [k, v]
    res = CliRunner().invoke(main, args)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), (args, res.output)
    assert len(lines) == 1 and lines[0].startswith("rankscope: error: "), (args, res.stderr)
    assert not out.exists()
    tally["flags", "model" if "no-such-model" in lines[0] else "refused"] += 1


# ---------------------------------------------------------------- adapter configs

PATTERN = st.dictionaries(st.one_of(st.text("qv_proj.*[]0-9", max_size=10), st.just("(")),
                          st.one_of(st.integers(-2, 64), st.floats(allow_nan=True),
                                    st.text(max_size=3), st.none()), max_size=3)
ADAPTER = st.fixed_dictionaries({}, optional={
    "peft_type": st.sampled_from(["LORA", "lora", "IA3", "", None]),
    "r": st.one_of(st.integers(-2, 128), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=3), st.none()),
    "lora_alpha": st.one_of(st.integers(-2, 256), st.floats(allow_nan=True, allow_infinity=True),
                            st.text(max_size=3), st.none()),
    "target_modules": st.one_of(st.lists(st.text("qvk_proj", max_size=7), max_size=3),
                                st.text(max_size=10), st.none(), st.integers()),
    "rank_pattern": st.one_of(PATTERN, st.lists(st.integers(), max_size=2), st.text(max_size=4)),
    "alpha_pattern": st.one_of(PATTERN, st.integers()),
    "use_rslora": st.one_of(st.booleans(), st.text(max_size=3), st.none()),
    "use_dora": st.one_of(st.booleans(), st.none())})


def _read_and_scale(folder: Path) -> None:
    """What ``from_adapter`` does with a config before it reads factors: read it, then a
    module's rank, α and scale (peft's defaults r = α = 8; a rank that rounds to 0 is refused
    there by the factors' shapes, so it stops here)."""
    cfg = read_adapter_config(folder)
    name = "model.layers.0.self_attn.q_proj"
    r = int(pattern_value(cfg.get("rank_pattern"), name, cfg.get("r", 8)))
    alpha = float(pattern_value(cfg.get("alpha_pattern"), name, cfg.get("lora_alpha", 8)))
    if r >= 1:
        s = lora_scale(alpha, r, rslora=bool(cfg.get("use_rslora")))
        assert math.isfinite(s) and s > 0, (cfg, s)


@given(doc=st.one_of(ADAPTER, VALUES))
@fuzz(N_ADAPTER)
def test_any_adapter_config_reads_or_is_refused_in_one_line(doc, tmp_path_factory, tally):
    folder = tmp_path_factory.mktemp("adapter", numbered=True)
    (folder / "adapter_config.json").write_text(json.dumps(doc))
    tally["adapter", _outcome(_read_and_scale, folder)] += 1


# ---------------------------------------------------------------- data files of each kind

ROW = st.one_of(st.dictionaries(st.sampled_from(["text", "prompt", "response", "label", "x"]),
                                SCALARS, max_size=3), SCALARS)


def _file_text(suffix: str, rows: list) -> str:
    if suffix == ".jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows)
    if suffix == ".json":
        return json.dumps(rows)
    if suffix == ".csv":
        keys = sorted({k for r in rows if isinstance(r, dict) for k in r})
        return ",".join(keys) + "\n" + "".join(
            ",".join(str(r.get(k, "")) if isinstance(r, dict) else str(r) for k in keys) + "\n"
            for r in rows)
    return "\n\n".join(str(r) for r in rows)


@given(kind=st.sampled_from(["lm", "sft", "cls"]),
       suffix=st.sampled_from([".jsonl", ".json", ".csv", ".txt"]),
       rows=st.lists(ROW, max_size=5), raw=st.one_of(st.none(), st.binary(max_size=40)))
@fuzz(N_DATA)
def test_any_data_file_loads_or_is_refused_in_one_line(kind, suffix, rows, raw, tmp_path_factory,
                                                       tally):
    path = tmp_path_factory.mktemp("data", numbered=True) / f"data{suffix}"
    if raw is not None:
        path.write_bytes(raw)                                # bytes that may not be UTF-8
    else:
        path.write_text(_file_text(suffix, rows))
    tally["data", _outcome(load_user_file, path, kind=kind)] += 1


def test_every_fuzzer_tried_its_inputs_with_both_outcomes(tally):
    """Runs last in this file (pytest keeps file order): the counts of the tests above."""
    tried = {w: sum(v for (k, _), v in tally.items() if k == w) for w in
             ("config", "flags", "adapter", "data")}
    print("fuzzed inputs tried:", tried, dict(tally))
    wanted = {"config": N_CONFIG, "flags": N_FLAGS, "adapter": N_ADAPTER, "data": N_DATA}
    assert all(tried[w] >= n for w, n in wanted.items()), tried
    for what in ("config", "adapter", "data"):
        assert tally[what, "ok"] and tally[what, "refused"], (what, dict(tally))
