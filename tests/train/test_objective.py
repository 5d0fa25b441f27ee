"""The loss of a batch: padding columns that no row attends are cut before the forward pass,
and the loss is the same as on the padded batch (right padding, MiniLM and SmolLM2)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rankscope.train.encoding import IGNORE_INDEX
from rankscope.train.objective import loss_sum, trim_padding


def _padded(lengths: list[int], width: int, *, vocab: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)             # pad id 0, right side
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(5, vocab, (n,), generator=gen)
        mask[r, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def test_trimming_cuts_the_columns_no_row_attends_and_keeps_the_rest():
    batch = {**_padded([3, 5, 2], 8, vocab=50), "labels": torch.tensor([0, 1, 0])}
    cut = trim_padding(batch)
    assert cut["input_ids"].shape == (3, 5) and cut["attention_mask"].shape == (3, 5)
    assert torch.equal(cut["input_ids"], batch["input_ids"][:, :5])
    assert torch.equal(cut["labels"], batch["labels"])                   # (B,): kept whole
    full = _padded([8, 2], 8, vocab=50)
    assert trim_padding(full) is full                                     # nothing to cut
    token_labels = {**batch, "labels": torch.where(batch["attention_mask"] == 1,
                                                   batch["input_ids"], IGNORE_INDEX)}
    assert trim_padding(token_labels)["labels"].shape == (3, 5)


@pytest.mark.slow
def test_a_classifier_loss_is_the_same_with_and_without_the_padding(minilm_slice):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_slice, num_labels=3).eval()
    batch = {**_padded([4, 9, 6, 3], 32, vocab=model.config.vocab_size),
             "labels": torch.tensor([0, 2, 1, 1])}
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss, n = loss_sum(model, trim_padding(batch), kind="cls")
    expected = torch.nn.functional.cross_entropy(padded.logits, batch["labels"], reduction="sum")
    assert n == 4 and float(loss) == pytest.approx(float(expected), rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_a_causal_lm_loss_is_the_same_with_and_without_the_padding(smollm2_slice):
    model = AutoModelForCausalLM.from_pretrained(smollm2_slice).eval()
    batch = _padded([7, 12, 3], 32, vocab=model.config.vocab_size)
    batch["labels"] = torch.where(batch["attention_mask"] == 1, batch["input_ids"], IGNORE_INDEX)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits.float()
        loss, n = loss_sum(model, trim_padding(batch), kind="lm")
    nxt = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), nxt.flatten(),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
    assert n == 7 + 12 + 3 - 3 and float(loss) == pytest.approx(float(expected), rel=1e-5)
