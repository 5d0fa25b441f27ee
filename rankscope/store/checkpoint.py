"""A model folder's safetensors checkpoint, read one tensor at a time.

Two layouts, as transformers saves them (and looks for them, in this order):
    * ``model.safetensors``: every tensor in one file;
    * ``model.safetensors.index.json`` + shards: the index's ``weight_map`` names, for each
      tensor key, the shard file (in the same folder) that holds it.
Only the files' headers are read up front (keys, shapes, dtypes); a tensor is read when it is
asked for, from a memory map of its file that is closed again before the next read. A map kept
open would keep every page read through it resident, so a walk over all keys would end holding
the whole checkpoint in memory; opened per read, the process holds the tensors it keeps alive.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from rankscope.errors import InputError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_READ_ERRORS = (SafetensorError, OSError, RuntimeError, ValueError)


def has_safetensors(folder: str | Path) -> bool:
    """Whether a model folder holds a safetensors checkpoint (single file or sharded index)."""
    folder = Path(folder)
    return (folder / SINGLE).is_file() or (folder / INDEX).is_file()


def shard_map(folder: str | Path) -> dict[str, Path]:
    """Each tensor key of a model folder's safetensors checkpoint → the file that holds it.

    Args:
        folder: a model folder with ``model.safetensors`` or ``model.safetensors.index.json``.
    Returns:
        ``{key: file}``; for a single file, only its keys are read (its header), for an index
        the keys come from its ``weight_map``.
    Raises:
        InputError: no safetensors checkpoint in ``folder``; an index that is not valid JSON
            or has no ``weight_map`` of key → file name; a shard it names that is missing; a
            corrupt or truncated single file.
    """
    folder = Path(folder)
    if (folder / SINGLE).is_file():
        with _open(folder / SINGLE) as f:
            return {key: folder / SINGLE for key in f.keys()}
    index = folder / INDEX
    if not index.is_file():
        raise InputError(f"model folder {folder} has no {SINGLE} or {INDEX}")
    try:
        doc = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"corrupt safetensors index {index}: {e}") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise InputError(f"corrupt safetensors index {index}: no weight_map of tensor → shard file")
    shards = {name: folder / name for name in set(weight_map.values())}
    for name, path in sorted(shards.items()):
        if Path(name).name != name:
            raise InputError(f"corrupt safetensors index {index}: shard {name!r} is not a file "
                             "name in its folder")
        if not path.is_file():
            raise InputError(f"missing shard {path} named by {index}")
    return {key: shards[name] for key, name in weight_map.items()}


def _open(path: Path):
    """``safe_open`` on ``path`` (a memory map, closed on leaving the ``with``), errors as one line."""
    try:
        return safe_open(str(path), framework="pt")
    except _READ_ERRORS as e:
        raise InputError(f"corrupt or truncated safetensors file {path} ({e})") from None


class Checkpoint(Mapping):
    """The tensors of a model folder's safetensors checkpoint, each read when asked for.

    ``checkpoint[key]`` reads one tensor, in the dtype it is stored in; ``shape(key)`` and
    ``dtype(key)`` come from the headers without reading any data. Every file's header is
    read (and so checked) on construction; no file stays open between reads.

    Raises:
        InputError: see ``shard_map``; a corrupt or truncated shard; a shard that lacks a key
            its index places there.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        by_file: dict[Path, list[str]] = {}
        for key, path in shard_map(self.folder).items():
            by_file.setdefault(path, []).append(key)
        self.files = sorted(by_file)
        self._where: dict[str, Path] = {}
        self._info: dict[str, tuple[tuple[int, ...], str]] = {}
        for path in self.files:
            wanted = by_file[path]
            with _open(path) as f:
                held = set(f.keys())
                for key in wanted:
                    if key not in held:
                        raise InputError(f"shard {path} lacks tensor {key}, which "
                                         f"{self.folder / INDEX} places there")
                    s = f.get_slice(key)
                    self._info[key] = (tuple(s.get_shape()), s.get_dtype())
                    self._where[key] = path

    def shape(self, key: str) -> tuple[int, ...]:
        """The stored shape of tensor ``key`` (from its file's header)."""
        return self._info[key][0]

    def dtype(self, key: str) -> str:
        """The stored dtype of tensor ``key`` as safetensors names it ("F32", "BF16", …)."""
        return self._info[key][1]

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise KeyError(key)
        path = self._where[key]
        try:
            with _open(path) as f:
                return f.get_tensor(key)
        except _READ_ERRORS as e:
            raise InputError(f"corrupt or truncated safetensors file {path} ({e})") from None

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)
