"""One writer per study folder: a second process is refused in one line, and a killed holder
leaves nothing that blocks the rerun."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from rankscope.errors import InputError
from rankscope.store.lock import LOCK_FILE, folder_lock

HOLD = ("import sys, time\nfrom rankscope.store.lock import folder_lock\n"
        "with folder_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n")


def _holder(folder):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_folder_held_by_another_process_is_refused_naming_it(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(InputError, match=rf"^sweep folder {tmp_path} is in use by process "
                                             rf"{proc.pid} on .* \(since .*\); wait for it"):
            with folder_lock(tmp_path):
                pass
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_leaves_no_lock_behind(tmp_path):
    proc = _holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / LOCK_FILE).exists()          # the file stays; the kernel dropped the lock
    with folder_lock(tmp_path):
        assert f'"pid": {os.getpid()}' in (tmp_path / LOCK_FILE).read_text()


def test_the_lock_is_released_when_its_body_ends_or_raises(tmp_path):
    with pytest.raises(RuntimeError):
        with folder_lock(tmp_path):
            raise RuntimeError("a failed stage")
    t0 = time.monotonic()
    with folder_lock(tmp_path):
        pass
    assert time.monotonic() - t0 < 1


def test_a_lock_that_cannot_be_created_is_one_line(tmp_path):
    with pytest.raises(InputError, match=r"cannot create the lock .*: No such file or directory"):
        with folder_lock(tmp_path / "missing"):
            pass
