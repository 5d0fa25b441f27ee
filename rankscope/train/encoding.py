"""Examples encoded as fixed-width token tensors, rows right-padded with the pad token (eos if none).

* lm: texts joined with EOS and cut into ``max_len`` blocks, labels = input_ids (the model
  shifts).
* sft: the chat template (user = prompt, assistant = response), or
  ``"Question: ...\\nAnswer: ..."`` without one; only the response and its end-of-turn token
  are labelled.
* cls: each text truncated to ``max_len`` and labelled with its class id.
* distill: the lm blocks, each framed by the tokenizer's own special tokens (an encoder's
  ``[CLS] … [SEP]``; nothing for SmolLM2's), so an encoder reads them as it was trained to; no
  labels: the targets are a teacher's outputs (``rankscope.train.planted``).
"""
from __future__ import annotations

import numpy as np
import torch

from rankscope.errors import InputError

IGNORE_INDEX = -100


def encode(kind: str, tokenizer, examples: list[dict], *, max_len: int,
           names: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one side of a split.

    Args:
        kind: "lm", "sft", "cls" or "distill".
        tokenizer: a Hugging Face tokenizer (not modified).
        examples: dicts with the kind's fields.
        max_len: L, the width of every row (the block length for lm).
        names: cls only, the class names whose positions are the class ids.
    Returns:
        input_ids, attention_mask (N, L) long and labels: (N, L) long with ``IGNORE_INDEX``
        where ignored (lm, sft), or (N,) class ids (cls); no labels for distill.
    Raises:
        InputError: a tokenizer without the special tokens the kind needs, or a chat
            template that does not render the prompt as the conversation's start.
    """
    if kind == "lm":
        return _encode_lm(tokenizer, examples, max_len)
    if kind == "sft":
        return _encode_sft(tokenizer, examples, max_len)
    if kind == "distill":
        return _encode_distill(tokenizer, examples, max_len)
    return _encode_cls(tokenizer, examples, max_len, names=names)


def label_names(examples: list[dict]) -> tuple[str, ...]:
    """The sorted class names of cls examples (numerically, when every label is an integer).

    Raises:
        InputError: fewer than 2 distinct labels.
    """
    names = {e["label"] for e in examples}
    if len(names) < 2:
        raise InputError(f"classification needs at least 2 labels, found {sorted(names)}")
    numeric = all(n.removeprefix("-").isdigit() for n in names)
    return tuple(sorted(names, key=int if numeric else str))


def cap_rows(data: dict[str, torch.Tensor], cap: int | None,
             seed: list[int]) -> dict[str, torch.Tensor]:
    """Keep the first ``cap`` rows after a seeded shuffle (all rows, in order, if no cap).

    Raises:
        InputError: a cap below 1.
    """
    n = len(data["input_ids"])
    if cap is None or cap >= n:
        return data
    if cap < 1:
        raise InputError(f"an example cap must be at least 1, got {cap}")
    keep = torch.from_numpy(np.random.default_rng(seed).permutation(n)[:cap])
    return {k: v[keep] for k, v in data.items()}


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


def _frame(tok) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text ([CLS], [SEP] for BERT)."""
    plain = _ids(tok, ["a"])[0]
    full = tok(["a"], add_special_tokens=True, verbose=False)["input_ids"][0]
    start = next(i for i in range(len(full)) if full[i:i + len(plain)] == plain)
    return full[:start], full[start + len(plain):]


def _encode_distill(tok, examples: list[dict], max_len: int) -> dict[str, torch.Tensor]:
    head, tail = _frame(tok)
    if max_len <= len(head) + len(tail):
        raise InputError(f"max_len {max_len} leaves no room for text between the tokenizer's "
                         f"{len(head) + len(tail)} special tokens")
    blocks = _encode_lm(tok, examples, max_len - len(head) - len(tail))["input_ids"]
    n = len(blocks)
    ids = torch.cat([torch.tensor(head, dtype=torch.long).expand(n, -1), blocks,
                     torch.tensor(tail, dtype=torch.long).expand(n, -1)], dim=1)  # (N, L)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


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


def _encode_cls(tok, examples: list[dict], max_len: int, *,
                names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    rows = tok([e["text"] for e in examples], truncation=True, max_length=max_len)["input_ids"]
    ids, mask = _pad(rows, _special_id(tok, "pad", "eos"), max_len)
    index = {name: k for k, name in enumerate(names)}
    return {"input_ids": ids, "attention_mask": mask,
            "labels": torch.tensor([index[e["label"]] for e in examples], dtype=torch.long)}  # (N,)
