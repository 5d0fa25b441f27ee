"""The training objective: a batch's summed loss, and what a step's loss is averaged over.

A step's loss is summed over all its targets (every micro-batch, every process) and divided
once by their count, so gradient accumulation and data parallelism compute the update of one
batch in one process.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rankscope.errors import InputError
from rankscope.train.corpora import DISTILL
from rankscope.train.encoding import IGNORE_INDEX


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` without its trailing columns that no row attends.

    Every task pads on the right (``encoding._pad``), so those columns are padding in every
    row: dropping them changes no loss or logit a row attends (its attention never reaches
    them: masked, or after it under a causal mask) and saves their compute. A shipped
    classification task's questions are ~12 tokens in 32-token rows.

    Args:
        batch: tensors of one batch; the (B, L) ones (input_ids, attention_mask, token labels)
            are cut, others (class labels (B,)) kept.
    """
    mask = batch["attention_mask"]
    used = torch.nonzero(mask.any(0))
    width = int(used.max()) + 1 if used.numel() else mask.shape[1]
    if width == mask.shape[1]:
        return batch
    return {k: v[:, :width] if v.shape == mask.shape else v for k, v in batch.items()}


def row_losses(model, batch: dict[str, torch.Tensor], *, kind: str,
               teacher=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's summed loss, its number of targets, and its logits' argmax hits (cls).

    lm/sft: next-token cross-entropy over the labels that are not ``IGNORE_INDEX``;
    cls: cross-entropy of each row's class; distill: per attended token, the mean over hidden
    units of (h_student − h_teacher)², h the backbone's final hidden state
    (``rankscope.train.planted``). Training sums the rows (``loss_sum``); held-out evaluation
    keeps them apart, so that two runs can be compared example by example.

    Args:
        batch: input_ids, attention_mask (B, L) and labels (B, L) or (B,) for cls (none
            for distill).
        kind: "lm", "sft", "cls" or "distill".
        teacher: distill only, the planted task's ``Teacher``.
    Returns:
        (float32 sums (B,), target counts (B,), correct (B,) for cls, else None).
    Raises:
        InputError: distill without a teacher.
    """
    if kind == DISTILL:
        if teacher is None:
            raise InputError("the planted task's loss needs its teacher (a DistillSplit's)")
        target = teacher.outputs(batch)                                   # (B, L, H)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        per_token = (out.last_hidden_state.float() - target).pow(2).mean(-1)   # (B, L)
        mask = batch["attention_mask"].bool()                             # (B, L)
        return (per_token * mask).sum(1), mask.sum(1), None
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits.float()
    if kind == "cls":
        loss = F.cross_entropy(logits, batch["labels"], reduction="none")   # (B,)
        return loss, torch.ones_like(batch["labels"]), logits.argmax(-1) == batch["labels"]
    # shift the labels, not the logits: a (B, L-1, V) slice of the logits would be copied
    labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)   # (B, L): the next token
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none").view(labels.shape)          # (B, L), 0 where ignored
    return loss.sum(1), (labels != IGNORE_INDEX).sum(1), None


def loss_sum(model, batch: dict[str, torch.Tensor], *, kind: str,
             teacher=None) -> tuple[torch.Tensor, int]:
    """The summed loss of a batch and how many targets it summed over (``row_losses``, summed).

    Returns:
        (the float32 summed loss, a 0-d tensor; the number of targets).
    Raises:
        InputError: distill without a teacher.
    """
    sums, counts, _ = row_losses(model, batch, kind=kind, teacher=teacher)
    return sums.sum(), int(counts.sum())


def n_targets(train: dict[str, torch.Tensor], idx: torch.Tensor, *, kind: str) -> int:
    """What a step's summed loss over the training rows ``idx`` is divided by (at least 1).

    cls: the rows. distill: the attended tokens. lm/sft: the labels that are not
    ``IGNORE_INDEX``, at every position. That counts one token more per lm row than ``loss_sum`` sums over (the first token has no
    previous one to predict it), so an lm step's loss is (L−1)/L of the mean; it is kept as
    every committed run was trained with it (sft rows start with an ignored prompt token).
    """
    if kind == "cls":
        return max(idx.numel(), 1)
    if kind == DISTILL:
        return max(int(train["attention_mask"][idx].sum()), 1)
    return max(int((train["labels"][idx] != IGNORE_INDEX).sum()), 1)


def tokens_in(train: dict[str, torch.Tensor], idx: torch.Tensor, *, kind: str) -> int:
    """The tokens that the rows ``idx`` train on, for throughput: labelled tokens (lm/sft) or
    every attended token (cls, distill)."""
    if kind in ("cls", DISTILL):
        return int(train["attention_mask"][idx].sum())
    return int((train["labels"][idx] != IGNORE_INDEX).sum())
