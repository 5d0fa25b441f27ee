"""A real full disk and a real read-only folder under a sweep: a small tmpfs mounted for the
test, the sweep run as its own process on it.

Mounting needs root with CAP_SYS_ADMIN (a CI container usually has it); elsewhere these skip,
and ``tests/store/test_atomic.py`` injects the same errors at the write helper. The injected
tests had missed one: safetensors' writer wraps ENOSPC in its own error class, and a sweep on a
40 MB disk ended in that traceback.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rankscope.errors import InputError
from rankscope.store.atomic import atomic_dir, atomic_file
from rankscope.store.runs import UPDATES

pytestmark = [pytest.mark.faults, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def _mount(where: Path, options: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True, text=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 40 MB tmpfs: room for the sweep's config and base evaluation, not for full
    fine-tuning's first checkpoint (~85 MB on the 2-block SmolLM2 slice)."""
    where = tmp_path / "disk"
    where.mkdir()
    if os.geteuid() != 0 or _mount(where, "size=40m").returncode:
        pytest.skip("mounting a tmpfs needs root with CAP_SYS_ADMIN")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _sweep(news_yaml: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "rankscope", "sweep", str(news_yaml), "--out",
                           str(out), "--quiet"], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=600)


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_disk_that_fills_mid_sweep_is_one_line_and_the_sweep_resumes_once_freed(
        small_disk, news_yaml, news_sweep):
    out = small_disk / "runs"
    full = _sweep(news_yaml, out)
    lines = full.stderr.strip().splitlines()
    assert full.returncode == 2 and len(lines) == 1, full.stderr[-2000:]
    assert lines[0].startswith(f"rankscope: error: cannot write {out}/full-s0/")
    assert lines[0].endswith("No space left on device; free space and rerun (what was there "
                             "before is unchanged)")
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or p.name.endswith(".old")]

    assert _mount(small_disk, "remount,size=1g").returncode == 0      # space freed
    rerun = _sweep(news_yaml, out)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    for run in ("full-s0", "lora-r2-s0"):       # bit-identical to the sweep that had the room
        want, got = load_file(news_sweep.out / run / UPDATES), load_file(out / run / UPDATES)
        assert sorted(got) == sorted(want) and all(got[k].equal(want[k]) for k in want), run


@pytest.mark.parametrize("helper", ["file", "dir"])
def test_torch_save_filling_the_disk_is_the_full_disk_line(small_disk, helper):
    """torch.save (a checkpoint's state.pt) reports a full disk as a bare RuntimeError."""
    target = small_disk / "state"
    with pytest.raises(InputError, match=rf"^cannot write {target}: No space left on device; "):
        with (atomic_file(target) if helper == "file" else atomic_dir(target)) as tmp:
            torch.save({"x": torch.zeros(12_000_000)}, tmp if helper == "file" else tmp / "s.pt")
    assert list(small_disk.iterdir()) == []             # the temporary went, and its space


def test_a_read_only_study_is_refused_in_one_line_and_left_as_it_was(small_disk, news_yaml,
                                                                       tmp_path):
    assert _mount(small_disk, "remount,size=1g").returncode == 0
    out = small_disk / "runs"
    assert _sweep(news_yaml, out).returncode == 0
    before = _files(out)
    more = tmp_path / "more.yaml"           # one rank more: the sweep would have work to do
    more.write_text(news_yaml.read_text().replace("- 2\n", "- 2\n- 3\n"))
    assert "- 3\n" in more.read_text()
    assert _mount(small_disk, "remount,ro").returncode == 0
    refused = _sweep(more, out)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert refused.stderr.strip() == (f"rankscope: error: output folder {out} is not writable "
                                      "(Read-only file system)")
    assert _files(out) == before
