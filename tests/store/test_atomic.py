"""Writes that fail for reasons outside rankscope (a full disk, a read-only folder) end in one
line naming the path and the fix, and leave the previous file or folder as it was."""
from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from clichecks import assert_one_line_error

from rankscope.cli import main
from rankscope.errors import InputError
from rankscope.store import atomic
from rankscope.store.atomic import atomic_dir, atomic_file, atomic_write_text

ROOT = Path(__file__).resolve().parents[2]


def _fail(code):
    """A stand-in for an OS call that fails with ``code`` (as the real one would)."""
    def raise_(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return raise_


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _safetensors_full():
    """safetensors' ``save_file`` on a full disk: its Rust writer wraps the OS's error in its own
    class (measured: a sweep on a 40 MB tmpfs ended in this traceback before the helper read the
    code out of the message)."""
    from safetensors import SafetensorError
    raise SafetensorError("Error while serializing: I/O error: No space left on device "
                          "(os error 28)")


@pytest.mark.parametrize("fill", [_fail(errno.ENOSPC), _safetensors_full],
                         ids=["os", "safetensors"])
def test_a_disk_that_fills_mid_write_leaves_the_old_file_and_no_temporary(tmp_path, fill):
    path = tmp_path / "updates.safetensors"
    path.write_text("old")
    want = (rf"^cannot write {path}: No space left on device; free space and rerun "
            r"\(what was there before is unchanged\)$")
    with pytest.raises(InputError, match=want):
        with atomic_file(path) as tmp:
            tmp.write_text("half")
            fill()
    assert path.read_text() == "old" and _leftovers(tmp_path) == []


@pytest.mark.parametrize("helper", ["file", "dir"])
def test_a_bare_writer_error_on_a_full_disk_is_taken_for_the_full_disk(tmp_path, monkeypatch,
                                                                        helper):
    """torch.save reports a full disk as a RuntimeError without a code (tests/faults/test_disk.py
    fills a real one); with space left the same error is a bug and is raised as it is."""
    target = tmp_path / "checkpoint"

    def write():
        with (atomic_file(target) if helper == "file" else atomic_dir(target)) as _:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576")

    with pytest.raises(RuntimeError, match="unexpected pos"):
        write()
    monkeypatch.setattr(atomic, "_space_left", lambda folder: atomic.FULL_BELOW - 1)
    with pytest.raises(InputError, match=rf"^cannot write {target}: No space left on device; "):
        write()
    with pytest.raises(InputError, match="^a writer's own one line$"):   # not relabelled
        with atomic_file(target) as _:
            raise InputError("a writer's own one line")
    assert _leftovers(tmp_path) == []


def test_a_writer_librarys_other_errors_are_not_dressed_as_a_write_failure(tmp_path):
    from safetensors import SafetensorError

    with pytest.raises(SafetensorError, match="header too large"):
        with atomic_file(tmp_path / "x.safetensors") as _:
            raise SafetensorError("Error while deserializing header: header too large")
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("code, fix", [(errno.EROFS, "use a writable folder"),
                                       (errno.EACCES, "make it writable"),
                                       (errno.EDQUOT, "free space (quota)")])
def test_a_folder_that_refuses_new_files_is_one_line(tmp_path, monkeypatch, code, fix):
    path = tmp_path / "report.md"
    path.write_text("old")
    monkeypatch.setattr(atomic.tempfile, "mkstemp", _fail(code))
    with pytest.raises(InputError, match=rf"cannot write {path}: .*; {re.escape(fix)} and rerun"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"


def test_a_folder_write_that_fails_keeps_the_previous_folder_whole(tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "a.txt").write_text("old")
    with pytest.raises(InputError, match="No space left on device; free space"):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("new")
            _fail(errno.ENOSPC)()
    assert [p.name for p in out.iterdir()] == ["a.txt"] and (out / "a.txt").read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_another_os_error_is_not_dressed_as_a_write_failure(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_file(tmp_path / "x") as _:
            open(tmp_path / "missing-input")


def test_a_full_disk_under_a_cli_verb_is_one_line_and_the_old_output_stays(tmp_path, monkeypatch):
    """``rankscope plot`` redraws a committed figure; the disk fills at the write's fsync."""
    csv = tmp_path / "fig.csv"
    shutil.copy(ROOT / "figures" / "controls" / "planted_loss_vs_rank.csv", csv)
    png = tmp_path / "fig.png"
    assert CliRunner().invoke(main, ["plot", str(csv), "--out", str(png)]).exit_code == 0
    before = png.read_bytes()
    monkeypatch.setattr(atomic.os, "fsync", _fail(errno.ENOSPC))
    res = CliRunner().invoke(main, ["plot", str(csv), "--out", str(png)])
    assert_one_line_error(res, f"cannot write {png}: No space left on device; free space")
    assert png.read_bytes() == before and _leftovers(tmp_path) == []


def test_an_os_error_outside_the_write_helpers_is_one_line_not_a_traceback(tmp_path, monkeypatch):
    csv = tmp_path / "fig.csv"
    shutil.copy(ROOT / "figures" / "controls" / "planted_loss_vs_rank.csv", csv)
    monkeypatch.setattr("pandas.read_csv", _fail(errno.EIO))
    res = CliRunner().invoke(main, ["plot", str(csv), "--out", str(tmp_path / "x.png")])
    assert_one_line_error(res, "Input/output error")


KILLED_WRITE = """
import sys
from pathlib import Path
from rankscope.store.atomic import atomic_dir, atomic_write_text
target = Path(sys.argv[1])
if sys.argv[2] == "file":
    atomic_write_text(target, "new")
else:
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("new")
"""


@pytest.mark.parametrize("kind, point, phase", [("file", 1, "before"), ("file", 2, "renaming"),
                                                ("folder", 2, "renaming"),
                                                ("folder", 3, "between renames")])
def test_a_write_killed_at_each_point_is_undone_by_the_next_write(tmp_path, kind, point, phase):
    """SIGKILL at each kill point of the helpers; the next write of the same target finds the
    previous state whole (put back from its set-aside copy when needed) and leaves nothing."""
    import subprocess
    import sys

    from rankscope.store.atomic import FAULT_KILL_ENV, FAULT_LOG_ENV

    target = tmp_path / ("t.txt" if kind == "file" else "t")
    if kind == "file":
        target.write_text("old")
    else:
        target.mkdir()
        (target / "a.txt").write_text("old")
    log = tmp_path / "points.log"
    env = {**os.environ, FAULT_KILL_ENV: str(point), FAULT_LOG_ENV: str(log)}
    done = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(target), kind], env=env)
    assert done.returncode == -9 and log.read_text().splitlines()[-1].split(" ", 1)[1].startswith(phase)
    old = (target if kind == "file" else target / "a.txt")
    if phase == "between renames":
        assert not target.exists()                       # set aside, the new one not yet in
        atomic.remove_stale(target)
        assert (target / "a.txt").read_text() == "old"  # the previous folder, back whole
    else:
        assert old.read_text() == "old"
    if kind == "file":
        atomic_write_text(target, "next")
    else:
        with atomic_dir(target, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("next")
    assert old.read_text() == "next" and _leftovers(tmp_path) == []


def test_a_live_writers_temporary_is_left_alone(tmp_path):
    live = tmp_path / f".t.txt.{os.getpid()}.abc.tmp"
    live.write_text("in progress")
    atomic_write_text(tmp_path / "t.txt", "x")
    assert live.exists()


def test_a_file_written_anew_by_its_writer_gets_the_usual_permissions(tmp_path):
    """safetensors' save_file recreates its path 0600; the published file is 0666 & ~umask."""
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "u.safetensors"
    with atomic_file(path) as tmp:
        save_file({"a": torch.zeros(2)}, tmp)
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_an_unwritable_output_folder_is_named_with_the_folder_that_refuses(tmp_path, monkeypatch):
    study = tmp_path / "study"
    study.mkdir()
    out = study / "runs-results" / "compare"
    real_access = os.access
    monkeypatch.setattr(atomic.os, "access",      # a read-only study, even for root
                        lambda p, mode: False if Path(p) == study else real_access(p, mode))
    with pytest.raises(InputError) as refused:
        atomic.check_out_dir(out, overwrite=True)
    assert str(refused.value) == f"output folder {out} cannot be written: {study} is not writable"
    assert not out.parent.exists()
