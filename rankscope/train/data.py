"""A task's data: raw examples (shipped or the user's), the seeded split, and the encoded tensors.

The sources are ``rankscope.train.corpora`` (shipped tasks) and ``rankscope.train.user_files``;
the tensors are ``rankscope.train.encoding``'s. ``prepare`` gives the data a sweep trains and
evaluates on, checked against its model: every run of the sweep, ``recommend --validate`` and
the truncation test rebuild the same split from the same config.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from rankscope.errors import InputError
from rankscope.train.corpora import DISTILL, KINDS, TASKS, check_kind, shipped_examples
from rankscope.train.encoding import IGNORE_INDEX, cap_rows, encode, label_names
from rankscope.train.model_setup import load_task_model
from rankscope.train.models import quiet_transformers, resolve_model
from rankscope.train.planted import DistillSplit, Teacher, add_planted, planted_factors, \
    planted_ranks
from rankscope.train.user_files import load_user_file


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no truth value to compare by
class TaskData:
    """Encoded train/eval tensors of one task and split, with their provenance hashes.

    The planted task's sides are ``DistillSplit``s, which carry its teacher; ``planted_hash``
    names the teacher's ΔW* (``tensor_hash`` of its factors), None for any other task.
    """

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
    planted_hash: str | None = None

    @property
    def teacher(self):
        """The planted task's Teacher, else None."""
        return getattr(self.train, "teacher", None)


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
    if task in TASKS and kind is not None and check_kind(kind) != TASKS[task].kind:
        raise InputError(f"task {task!r} has kind {TASKS[task].kind!r}, not {kind!r}")
    return shipped_examples(task), TASKS[task].kind


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
    names = label_names(examples) if kind == "cls" else None
    parts = {}
    sides = (("train", train, max_train_examples), ("eval", held, max_eval_examples))
    for salt, (side, rows, cap) in enumerate(sides, 1):  # salt: the caps' streams differ
        encoded = encode(kind, tokenizer, rows, max_len=max_len, names=names)
        parts[side] = cap_rows(encoded, cap, [seed, salt])
        if len(parts[side]["input_ids"]) == 0:
            raise InputError(f"{task or data_file}: the {side} split encodes to no rows at max_len {max_len}")
    tr, ev = parts["train"], parts["eval"]
    counted = tr["attention_mask"] if kind in ("cls", DISTILL) else tr["labels"] != IGNORE_INDEX
    return TaskData(kind=kind, train=tr, eval=ev, num_labels=len(names) if names else None,
                    label_names=names, data_hash=data_hash(examples), split_hash=data_hash(held),
                    n_train_examples=len(tr["input_ids"]), n_eval_examples=len(ev["input_ids"]),
                    n_train_tokens=int(counted.sum()))


def build_teacher(cfg) -> Teacher:
    """The teacher of a planted sweep: its base model plus ΔW* on the LoRA targets
    (``rankscope.train.planted``), drawn from the config alone.

    Args:
        cfg: the SweepConfig (model, targets, planted_rank, planted_scale, planted_seed).
    Raises:
        InputError: a model that cannot be loaded, or a planted_rank it cannot hold.
    """
    model = load_task_model(cfg, kind=DISTILL, num_labels=None)
    ranks = planted_ranks(model, cfg.targets, cfg.planted_rank)
    factors = planted_factors(model, ranks, scale=cfg.planted_scale, seed=cfg.planted_seed)
    add_planted(model, factors)
    meta = {"planted_rank": cfg.planted_rank, "planted_scale": cfg.planted_scale,
            "planted_seed": cfg.planted_seed}
    return Teacher(model, factors, meta=meta)


def load_tokenizer(model: str):
    """The tokenizer of a registry name, local folder or hub id (pad = eos if it has none)."""
    from transformers import AutoTokenizer

    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(resolve_model(model))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def prepare(cfg) -> TaskData:
    """A sweep's data, validated against its model: one split shared by every run.

    Args:
        cfg: the sweep's SweepConfig (model, task or data file, split seed, sizes).

    Raises:
        InputError: sequences longer than the model has positions for, or data that fails
            its task's schema (see ``prepare_task``).
    """
    from transformers import AutoConfig

    with quiet_transformers():
        positions = getattr(AutoConfig.from_pretrained(resolve_model(cfg.model)),
                            "max_position_embeddings", None)
    if isinstance(positions, int) and cfg.max_len > positions:
        raise InputError(f"max_len {cfg.max_len} is longer than the {positions} positions of "
                         f"{cfg.model}")
    task = prepare_task(cfg.task, load_tokenizer(cfg.model), seed=cfg.split_seed,
                        max_len=cfg.max_len, data_file=cfg.data, kind=cfg.task_kind,
                        eval_fraction=cfg.eval_fraction,
                        max_train_examples=cfg.max_train_examples,
                        max_eval_examples=cfg.max_eval_examples)
    if task.kind != DISTILL:
        return task
    teacher = build_teacher(cfg)
    return replace(task, train=DistillSplit(task.train, teacher),
                   eval=DistillSplit(task.eval, teacher), planted_hash=teacher.hash)
