"""Atomic file and folder writes: nothing half-written is ever left under its final name."""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Iterator

from rankscope.errors import InputError


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is synced and renamed to ``path``.

    The one way rankscope writes a file: whatever writes the temporary path (text, JSON, a
    PNG, safetensors), a reader sees the old file or the whole new one, never a part. On any
    exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    fault_point(path, "before")
    remove_stale(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_error(path, e.errno) from None
    os.close(fd)
    try:
        yield Path(tmp)
        # after the writer, not before: mkstemp's 0600 would hide reports from others, and a
        # writer may create the file anew (safetensors' save_file leaves it 0600 too)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        fault_point(path, "renaming")
        os.replace(tmp, path)
    except BaseException as e:
        code = write_errno(e, path.parent)      # before the temporary goes and frees the disk
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if code in WRITE_ERRNOS:
            raise write_error(path, code) from None
        raise


# The fault suite's kill points (tests/faults): every write passes through the two helpers
# above, so a process killed at their n-th point is a process killed at any moment that
# matters to what is on disk. Unset (always, outside that suite) they cost one dict lookup.
FAULT_LOG_ENV = "RANKSCOPE_FAULT_LOG"       # append "<n> <phase> <path>" for each point reached
FAULT_KILL_ENV = "RANKSCOPE_FAULT_KILL_AT"  # SIGKILL this process at point n (1-based)
_fault_points = 0


def fault_point(path: Path, phase: str) -> None:
    """Count a kill point; log it, or SIGKILL the process there, when the fault suite asks."""
    global _fault_points
    log, kill = os.environ.get(FAULT_LOG_ENV), os.environ.get(FAULT_KILL_ENV)
    if not (log or kill):
        return
    _fault_points += 1
    if log:
        with open(log, "a") as f:
            f.write(f"{_fault_points} {phase} {path}\n")
    if kill and int(kill) == _fault_points:
        os.kill(os.getpid(), signal.SIGKILL)


# the errors of a write that the user fixes outside rankscope: space, quota, permissions, media
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


# Writer libraries report a full disk their own way. safetensors' Rust ``save_file`` raises
# SafetensorError "... I/O error: No space left on device (os error 28)": the code is read out of
# the message. torch.save raises a bare RuntimeError ("[enforce fail at inline_container.cc]
# unexpected pos ..."): a failure while the file system has under FULL_BELOW bytes left is
# taken for a full disk (measured on a 64 KB and a 40 MB tmpfs).
_WRAPPED_OS_ERROR = re.compile(r"\(os error (\d+)\)")
FULL_BELOW = 1 << 20


def write_errno(e: BaseException, folder: Path | None = None) -> int | None:
    """The OS error code behind a failed write into ``folder``: raised by Python, wrapped by a
    writer library, or ENOSPC when the folder's file system is full; None for anything else
    (an interrupt, a bug)."""
    if isinstance(e, OSError):
        return e.errno
    if not isinstance(e, Exception) or isinstance(e, InputError):   # rankscope's own line stays
        return None
    found = _WRAPPED_OS_ERROR.search(str(e))
    if found:
        return int(found.group(1))
    return errno.ENOSPC if folder is not None and _space_left(folder) < FULL_BELOW else None


def _space_left(folder: Path) -> int:
    try:
        st = os.statvfs(folder)
    except OSError:
        return FULL_BELOW          # unknown: not taken for full
    return st.f_bavail * st.f_frsize


def write_error(path: Path, code: int) -> InputError:
    """One line for a failed write: the path, the OS's reason, the fix, and that nothing of
    the previous state was touched."""
    fix = {errno.ENOSPC: "free space", errno.EDQUOT: "free space (quota)",
           errno.EROFS: "use a writable folder", errno.EIO: "check the disk"}.get(
        code, "make it writable")
    reason = os.strerror(code) if code else "the write failed"
    return InputError(f"cannot write {path}: {reason}; {fix} and rerun "
                      f"(what was there before is unchanged)")


def _prefix(path: Path) -> str:
    """A temporary's name starts with its target's and its writer's pid: ``remove_stale`` can
    tell a dead writer's leftover from a live one's work in progress."""
    return f".{path.name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                 # someone else's process: alive
        return True
    return True


def remove_stale(path: Path) -> None:
    """Undo what a writer of ``path`` killed mid-write left beside it.

    A temporary (file or folder) of a process that no longer runs is removed. A folder set aside
    by ``atomic_dir`` (``.<name>.old``) while its replacement was renamed in is put back when the
    kill came between the two renames (``path`` is missing), else removed. A live process's
    temporary is left alone.
    """
    path = Path(path)
    parent = path.absolute().parent
    if not parent.is_dir():
        return
    for p in parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = p.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    aside = parent / f".{path.name}.old"
    if aside.is_dir():
        if not path.exists():
            os.replace(aside, path)         # the previous folder, whole: the state before
        else:
            shutil.rmtree(aside, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (``atomic_file``)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (``atomic_file``)."""
    atomic_write_bytes(path, text.encode())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_public(path: str | Path) -> None:
    """Give a file or folder made by mkstemp/mkdtemp (0600/0700) the usual umask permissions."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~_umask())


def atomic_write_json(path: str | Path, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def check_out_dir(out: str | Path, *, overwrite: bool) -> Path:
    """Refuse an output folder that exists with other content unless ``overwrite``.

    Raises:
        InputError: ``out`` is a file, or a non-empty folder and ``overwrite`` is false, or
            its parent cannot be created or written.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"output folder {out} exists with other content (use --overwrite)")
    parent = out.absolute().parent
    existing = parent
    while not existing.exists():            # the folders are made only when the result is ready
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"cannot create output folder {parent}: {existing} is not a folder")
    if not os.access(existing, os.W_OK):
        raise InputError(f"output folder {out} cannot be written: {existing} is not writable")
    return out


def check_out_apart(out: str | Path, inputs) -> None:
    """Refuse an output folder that is or holds one of ``inputs`` (paths or None): replacing it
    would delete the input.

    Raises:
        InputError: naming the output folder and the input.
    """
    target = Path(out).expanduser().resolve()
    for given in inputs:
        path = Path(str(given)).expanduser() if given is not None else None
        if path is not None and path.exists():
            path = path.resolve()
            if path == target or target in path.parents:
                raise InputError(f"output folder {out} is or holds the input {given}; "
                                 "choose another --out")


@contextlib.contextmanager
def atomic_dir(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` in one rename.

    On any exception the temporary folder is removed and ``out`` is left as it was.
    """
    out = Path(out)
    remove_stale(out)                       # first: a killed rename may have set ``out`` aside
    out = check_out_dir(out, overwrite=overwrite)
    fault_point(out, "before")
    try:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create output folder {out.absolute().parent}: {e.strerror}") from None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_prefix(out), suffix=".tmp", dir=out.absolute().parent))
    except OSError as e:
        raise write_error(out, e.errno) from None
    make_public(tmp)
    try:
        yield tmp
        fault_point(out, "renaming")
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            fault_point(out, "between renames")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as e:
        code = write_errno(e, out.absolute().parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if code in WRITE_ERRNOS:
            raise write_error(out, code) from None
        raise
