"""Task data: shipped corpora and user files, encoded as fixed-width token tensors.

Shipped tasks (read from installed packages, never downloaded):

* ``news`` (lm): gensim's ``lee_background.cor``, 300 news paragraphs, one per line.
* ``qa`` (sft): chatterbot-corpus English conversations; every consecutive utterance pair
  ``(u[i], u[i+1])`` is a (prompt, response), as chatterbot itself reads a conversation. Exact
  duplicate pairs are dropped (``tech_support.yml`` repeats 10 pairs ~100 times each), so no
  pair can sit in both train and eval.
* ``sentiment`` (cls): gensim's ``pang_lee_polarity.cor`` (cp1252), 200 sentences written as
  ``__label__neg <text>`` / ``__label__pos <text>`` (fastText form).
* ``topic`` (cls): each chatterbot-corpus English conversation's first utterance, labelled by its
  file stem; duplicates and questions found under two topics are dropped.

User files, UTF-8, format by suffix: ``.jsonl``/``.json`` one JSON object per line; ``.csv`` a
header row naming the fields; ``.txt`` (kind ``lm`` only) paragraphs separated by blank lines,
or one per non-empty line if there are none.
Fields (others are ignored; rows count from 1, CSV rows after the header):

* ``lm``: ``text``;  ``sft``: ``prompt``, ``response``;  ``cls``: ``text``, ``label``.
* A label is a string or an integer; class ids follow the sorted label names (numeric sort
  when every label is an integer).

Encoding (``prepare_task``), rows right-padded with the pad token (eos if there is none):
lm texts are joined with EOS and cut into ``max_len`` blocks, labels = input_ids (the model
shifts); sft uses the chat template (user = prompt, assistant = response) or
``"Question: ...\\nAnswer: ..."`` and labels only the response and its end-of-turn token; cls
truncates each text to ``max_len`` and labels it with a class id.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import yaml

from rankscope.errors import InputError

KINDS = ("lm", "sft", "cls")
IGNORE_INDEX = -100
FIELDS = {"lm": ("text",), "sft": ("prompt", "response"), "cls": ("text", "label")}
_SUFFIXES = (".jsonl", ".json", ".csv", ".txt")


@dataclass(frozen=True)
class TaskSpec:
    """A shipped task: name, kind (lm/sft/cls), default model name, description, eval metric."""

    name: str
    kind: str
    default_model: str
    description: str
    metric: str
    default_targets: tuple[str, ...] = ("q_proj", "v_proj")   # the default model's Wq, Wv


TASKS: dict[str, TaskSpec] = {s.name: s for s in (
    TaskSpec("news", "lm", "smollm2-135m", "Lee news paragraphs (gensim), causal-LM adaptation", "loss"),
    TaskSpec("qa", "sft", "smollm2-135m", "chatterbot-corpus English utterance -> reply pairs", "loss"),
    TaskSpec("sentiment", "cls", "minilm-l6", "Pang & Lee movie-review polarity (gensim), 2 classes",
             "accuracy", ("query", "value")),
    TaskSpec("topic", "cls", "minilm-l6", "chatterbot-corpus English questions labelled by topic",
             "accuracy", ("query", "value")),
)}


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no truth value to compare by
class TaskData:
    """Encoded train/eval tensors of one task and split, with their provenance hashes."""

    kind: str
    train: dict[str, torch.Tensor]
    eval: dict[str, torch.Tensor]
    num_labels: int | None
    label_names: tuple[str, ...] | None
    data_hash: str
    split_hash: str
    n_train_examples: int
    n_eval_examples: int
    n_train_tokens: int


# ---------------------------------------------------------------- shipped tasks
def _gensim_file(name: str) -> Path:
    from gensim.test.utils import datapath  # gensim ships these corpora as its test data
    return Path(datapath(name))


def _chatterbot():
    """Yield (file stem, conversation) for every English chatterbot-corpus file, sorted by file."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None:
        raise InputError("package chatterbot-corpus is not installed; tasks qa and topic need it")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for path in sorted((Path(spec.submodule_search_locations[0]) / "data" / "english").glob("*.yml")):
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
        for conversation in doc.get("conversations") or []:
            yield path.stem, [str(u).strip() for u in conversation]


def _news() -> list[dict]:
    lines = _gensim_file("lee_background.cor").read_text(encoding="utf-8").split("\n")
    return [{"text": line.strip()} for line in lines if line.strip()]


def _sentiment() -> list[dict]:
    rows = []
    for line in _gensim_file("pang_lee_polarity.cor").read_text(encoding="cp1252").split("\n"):
        label, _, text = line.strip().partition(" ")
        if text:
            rows.append({"text": text.strip(), "label": label.removeprefix("__label__")})
    return rows


def _qa() -> list[dict]:
    pairs = dict.fromkeys((c[i], c[i + 1]) for _, c in _chatterbot() for i in range(len(c) - 1))
    return [{"prompt": p, "response": r} for p, r in pairs]


def _topic() -> list[dict]:
    topics: dict[str, list[str]] = {}
    for stem, conversation in _chatterbot():
        if conversation and stem not in topics.setdefault(conversation[0], []):
            topics[conversation[0]].append(stem)
    return [{"text": q, "label": s[0]} for q, s in topics.items() if len(s) == 1]


_LOADERS = {"news": _news, "qa": _qa, "sentiment": _sentiment, "topic": _topic}


# ---------------------------------------------------------------- user files
def _check_kind(kind: str | None) -> str:
    if kind not in KINDS:
        raise InputError(f"unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")
    return kind


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
    path, kind = Path(path), _check_kind(kind)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise InputError(f"{path}: unknown suffix {suffix!r}; use one of {', '.join(_SUFFIXES)}")
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


# ---------------------------------------------------------------- examples and splits
def load_examples(task: str | None = None, *, data_file: str | Path | None = None,
                  kind: str | None = None) -> tuple[list[dict], str]:
    """Load the raw examples of a shipped task or of a user file.

    Args:
        task: a name in ``TASKS``, or None with ``data_file`` (which then needs ``kind``).
        kind: the user file's kind; for a task, None or the task's own kind.
    Returns:
        (examples, kind): dicts with the kind's fields, and "lm", "sft" or "cls".
    Raises:
        InputError: not exactly one source, unknown task or kind, a kind that contradicts
            the task, or a bad user file.
    """
    if (task is None) == (data_file is None):
        raise InputError("give exactly one of a task name or a data file")
    if data_file is not None:
        if kind is None:
            raise InputError(f"{data_file}: a data file needs a kind, one of {', '.join(KINDS)}")
        return load_user_file(data_file, kind=kind), kind
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    if kind is not None and _check_kind(kind) != TASKS[task].kind:
        raise InputError(f"task {task!r} has kind {TASKS[task].kind!r}, not {kind!r}")
    return _LOADERS[task](), TASKS[task].kind


def data_hash(examples: list[dict]) -> str:
    """sha256 hex digest of the examples as canonical JSON (sorted keys); order-sensitive."""
    text = json.dumps(examples, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_examples(examples: list, *, seed: int, eval_fraction: float = 0.1, min_eval: int = 8,
                   min_train: int = 8) -> tuple[list, list]:
    """Shuffle with ``numpy.random.default_rng(seed)`` and hold out
    ``n_eval = max(min_eval, round(n * eval_fraction))`` examples; global state is untouched.

    Args:
        examples: any list (items are not copied); eval_fraction in (0, 1).
        min_eval, min_train: the fewest examples each side may get.
    Returns:
        (train, eval): disjoint, in shuffled order, together all the examples.
    Raises:
        InputError: eval_fraction outside (0, 1), or too few examples for both sides.
    """
    if not 0 < eval_fraction < 1:
        raise InputError(f"eval_fraction must lie in (0, 1), got {eval_fraction}")
    n = len(examples)
    n_eval = max(min_eval, round(n * eval_fraction))
    if n - n_eval < min_train:
        raise InputError(f"{n} examples are too few to split: eval takes {n_eval} "
                         f"(at least {min_eval}) and train needs at least {min_train}")
    order = np.random.default_rng(seed).permutation(n)
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


# ---------------------------------------------------------------- encoding
def _special_id(tok, *names: str) -> int:
    for name in names:
        if getattr(tok, f"{name}_token_id", None) is not None:
            return getattr(tok, f"{name}_token_id")
    raise InputError(f"tokenizer {type(tok).__name__} has no {' or '.join(names)} token")


def _ids(tok, texts: list[str]) -> list[list[int]]:
    return tok(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _pad(rows: list[list[int]], value: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), max_len), value, dtype=torch.long)  # (N, L)
    mask = torch.zeros((len(rows), max_len), dtype=torch.long)  # (N, L)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row[:max_len], dtype=torch.long)
        mask[r, : len(row)] = 1
    return ids, mask


def _encode_lm(tok, examples: list[dict], max_len: int) -> dict[str, torch.Tensor]:
    end = _special_id(tok, "eos", "sep")
    stream = [i for ids in _ids(tok, [e["text"] for e in examples]) for i in (*ids, end)]
    n = len(stream) // max_len
    ids = torch.tensor(stream[: n * max_len], dtype=torch.long).view(n, max_len)  # (N, L)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _sft_texts(tok, example: dict) -> tuple[str, str]:
    """(prompt, completion) texts; the completion holds the answer and the template's tail."""
    if getattr(tok, "chat_template", None) is None:
        return f"Question: {example['prompt']}\nAnswer:", f" {example['response']}"
    user = [{"role": "user", "content": example["prompt"]}]
    prompt = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(
        [*user, {"role": "assistant", "content": example["response"]}], tokenize=False)
    if not full.startswith(prompt):
        raise InputError(f"chat template of {type(tok).__name__}: the conversation does not "
                         "start with the rendered prompt, so the answer cannot be located")
    return prompt, full[len(prompt):]


def _encode_sft(tok, examples: list[dict], max_len: int) -> dict[str, torch.Tensor]:
    """Prompt then answer ids; the answer ends at the first special token (end of turn)."""
    templated = getattr(tok, "chat_template", None) is not None
    special, end = set(tok.all_special_ids), _special_id(tok, "eos", "sep")
    texts = [_sft_texts(tok, e) for e in examples]
    rows, labels = [], []
    for p, a in zip(_ids(tok, [t[0] for t in texts]), _ids(tok, [t[1] for t in texts])):
        # the template's tail after end-of-turn (SmolLM2: "\n") is neither trained nor kept
        stop = next((k + 1 for k, i in enumerate(a) if i in special), len(a))
        a = a[:stop] if templated else [*a, end]
        if len(p) < max_len:  # else truncation would leave no answer token to learn from
            rows.append(p + a)
            labels.append([IGNORE_INDEX] * len(p) + a)
    ids, mask = _pad(rows, _special_id(tok, "pad", "eos"), max_len)
    return {"input_ids": ids, "attention_mask": mask, "labels": _pad(labels, IGNORE_INDEX, max_len)[0]}


def _encode_cls(tok, examples: list[dict], max_len: int, *, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    rows = tok([e["text"] for e in examples], truncation=True, max_length=max_len)["input_ids"]
    ids, mask = _pad(rows, _special_id(tok, "pad", "eos"), max_len)
    index = {name: k for k, name in enumerate(names)}
    return {"input_ids": ids, "attention_mask": mask,
            "labels": torch.tensor([index[e["label"]] for e in examples], dtype=torch.long)}  # (N,)


def _label_names(examples: list[dict]) -> tuple[str, ...]:
    names = {e["label"] for e in examples}
    if len(names) < 2:
        raise InputError(f"classification needs at least 2 labels, found {sorted(names)}")
    numeric = all(n.removeprefix("-").isdigit() for n in names)
    return tuple(sorted(names, key=int if numeric else str))


def _cap(data: dict[str, torch.Tensor], cap: int | None, seed: list[int]) -> dict[str, torch.Tensor]:
    """Keep the first ``cap`` rows after a seeded shuffle (all rows, in order, if no cap)."""
    n = len(data["input_ids"])
    if cap is None or cap >= n:
        return data
    if cap < 1:
        raise InputError(f"an example cap must be at least 1, got {cap}")
    keep = torch.from_numpy(np.random.default_rng(seed).permutation(n)[:cap])
    return {k: v[keep] for k, v in data.items()}


def prepare_task(task: str | None, tokenizer, *, seed: int, max_len: int,
                 data_file: str | Path | None = None, kind: str | None = None,
                 eval_fraction: float = 0.1, max_train_examples: int | None = None,
                 max_eval_examples: int | None = None) -> TaskData:
    """Load, split (on raw examples, seeded), encode and cap a task's data.

    Args:
        task, data_file, kind: the source, as in ``load_examples``.
        tokenizer: a Hugging Face tokenizer (not modified).
        seed: seeds the split and the caps' shuffles; same inputs and seed, equal tensors.
        max_len: L, the width of every row (the block length for lm).
        max_train_examples, max_eval_examples: rows (blocks for lm) kept after a seeded
            shuffle; None keeps all. sft rows whose prompt fills max_len are dropped first.
    Returns:
        TaskData: train/eval hold input_ids, attention_mask (N, L) long and labels (N, L) long,
        -100 where ignored (lm, sft), or (N,) class ids (cls). split_hash = ``data_hash`` of
        the held-out raw examples, before any cap.
    Raises:
        InputError: bad source or file, too few examples, max_len < 2, a cap < 1, or a split
            that encodes to no rows at this max_len.
    """
    if max_len < 2:
        raise InputError(f"max_len must be at least 2, got {max_len}")
    examples, kind = load_examples(task, data_file=data_file, kind=kind)
    train, held = split_examples(examples, seed=seed, eval_fraction=eval_fraction)
    names = _label_names(examples) if kind == "cls" else None
    encode = {"lm": _encode_lm, "sft": _encode_sft, "cls": partial(_encode_cls, names=names)}[kind]
    parts = {}
    sides = (("train", train, max_train_examples), ("eval", held, max_eval_examples))
    for salt, (side, rows, cap) in enumerate(sides, 1):  # salt: the caps' streams differ
        parts[side] = _cap(encode(tokenizer, rows, max_len), cap, [seed, salt])
        if len(parts[side]["input_ids"]) == 0:
            raise InputError(f"{task or data_file}: the {side} split encodes to no rows at max_len {max_len}")
    tr, ev = parts["train"], parts["eval"]
    counted = tr["attention_mask"] if kind == "cls" else tr["labels"] != IGNORE_INDEX
    return TaskData(kind=kind, train=tr, eval=ev, num_labels=len(names) if names else None,
                    label_names=names, data_hash=data_hash(examples), split_hash=data_hash(held),
                    n_train_examples=len(tr["input_ids"]), n_eval_examples=len(ev["input_ids"]),
                    n_train_tokens=int(counted.sum()))
