"""A run's model: targets and ranks checked against the model, the seeded classification head."""
from __future__ import annotations

import pytest
import torch

from rankscope.errors import InputError
from rankscope.train.model_setup import check_targets, load_task_model


# ---------------------------------------------------------------- targets and ranks

def test_a_target_the_model_lacks_is_named_with_the_ones_it_has(smollm2_slice, tiny_cfg):
    model = load_task_model(tiny_cfg(smollm2_slice), kind="lm", num_labels=None)
    with pytest.raises(InputError, match=r"target module 'query' not in the model; it has: "
                                         r"down_proj, gate_proj, k_proj"):
        check_targets(model, ("q_proj", "query"), (2,))


def test_a_rank_above_a_targets_min_dimension_is_refused(smollm2_slice, tiny_cfg):
    model = load_task_model(tiny_cfg(smollm2_slice), kind="lm", num_labels=None)
    check_targets(model, ("q_proj", "v_proj"), (1, 192))         # v_proj is (192, 576)
    with pytest.raises(InputError, match=r"rank 193 is larger than min\(d_out, d_in\) = 192 "
                                         r"of v_proj"):
        check_targets(model, ("q_proj", "v_proj"), (1, 193))
    check_targets(model, ("all-linear",), (192,))                 # k_proj, v_proj: (192, 576)
    with pytest.raises(InputError, match="rank 193 is larger .* all-linear adapts"):
        check_targets(model, ("all-linear",), (193,))


# ---------------------------------------------------------------- classification head

def test_a_new_classification_head_is_drawn_from_the_split_seed(minilm_slice, tiny_cfg):
    cfg = tiny_cfg(minilm_slice, task="sentiment", targets=("query", "value"))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = load_task_model(cfg, kind="cls", num_labels=2).classifier.weight
    assert torch.equal(torch.get_rng_state(), state)                 # global stream untouched
    torch.rand(17)                                                   # any history in between
    again = load_task_model(cfg, kind="cls", num_labels=2).classifier.weight
    other = load_task_model(tiny_cfg(minilm_slice, task="sentiment", split_seed=1), kind="cls",
                              num_labels=2).classifier.weight
    assert torch.equal(first, again) and not torch.equal(first, other)
