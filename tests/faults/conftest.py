"""The fault suite's shared tally: inputs tried per fuzzer and outcome."""
from __future__ import annotations

from collections import Counter

import pytest


@pytest.fixture(scope="session")
def tally() -> Counter:
    return Counter()
