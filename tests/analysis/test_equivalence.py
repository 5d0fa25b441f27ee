"""The equivalence test on differences known by construction, and its error rate by simulation."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rankscope.analysis.equivalence import (equivalence_scan, holm, paired_bootstrap,
                                            paired_differences, smallest_equivalent, tost)


def test_a_constant_difference_has_a_point_interval():
    boot = paired_bootstrap(np.full((3, 50), 0.02), n_boot=200)
    assert np.allclose(boot, 0.02)
    lo, hi, p = tost(boot, 0.03)
    assert (lo, hi) == pytest.approx((0.02, 0.02)) and p == pytest.approx(1 / 201)


def test_the_bootstrap_interval_matches_the_normal_one_for_many_examples():
    """One seed of n iid differences: the 90% interval is mean ± 1.645 sd/√n."""
    rng = np.random.default_rng(1)
    d = rng.normal(0.0, 1.0, (1, 2000))
    lo, hi, _ = tost(paired_bootstrap(d, n_boot=4000), 1.0)
    half = 1.645 * d.std() / np.sqrt(d.size)
    assert lo == pytest.approx(d.mean() - half, abs=0.01)
    assert hi == pytest.approx(d.mean() + half, abs=0.01)


def test_seeds_that_disagree_widen_the_interval():
    """The same examples, seeds offset by ±0.05: resampling seeds carries that spread."""
    rng = np.random.default_rng(2)
    base = rng.normal(0, 0.01, 500)
    agree = np.stack([base, base, base])
    disagree = np.stack([base - 0.05, base, base + 0.05])
    width = [np.subtract(*tost(paired_bootstrap(x), 1.0)[1::-1]) for x in (agree, disagree)]
    assert width[1] > 5 * width[0]


def test_holm_matches_its_definition():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 → max(0.06, 0.04) = 0.06
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_tost_keeps_its_error_rate_at_the_margin():
    """A true difference exactly at the margin is declared equivalent at most ~5% of the time
    (the two one-sided tests at 5%), whatever the noise."""
    rng = np.random.default_rng(3)
    margin, passed = 0.03, 0
    for _ in range(200):
        d = margin + rng.normal(0, 0.1, (2, 150))
        lo, hi, _ = tost(paired_bootstrap(d, n_boot=1000, seed=int(rng.integers(1 << 30))), margin)
        passed += -margin < lo and hi < margin
    assert passed / 200 <= 0.08


def _examples(means: dict, n=300, noise=0.05, seeds=(0, 1, 2)):
    rng = np.random.default_rng(4)
    hard = rng.normal(0, 0.5, n)
    rows = []
    for (method, rank), mean in means.items():
        for s in seeds:
            rows.append(pd.DataFrame({"method": method, "rank": rank, "seed": s,
                                      "example": np.arange(n),
                                      "loss": mean + hard + rng.normal(0, noise, n)}))
    return pd.concat(rows, ignore_index=True)


def test_the_scan_names_each_rank_by_its_interval():
    ex = _examples({("full", None): 1.0, ("lora", 1): 1.2, ("lora", 4): 1.01,
                    ("lora", 16): 0.8})
    scan = equivalence_scan(ex, metric="loss", higher=False, margin=0.05).set_index("rank")
    assert scan.loc[1, "status"] == "worse" and scan.loc[4, "status"] == "equivalent"
    assert scan.loc[16, "status"] == "better"
    assert scan.loc[4, "diff"] == pytest.approx(0.01, abs=0.01)
    assert (scan["n_seeds"] == 3).all() and (scan["n_examples"] == 300).all()
    assert smallest_equivalent(scan.reset_index(), better_counts=False) == 4


def test_a_wide_interval_is_inconclusive_and_says_how_many_examples_would_narrow_it():
    ex = _examples({("full", None): 1.0, ("lora", 4): 1.0}, n=40, noise=1.0)
    scan = equivalence_scan(ex, metric="loss", higher=False, margin=0.05)
    assert scan["status"].iloc[0] == "inconclusive"
    assert scan["n_needed"].iloc[0] > 40 * (scan["detectable"].iloc[0] / 0.05) ** 2 - 1


def test_seeds_pair_seed_by_seed_or_against_the_reference_mean():
    ex = _examples({("full", None): 1.0, ("lora", 4): 1.1}, seeds=(0, 1))
    assert paired_differences(ex, "loss", 4, ex[ex["method"] == "full"]).shape == (2, 300)
    other = ex[ex["method"] == "full"].assign(seed=lambda d: d["seed"] + 10)
    diff = paired_differences(ex, "loss", 4, other)
    assert diff.shape == (2, 300) and diff.mean() == pytest.approx(0.1, abs=0.02)


def test_an_impossible_margin_is_refused():
    with pytest.raises(ValueError, match="margin"):
        equivalence_scan(_examples({("full", None): 1.0}), metric="loss", higher=False,
                         margin=float("nan"))
