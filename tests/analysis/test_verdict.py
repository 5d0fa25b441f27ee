"""The verdict's three outcomes on tables built by hand, each test against its declared threshold."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rankscope.analysis.verdict import PLATEAU_MAX, verdict_table
from rankscope.analysis.verdict_text import verdict


def metrics(full=(2.0, 2.02), lora=None, *, before=3.0, late=0.05, n=400, noise=0.05):
    """Held-out losses after training: full per seed, and {rank: per-seed losses} for LoRA.

    Returns the metrics table and the per-example table the equivalence test pairs: example i
    of a run has loss = its run's mean + a per-example offset shared by every run (how hard
    the example is) + the run's own noise (sd ``noise``).
    """
    lora = {4: (2.01, 2.03), 64: (2.0, 2.0)} if lora is None else lora
    rng = np.random.default_rng(0)
    hard = rng.normal(0, 0.3, n)
    rows = [{"run": f"full-s{s}", "method": "full", "rank": None, "seed": s, "after_loss": v,
             "late_gain_share": late} for s, v in enumerate(full)]
    rows += [{"run": f"lora-r{r}-s{s}", "method": "lora", "rank": r, "seed": s, "after_loss": v,
              "late_gain_share": None} for r, vs in lora.items() for s, v in enumerate(vs)]
    m = pd.DataFrame(rows).assign(before_loss=before)
    rows = [{"run": "base", "method": "base", "rank": None, "seed": None, "after_loss": before},
            *rows]
    ex = pd.concat([pd.DataFrame({"run": r["run"], "method": r["method"], "rank": r["rank"],
                                  "seed": r["seed"], "example": np.arange(n),
                                  "loss": r["after_loss"] + hard + rng.normal(0, noise, n),
                                  "correct": np.nan}) for r in rows], ignore_index=True)
    m.attrs["examples"] = ex
    return m


def frames(m, *, k90=4.0, k0=0.1, phi=None, dmin=576):
    out = {"metrics": m, "examples": m.attrs.get("examples"),
           "modules": pd.DataFrame({"method": ["full"], "d_out": [dmin], "d_in": [dmin],
                                    "energy_rank_90_noise": [294]}),
           "truncation_summary": pd.DataFrame({"run": ["full-s0", "full-s1"], "method": "full",
                                               "share": 0.9, "k": [k90, k90], "k0_share": k0,
                                               "k_max": 64})}
    if phi is not None:
        out["subspace"] = pd.DataFrame({"pair": ["ranks"], "side": ["left"], "i": [1],
                                        "phi": [phi], "null_q99": [0.011]})
    return out


def status(table, test):
    return table.set_index("test").loc[test, "status"]


def test_a_small_rank_within_the_margin_and_a_low_functional_rank_hold():
    outcome, table = verdict_table(frames(metrics(), phi=0.6))
    assert outcome == "holds"
    assert table.set_index("test").loc["equivalence", "value"] == 4
    assert status(table, "functional rank") == "low"
    assert status(table, "shared direction") == "pass"


def test_one_seed_makes_equivalence_inconclusive():
    m = metrics(full=(2.0,), lora={4: (2.01,), 64: (2.0,)})
    outcome, table = verdict_table(frames(m))
    assert outcome == "inconclusive"
    assert status(table, "equivalence") == "inconclusive"
    text, _ = verdict(frames(m))
    assert "run at least two seeds" in text


def test_a_full_run_still_improving_fails_its_gate_and_names_it():
    outcome, table = verdict_table(frames(metrics(late=0.4)))
    assert outcome == "inconclusive"
    row = table.set_index("test").loc["full plateaued"]
    assert row["status"] == "fail" and row["value"] == pytest.approx(0.4) and row["threshold"] == PLATEAU_MAX
    assert status(table, "equivalence") == "inconclusive"            # it needs that gate
    text, ev = verdict(frames(metrics(late=0.4)))
    assert "learning-rate schedule) made 40% of its gain" in text and ev["outcome"] == "inconclusive"
    advice = text.split("What to run next: ")[1].split("\n")[0]
    assert advice.startswith("full fine-tuning was still improving")   # the gate's advice only:
    assert "seeds" not in advice and "full_scope" not in advice        # not causes it lacks


def test_lora_far_better_than_full_at_a_hand_set_rate_is_no_match_and_no_refutation():
    m = metrics(full=(2.5, 2.52), lora={4: (2.0, 2.01), 64: (2.0, 2.0)})
    outcome, table = verdict_table(frames(m, k90=None))
    assert status(table, "equivalence") == "inconclusive" and outcome == "inconclusive"
    text, _ = verdict(frames(m, k90=None))
    assert "LoRA r = 4 beats full fine-tuning beyond the margin" in text
    assert "choose full fine-tuning's learning rate on a validation split" in text


def test_lora_far_better_than_full_at_its_searched_rate_is_at_least_as_good():
    m = metrics(full=(2.5, 2.52), lora={2: (2.8, 2.81), 4: (2.0, 2.01), 64: (2.0, 2.0)})
    m["lr_searched"] = True
    outcome, table = verdict_table(frames(m, phi=0.6))
    assert (status(table, "equivalence"), outcome) == ("pass", "holds")
    assert table.set_index("test").loc["equivalence", "value"] == 4      # r = 2 is worse
    m.loc[m["method"] == "full", "lr_searched"] = [True, False]       # one full run hand-set
    assert status(verdict_table(frames(m, phi=0.6))[1], "equivalence") == "inconclusive"


def test_no_match_and_a_high_functional_rank_refute():
    m = metrics(full=(2.0, 2.0), lora={4: (2.5, 2.51), 64: (2.4, 2.41)})
    outcome, table = verdict_table(frames(m, k90=300.0))
    assert (outcome, status(table, "functional rank")) == ("refuted", "high")


def test_a_functional_rank_between_low_and_high_is_inconclusive():
    outcome, table = verdict_table(frames(metrics(), k90=100.0))
    assert (outcome, status(table, "functional rank")) == ("inconclusive", "between")


def test_a_low_rank_above_the_noise_floor_is_not_low():
    f = frames(metrics(), k90=8.0)
    f["modules"]["energy_rank_90_noise"] = 6
    _, table = verdict_table(f)
    assert status(table, "functional rank") != "low"


def test_a_top_direction_at_chance_blocks_holds():
    outcome, table = verdict_table(frames(metrics(), phi=0.005))
    assert (outcome, status(table, "shared direction")) == ("inconclusive", "fail")


def test_no_gain_from_full_fine_tuning_is_inconclusive_not_refuted():
    m = metrics(full=(3.1, 3.1), lora={4: (2.9, 2.9)})
    outcome, table = verdict_table(frames(m, k90=None))
    assert outcome == "inconclusive" and status(table, "full gained") == "fail"


def test_the_verdict_table_carries_value_threshold_and_gate_for_every_test():
    _, ev = verdict(frames(metrics(), phi=0.6))
    assert {r["test"] for r in ev["tests"]} == {"full gained", "full plateaued", "LoRA gained",
                                                "LoRA stable", "equivalence", "equivalence r = 4",
                                                "equivalence r = 64", "functional rank",
                                                "shared direction"}
    assert all(set(r) == {"test", "status", "value", "threshold", "gate", "note"}
               for r in ev["tests"])


def test_a_gain_the_non_linear_weights_carry_alone_is_not_read_as_a_high_rank():
    f = frames(metrics(), k90=None, k0=0.97)
    outcome, table = verdict_table(f)
    assert (outcome, status(table, "functional rank")) == ("inconclusive", "inconclusive")
    assert "full_scope: linear" in verdict(f)[0]


def test_each_rank_prints_its_interval_and_what_the_data_can_detect():
    _, table = verdict_table(frames(metrics(), phi=0.6))
    row = table.set_index("test").loc["equivalence r = 4"]
    # the margin: 3% of full fine-tuning's gain in loss over the base model (3.0 → 2.01)
    assert row["status"] == "equivalent" and row["threshold"] == pytest.approx(0.03 * 0.99, rel=0.02)
    assert "90% interval [" in row["note"] and "smallest margin this data can show" in row["note"]


def test_a_noisier_rank_does_not_pass_more_easily():
    """A true gap of 0.08 (beyond the 0.03 margin): a quiet rank is worse, a noisy one is
    inconclusive, and neither is equivalent (the old rule widened its margin with the noise)."""
    for noise in (0.05, 2.0):
        m = metrics(full=(2.0, 2.0), lora={4: (2.08, 2.08)}, noise=noise)
        _, table = verdict_table(frames(m, phi=0.6))
        got = status(table, "equivalence r = 4")
        assert got == ("worse" if noise < 1 else "inconclusive"), noise
        assert status(table, "equivalence") != "pass"
    # its difference (−0.055) lies beyond the margin: more data would not make it equivalent
    assert "already lies beyond the margin" in table.set_index("test").loc["equivalence", "note"]


def test_a_wide_interval_around_a_small_difference_says_how_many_examples_would_decide_it():
    """LoRA = full + 0.01 ± 1 on alternate examples: a mean gap inside the margin, an interval
    far wider than it."""
    m = metrics(full=(2.0, 2.0), lora={4: (2.0, 2.0)}, noise=0.0)
    ex = m.attrs["examples"]
    lora = ex["method"] == "lora"
    ex.loc[lora, "loss"] += 0.01 + np.where(ex.loc[lora, "example"] % 2 == 0, 1.0, -1.0)
    _, table = verdict_table(frames(m, phi=0.6))
    assert status(table, "equivalence r = 4") == "inconclusive"
    assert "held-out examples (or more seeds) would narrow it to the margin" in \
        table.set_index("test").loc["equivalence", "note"]


def test_a_rank_worse_than_the_smallest_beyond_the_margin_fails_the_stability_gate():
    m = metrics(lora={1: (2.01, 2.03), 4: (2.0, 2.0), 64: (2.6, 2.7)})
    outcome, table = verdict_table(frames(m, phi=0.6))
    assert status(table, "LoRA stable") == "fail" and outcome == "inconclusive"
    assert "r = 64" in table.set_index("test").loc["LoRA stable", "note"]


def test_a_training_loss_risen_at_the_end_fails_the_stability_gate():
    m = metrics()
    m["late_train_rise"] = [0.0, 0.0, 0.01, 0.02, 0.5, 0.0]
    _, table = verdict_table(frames(m, phi=0.6))
    assert status(table, "LoRA stable") == "fail"
    assert "lora-r64-s0" in table.set_index("test").loc["LoRA stable", "note"]


def test_equivalent_only_at_a_rank_that_is_not_low_refutes():
    m = metrics(full=(2.0, 2.0), lora={4: (2.5, 2.51), 256: (2.0, 2.0)})
    outcome, table = verdict_table(frames(m, k90=300.0, dmin=576))
    assert table.set_index("test").loc["equivalence", "value"] == 256
    assert (status(table, "equivalence"), outcome) == ("fail", "refuted")
