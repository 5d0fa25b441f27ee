"""Atomic file and folder writes: nothing half-written is ever left under its final name."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
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
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_error(path, e) from None
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())     # mkstemp's 0600 would hide reports from others
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            raise write_error(path, e) from None
        raise


# the errors of a write that the user fixes outside rankscope: space, quota, permissions, media
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def write_error(path: Path, e: OSError) -> InputError:
    """One line for a failed write: the path, the OS's reason, the fix, and that nothing of
    the previous state was touched."""
    fix = {errno.ENOSPC: "free space", errno.EDQUOT: "free space (quota)",
           errno.EROFS: "use a writable folder", errno.EIO: "check the disk"}.get(
        e.errno, "make it writable")
    return InputError(f"cannot write {path}: {e.strerror or e}; {fix} and rerun "
                      f"(what was there before is unchanged)")


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
        raise InputError(f"output folder {existing} is not writable")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` in one rename.

    On any exception the temporary folder is removed and ``out`` is left as it was.
    """
    out = check_out_dir(out, overwrite=overwrite)
    try:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create output folder {out.absolute().parent}: {e.strerror}") from None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp",
                                    dir=out.absolute().parent))
    except OSError as e:
        raise write_error(out, e) from None
    make_public(tmp)
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            raise write_error(out, e) from None
        raise
