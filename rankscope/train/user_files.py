"""The user's own data files, read into the examples of a kind (lm, sft or cls).

UTF-8, format by suffix: ``.jsonl``/``.json`` one JSON object per line; ``.csv`` a header row
naming the fields; ``.txt`` (kind ``lm`` only) paragraphs separated by blank lines, or one per
non-empty line if there are none. Fields (others are ignored; rows count from 1, CSV rows
after the header):

* ``lm``: ``text``;  ``sft``: ``prompt``, ``response``;  ``cls``: ``text``, ``label``.
* A label is a string or an integer; class ids follow the sorted label names (numeric sort
  when every label is an integer).
"""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from rankscope.errors import InputError
from rankscope.train.corpora import FIELDS, check_kind

SUFFIXES = (".jsonl", ".json", ".csv", ".txt")


def load_user_file(path: str | Path, *, kind: str) -> list[dict]:
    """Read a user's JSONL, CSV or text file into examples (schemas in the module docstring).

    Args:
        path: the file; its suffix (.jsonl, .json, .csv, .txt) picks the format.
        kind: "lm", "sft" or "cls"; picks the required fields.
    Returns:
        One dict per example holding exactly the kind's fields (labels as strings).
    Raises:
        InputError: unknown kind or suffix; missing, unreadable or non-UTF-8 file; no examples;
            a row lacking a required field (named with its row number).
    """
    path, kind = Path(path), check_kind(kind)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(f"{path}: unknown suffix {suffix!r}; use one of {', '.join(SUFFIXES)}")
    if suffix == ".txt" and kind != "lm":
        raise InputError(f"{path}: plain text holds kind 'lm' only, not {kind!r}; use .jsonl or .csv")
    text = _read_text(path)
    if suffix == ".txt":
        rows = [(n, {"text": p}) for n, p in enumerate(_paragraphs(text), 1)]
    else:
        rows = _csv_rows(path, text) if suffix == ".csv" else _json_rows(path, text)
    if not rows:
        raise InputError(f"{path}: no examples in the file")
    return [_check_row(path, n, row, kind) for n, row in rows]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read the file ({e.strerror or e})") from None


def _json_rows(path: Path, text: str) -> list[tuple[int, object]]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise InputError(f"{path}: row {n} is not valid JSON ({e.msg})") from None
    return rows


def _csv_rows(path: Path, text: str) -> list[tuple[int, object]]:
    try:
        return list(enumerate(csv.DictReader(io.StringIO(text, newline="")), 1))
    except csv.Error as e:
        raise InputError(f"{path}: malformed CSV ({e})") from None


def _paragraphs(text: str) -> list[str]:
    blocks = [b.strip() for b in re.split(r"\n\s*\n", text.strip())]
    if len(blocks) == 1:  # no blank line: one paragraph per line, as in lee_background.cor
        return [line.strip() for line in text.splitlines() if line.strip()]
    return [b for b in blocks if b]


def _check_row(path: Path, n: int, row: object, kind: str) -> dict:
    if not isinstance(row, dict):
        raise InputError(f"{path}: row {n} is not an object with fields {', '.join(FIELDS[kind])}")
    out = {}
    for field in FIELDS[kind]:
        value = row.get(field)
        if value is None:
            raise InputError(f"{path}: row {n} is missing field {field!r}")
        if field == "label" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{path}: row {n} field {field!r} is not a non-empty string: {value!r:.40}")
        out[field] = value.strip() if field == "label" else value
    return out
