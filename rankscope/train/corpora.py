"""The shipped tasks: their specs, and their examples read from installed packages (never downloaded).

* ``news`` (lm): gensim's ``lee_background.cor``, 300 news paragraphs, one per line.
* ``qa`` (sft): chatterbot-corpus English conversations; every consecutive utterance pair
  ``(u[i], u[i+1])`` is a (prompt, response), as chatterbot itself reads a conversation. Exact
  duplicate pairs are dropped (``tech_support.yml`` repeats 10 pairs ~100 times each), so no
  pair can sit in both train and eval.
* ``sentiment`` (cls): gensim's ``pang_lee_polarity.cor`` (cp1252), 200 sentences written as
  ``__label__neg <text>`` / ``__label__pos <text>`` (fastText form).
* ``topic`` (cls): each chatterbot-corpus English conversation's first utterance, labelled by its
  file stem; duplicates and questions found under two topics are dropped.
* ``planted`` (distill): the ``news`` paragraphs, on which a student learns to match a teacher,
  the base model plus a planted update ΔW* of known rank (``rankscope.train.planted``).

Every kind's examples are dicts holding exactly its fields (``FIELDS``): ``lm`` ``text``;
``sft`` ``prompt``, ``response``; ``cls`` ``text``, ``label`` (a string).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import yaml

from rankscope.errors import InputError

KINDS = ("lm", "sft", "cls")          # the kinds of the user's own files
DISTILL = "distill"                   # the planted task's kind: its targets are a teacher's outputs
FIELDS = {"lm": ("text",), "sft": ("prompt", "response"), "cls": ("text", "label"),
          DISTILL: ("text",)}


@dataclass(frozen=True)
class TaskSpec:
    """A shipped task: name, kind (lm/sft/cls), default model name, description, eval metric."""

    name: str
    kind: str
    default_model: str
    description: str
    metric: str
    default_targets: tuple[str, ...] = ("q_proj", "v_proj")   # the default model's Wq, Wv
    defaults: tuple[tuple[str, object], ...] = ()             # config fields the task sets


TASKS: dict[str, TaskSpec] = {s.name: s for s in (
    TaskSpec("news", "lm", "smollm2-135m", "Lee news paragraphs (gensim), causal-LM adaptation", "loss"),
    TaskSpec("qa", "sft", "smollm2-135m", "chatterbot-corpus English utterance -> reply pairs", "loss"),
    TaskSpec("sentiment", "cls", "minilm-l6", "Pang & Lee movie-review polarity (gensim), 2 classes",
             "accuracy", ("query", "value")),
    TaskSpec("topic", "cls", "minilm-l6", "chatterbot-corpus English questions labelled by topic",
             "accuracy", ("query", "value")),
    TaskSpec("planted", DISTILL, "minilm-l6", "news paragraphs; match a teacher = base + ΔW* of "
             "a planted rank", "loss", ("query", "value"),
             # full fine-tuning at 3e-5 removes little of the distillation loss in 400 steps;
             # 3e-4 removes 92% and plateaus (rankscope.train.planted's docstring)
             (("lr_full", 3e-4),)),
)}


def check_kind(kind: str | None) -> str:
    """``kind`` itself when it is one of ``KINDS``.

    Raises:
        InputError: any other kind, with the known ones.
    """
    if kind not in KINDS:
        raise InputError(f"unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")
    return kind


def shipped_examples(task: str) -> list[dict]:
    """The raw examples of a shipped task, in the corpus's own order.

    Raises:
        InputError: an unknown task, or a corpus package that is not installed.
    """
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    return _LOADERS[task]()


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


_LOADERS = {"news": _news, "qa": _qa, "sentiment": _sentiment, "topic": _topic, "planted": _news}
