"""One writer per study folder: an advisory lock that a killed holder cannot leave behind.

Two ``rankscope sweep`` (or ``run``) processes started on one folder would both train the
first unfinished run and write it twice. The first to start holds ``<folder>/.rankscope.lock``
(``fcntl.flock``, exclusive); a second refuses in one line naming the holder. The kernel drops
a flock when its holder exits for any reason, ``kill -9`` included, so a lock never outlives its
process and a rerun after a crash simply takes it: no stale-lock timeout to guess.

The file itself stays (deleting a flocked file lets a third process lock a new inode of the same
name while the second still holds the old one); it holds the holder's pid, host and start time,
for the message only.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from rankscope.errors import InputError

LOCK_FILE = ".rankscope.lock"


@contextlib.contextmanager
def folder_lock(folder: str | Path, *, what: str = "sweep", wait: bool = False) -> Iterator[None]:
    """Hold ``folder``'s lock for the body; the folder must exist. With ``wait``, wait for
    another holder to release it instead of refusing (shards of one sweep share its set-up).

    Raises:
        InputError: another live process holds the lock (its pid and host are named), or the
            lock file cannot be created.
    """
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise InputError(f"cannot create the lock {path}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise InputError(f"{what} folder {Path(folder)} is in use by {_holder(path)}; wait for "
                             "it to finish or stop it, then rerun (finished runs are kept)") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        yield
    finally:
        os.close(fd)                        # closing the descriptor releases the flock


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold a run folder's own lock (a flock on the folder itself: no file is added to it), so
    that two processes sharing a sweep folder (its shards) never train one run.

    Raises:
        InputError: another live process is training this run.
    """
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"run {Path(run_dir)} is being trained by another process (two "
                             "shards given the same slice?); wait for it, then rerun") from None
        yield
    finally:
        os.close(fd)


def _holder(path: Path) -> str:
    """'process 123 on host h (since …)' from the lock file, or 'another process'."""
    try:
        info = json.loads(path.read_text() or "{}")
        return f"process {info['pid']} on {info['host']} (since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
