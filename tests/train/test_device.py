"""Where a run trains: bf16 autocast by default only where the chip has native bf16."""
from __future__ import annotations

import pytest
import torch

from rankscope.errors import InputError
from rankscope.train.device import FORCE_BF16_ENV, use_bf16


def test_bf16_autocast_by_default_only_where_the_chip_has_native_bf16(monkeypatch):
    monkeypatch.delenv(FORCE_BF16_ENV, raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_bf16(True, cpu) is True and use_bf16(False, cuda) is False   # as set
    assert use_bf16(None, cuda) is True
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert use_bf16(None, cpu) is bool(native)      # no reference-GEMM bf16 on other CPUs


@pytest.mark.parametrize("forced, expected", [("1", True), ("0", False)])
def test_the_force_variable_replaces_the_chips_answer_but_not_a_setting(monkeypatch, forced,
                                                                          expected):
    monkeypatch.setenv(FORCE_BF16_ENV, forced)
    for device in (torch.device("cpu"), torch.device("cuda")):
        assert use_bf16(None, device) is expected
        assert use_bf16(not expected, device) is (not expected)


def test_a_bad_force_value_is_an_input_error(monkeypatch):
    monkeypatch.setenv(FORCE_BF16_ENV, "yes")
    with pytest.raises(InputError, match="RANKSCOPE_FORCE_BF16 must be 1 or 0, got 'yes'"):
        use_bf16(None, torch.device("cpu"))
