"""Kill -9 at the write points of every stage: the rerun finishes, its outputs equal an
uninterrupted run's, and no temporary or half-written file is left.

Every file rankscope writes goes through ``rankscope.store.atomic`` (``atomic_file`` and
``atomic_dir``), whose kill points lie before each write and between its temporary copy and the
rename(s) that publish it; ``RANKSCOPE_FAULT_KILL_AT=n`` SIGKILLs the process at its n-th point.
For each stage (``sweep``, ``compare``, ``truncate``, ``recommend``, ``report``, ``export``,
``figures``: an experiment's own sweep, analysis and figure files) an
uninterrupted reference run counts the stage's points; then, from a copy of the state before
the stage, a run is killed at a point and the same command rerun.

In CI each stage tries 3 points (its first, middle and last); ``RANKSCOPE_FAULTS_ALL=1`` tries
every point (the closing note's table). Outputs are compared as text with the times, machine
names and folder paths that differ between two correct runs masked (bit-identical for the
sweep's tensors and the export's adapter: each tensor's bytes and the file's metadata).
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rankscope.store.atomic import FAULT_KILL_ENV, FAULT_LOG_ENV
from rankscope.pipeline.stages import STAMPS
from rankscope.store.lock import LOCK_FILE

pytestmark = [pytest.mark.faults, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
ALL = os.environ.get("RANKSCOPE_FAULTS_ALL") == "1"
ORDER = ["sweep", "compare", "truncate", "recommend", "report", "export", "figures"]


def _experiment(news_yaml: Path) -> Path:
    """A figure experiment on the news sweep (``rankscope figures``): its own sweep, analysis,
    PNG, CSV and caption JSON."""
    path = news_yaml.with_name("metric_rank.yaml")
    if not path.exists():
        path.write_text(f"result: kill test\nfigure: metric_rank\nsweep: {news_yaml}\n"
                        "variants:\n  quick: {}\n")
    return path


def _command(stage: str, root: Path, news_yaml: Path) -> list[str]:
    runs, results = root / "runs", root / "results"
    args = {"sweep": ["sweep", str(news_yaml), "--out", str(runs)],
            "export": ["export", str(runs / "full-s0"), "--rank", "2", "--out", str(root / "adapter")],
            "figures": ["figures", str(_experiment(news_yaml)), "--variant", "quick",
                        "--out", str(root / "figures"), "--runs-root", str(root / "figure-runs")],
            }.get(stage, [stage, str(runs), "--out", str(results)])
    quiet = [] if stage == "export" else ["--quiet"]
    return [sys.executable, "-m", "rankscope", *args, *quiet]


def _run(cmd, faults: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in (FAULT_KILL_ENV, FAULT_LOG_ENV)}
    env = {**env, "HF_HUB_OFFLINE": "1", **(faults or {})}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, env=env)


MASKS = [(re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d+)?([+-]\d{2}:?\d{2}|Z)?"), "<time>"),
         (re.compile(r'"(wall_time_s|tokens_per_s|seconds|elapsed_s|peak_memory_mb)": [0-9.eE+-]+'),
          r'"\1": <n>'),
         (re.compile(r"Written by rankscope on [^<\n]*"), "Written by rankscope on <time>"),
         (re.compile(r'"git": "[^"]*"'), '"git": <revision>')]     # a commit during a long run


TIMINGS = {"wall_time_s", "tokens_per_s", "peak_memory_mb"}   # differ between two equal runs


def _text(path: Path, root: Path) -> str:
    text = path.read_text(errors="replace").replace(str(root), "<root>")     # a snapshot's copy
    for pattern, sub in MASKS:
        text = pattern.sub(sub, text)
    if path.name == STAMPS:      # stamps hash the runs' manifests, timings included: which
        return json.dumps(sorted(json.loads(text)))     # stages are done is what must agree
    if path.suffix == ".csv":
        rows = list(csv.reader(io.StringIO(text)))
        keep = [i for i, name in enumerate(rows[0] if rows else []) if name not in TIMINGS]
        return "\n".join(",".join(r[i] for i in keep if i < len(r)) for r in rows)
    if path.suffix == ".json":
        try:
            doc = json.loads(text)
        except ValueError:
            return text
        for key in ("machine", "time", "git", "versions"):
            doc.pop(key, None) if isinstance(doc, dict) else None
        if isinstance(doc, dict) and isinstance(doc.get("target_modules"), list):
            doc["target_modules"] = sorted(doc["target_modules"])   # peft saves a set, unordered
        return json.dumps(doc, sort_keys=True)
    return text


def _state(root: Path, mask: Path) -> dict[str, object]:
    """Every file under ``root`` (bar the lock) as comparable content, ``mask``'s path masked."""
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name == LOCK_FILE:
            continue
        rel = str(p.relative_to(root))
        if p.suffix in (".csv", ".json", ".jsonl", ".md", ".yaml", ".html", ".txt"):
            out[rel] = _text(p, mask)
        elif p.suffix in (".png",):
            out[rel] = "png"            # drawn from the tables compared above
        elif p.suffix == ".safetensors":    # its header's key order varies between processes
            out[rel] = _tensors(p)
        else:
            out[rel] = p.read_bytes()
    return out


def _tensors(path: Path) -> tuple:
    """A safetensors file as (metadata, {name: bytes of the tensor}): bit-identity of content."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return (f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in sorted(f.keys())})


def _leftovers(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*")
            if p.name.endswith(".tmp") or p.name.endswith(".old") or ".tmp" in p.name]


def _restore(snapshot: Path, work: Path) -> None:
    """Make ``work`` hold exactly ``snapshot`` (results are bound to their runs folder's path,
    so every run of a stage happens at the same path)."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(snapshot, work)


@pytest.fixture(scope="module")
def chain(news_yaml, tmp_path_factory):
    """Each stage run uninterrupted after the previous one, at one working path: snapshots of
    the state before and after it, and its kill points."""
    base = tmp_path_factory.mktemp("chain")
    work = base / "work" / "study"
    before, stages = base / "empty", {}
    before.mkdir()
    for stage in ORDER:
        _restore(before, work)
        log = base / f"{stage}.points"
        done = _run(_command(stage, work, news_yaml), {FAULT_LOG_ENV: str(log)})
        assert done.returncode == 0, (stage, done.stderr)
        n = len(log.read_text().splitlines()) if log.exists() else 0
        after = base / stage
        shutil.copytree(work, after)
        stages[stage] = (before, after, n)
        before = after
    return work, stages


def _points(n: int) -> list[int]:
    if ALL:
        return list(range(1, n + 1))
    return sorted({1, (n + 1) // 2, n}) if n else []


@pytest.mark.parametrize("stage", ORDER)
def test_a_stage_killed_at_its_write_points_reruns_to_the_same_outputs(stage, chain, news_yaml):
    work, stages = chain
    before, after, n = stages[stage]
    assert n >= 1, f"{stage} reached no write point"
    want = _state(after, work)
    survived = 0
    for point in _points(n):
        _restore(before, work)
        cmd = _command(stage, work, news_yaml)
        killed = _run(cmd, {FAULT_KILL_ENV: str(point)})
        assert killed.returncode == -9, (stage, point, killed.returncode, killed.stderr[-2000:])
        rerun = _run(cmd)
        assert rerun.returncode == 0, (stage, point, rerun.stderr[-2000:])
        assert _leftovers(work) == [], (stage, point)
        got = _state(work, work)
        assert sorted(got) == sorted(want), (stage, point, set(got) ^ set(want))
        diff = [k for k in want if got[k] != want[k]]
        assert not diff, (stage, point, diff[:5])
        survived += 1
    print(f"\nkill points: {stage}: {n} in the stage, {len(_points(n))} tried, {survived} "
          "survived with equal outputs")
