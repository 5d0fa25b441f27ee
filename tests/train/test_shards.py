"""``rankscope sweep --shard I/N``: N processes started at once on one folder train the grid's
slices, share its set-up, and together give the unsharded sweep, bit for bit (CPU)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from rankscope.cli import main
from rankscope.errors import InputError
from rankscope.train.sweep import shard_runs

REPO = Path(__file__).resolve().parents[2]


def _start(config: Path, out: Path, shard: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "rankscope", "sweep", str(config), "--out",
                             str(out), "--shard", shard, "--quiet"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_shards_at_once_give_the_unsharded_sweep(news_sweep, news_yaml, tmp_path):
    out = tmp_path / "sharded"
    procs = [_start(news_yaml, out, s) for s in ("1/2", "2/2")]        # both at once
    results = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-3000:]
    assert "full-s0" in results[0][0] and "lora-r2-s0" not in results[0][0]
    assert "lora-r2-s0" in results[1][0] and "full-s0" not in results[1][0]
    for name in ("full-s0", "lora-r2-s0"):
        one = load_file(news_sweep.out / name / "updates.safetensors")
        two = load_file(out / name / "updates.safetensors")
        assert sorted(one) == sorted(two)
        for key in one:                                   # the same process count: bit-identical
            assert one[key].equal(two[key]), (name, key)


def test_shard_slices_cover_the_grid_once():
    runs = list(range(7))
    slices = [shard_runs(runs, (i, 3)) for i in (1, 2, 3)]
    assert slices == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(slices, [])) == runs and shard_runs(runs, None) == runs
    with pytest.raises(InputError, match="1 <= i <= n, got 4/3"):
        shard_runs(runs, (4, 3))


@pytest.mark.parametrize("shard, message", [
    ("3/2", "--shard: expected I/N with 1 <= I <= N, got '3/2'"),
    ("0/2", "--shard: expected I/N with 1 <= I <= N, got '0/2'"),
    ("half", "--shard: expected I/N (e.g. 1/4), got 'half'")])
def test_a_bad_shard_is_one_line(news_yaml, tmp_path, shard, message):
    res = CliRunner().invoke(main, ["sweep", str(news_yaml), "--out", str(tmp_path / "o"),
                                    "--shard", shard])
    assert res.exit_code == 2 and res.output.strip() == f"rankscope: error: {message}"
    assert not (tmp_path / "o").exists()
