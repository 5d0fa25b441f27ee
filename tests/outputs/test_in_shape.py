"""The "in shape" checks of a figure, on figure data built by hand, and the table of figures."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from study_fixtures import PAPER

from rankscope.errors import InputError
from rankscope.outputs.experiments import load_experiment
from rankscope.outputs.in_shape import (check_criteria, evaluate, figure_gates, reproduced,
                                        shape_table, write_shape_table)

GRID = pd.DataFrame({       # φ(1, 1) of two modules on two sides, with their nulls
    "panel": ["q left", "q right", "v left", "v right"],
    "module": ["q_proj", "q_proj", "v_proj", "v_proj"], "i": 1, "j": 1,
    "phi": [0.62, 0.30, 0.40, 0.01], "null_q99": [0.03, 0.05, 0.03, 0.05]})


def _check(**c):
    return check_criteria([{"what": "w", "value": "phi", **c}], "exp")


def test_a_row_check_any_or_all():
    q = _check(rows="module == 'q_proj'", above=[0.5, "null_q99"], holds="any")
    v = _check(rows="module == 'v_proj'", above=[0.5, "null_q99"], holds="any")
    both = _check(above=["null_q99"])                                   # holds: all rows
    got = evaluate(GRID, q + v + both)
    assert [c["status"] for c in got] == ["yes", "no", "no"]
    assert got[0]["passed"] == 1 and got[0]["rows"] == 2
    assert got[0]["measured"] == {"q left": 0.62, "q right": 0.3}
    assert got[2]["passed"] == 3                                        # v right is at chance
    assert reproduced(got) == "partly" and reproduced(got[:1]) == "yes"
    assert reproduced(got[1:]) == "no"


def test_a_reduced_check():
    df = pd.DataFrame({"method": "lora", "rank": [1, 16, 64, 16, 64],
                       "value": [3.30, 3.00, 3.02, 3.01, 3.00]})
    flat = check_criteria([{"what": "plateau", "rows": "rank >= 16", "value": "value",
                            "over": "rel_spread", "below": 0.01}], "exp")
    every = check_criteria([{"what": "all", "value": "value", "over": "rel_spread",
                             "below": 0.01}], "exp")
    got = evaluate(df, flat + every)
    assert got[0]["status"] == "yes" and got[0]["measured"] == {"rel_spread": 0.006656, "n": 4}
    assert got[1]["status"] == "no" and got[1]["measured"]["rel_spread"] == pytest.approx(0.30 / 3.01, abs=1e-4)


def test_a_bound_made_of_other_rows():
    """The known answer of the planted control: every r ≥ 4 below a tenth of the best r < 4."""
    df = pd.DataFrame({"method": "lora", "rank": [1, 2, 4, 8, 16],
                       "value": [4.3e-4, 3.9e-4, 1.6e-5, 1.2e-5, 2.0e-5]})
    knee = check_criteria([{"what": "knee", "rows": "rank >= 4", "value": "value", "over": "max",
                            "below": {"rows": "rank < 4", "over": "min", "times": 0.1}}], "e")
    got = evaluate(df, knee)[0]
    assert got["status"] == "yes" and got["measured"] == {"max": 2.0e-5, "n": 3, "bound 1": 3.9e-5}
    late = check_criteria([{"what": "k", "rows": "rank >= 4", "value": "value", "over": "max",
                            "below": {"rows": "rank < 4", "over": "min", "times": 0.01}}], "e")
    assert evaluate(df, late)[0]["status"] == "no"
    gone = check_criteria([{"what": "k", "value": "value", "over": "max",
                            "below": {"rows": "rank > 99", "over": "min"}}], "e")
    assert evaluate(df, gone)[0]["status"] == "no data"
    with pytest.raises(InputError, match="a bound from other rows needs 'rows'"):
        check_criteria([{"what": "k", "value": "value", "over": "max", "below": {"rows": "x"}}], "e")
    with pytest.raises(InputError, match="above takes numbers or column names"):
        check_criteria([{"what": "k", "value": "value", "above": {"rows": "x", "over": "max"}}], "e")


def test_missing_rows_or_columns_are_no_data_not_no():
    got = evaluate(GRID, _check(rows="module == 'k_proj'", above=[0.5])
                   + _check(above=["null_q95"]) + _check(rows="colour == 'red'", above=[0.5]))
    assert [c["status"] for c in got] == ["no data"] * 3
    assert got[1]["note"] == "no column null_q95"
    assert reproduced(got) == "untested"


@pytest.mark.parametrize("doc, message", [
    ({"what": "w", "value": "phi"}, "give 'above' or 'below'"),
    ({"what": "w", "value": "phi", "above": 1, "holds": "most"}, "holds must be 'all' or 'any'"),
    ({"what": "w", "value": "phi", "above": "null_q99", "over": "max"},
     r"above takes numbers or \{rows, over\} mappings, got 'null_q99'"),
    ({"what": "w", "value": "phi", "above": 1, "over": "mean"}, "over must be one of"),
    ({"what": "w", "value": "phi", "above": [True]}, "numbers or column names"),
    ({"value": "phi", "above": 1}, "'what' must be a non-empty text"),
    ({"what": "w", "value": "phi", "above": 1, "colour": 1}, "unknown key 'colour'"),
])
def test_bad_checks_are_one_line(doc, message):
    with pytest.raises(InputError, match=message):
        check_criteria([doc], "experiment x.yaml")
    with pytest.raises(InputError, match="must be a list"):
        check_criteria(doc, "experiment x.yaml")


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_every_paper_figure_declares_its_shape(path):
    assert len(load_experiment(path).in_shape) >= 1


def _metrics(late: float, moved: list[float]) -> pd.DataFrame:
    full = {"run": "full-s0", "method": "full", "rank": None, "seed": 0, "before_loss": 3.0,
            "after_loss": 2.0, "late_gain_share": late, "a_moved_min": None}
    lora = [{"run": f"lora-r{r}-s0", "method": "lora", "rank": r, "seed": 0, "before_loss": 3.0,
             "after_loss": 2.2, "late_gain_share": None, "a_moved_min": m}
            for r, m in zip((4, 16), moved)]
    return pd.DataFrame([full, *lora])


def test_figure_gates():
    ok = figure_gates({"s": {"metrics": _metrics(0.05, [0.9, 1.2])}})
    assert {g["gate"]: g["status"] for g in ok} == {
        "full gained": "pass", "full plateaued": "pass", "LoRA gained": "pass",
        "LoRA A moved": "pass"}
    bad = {g["gate"]: (g["status"], g["value"]) for g in
           figure_gates({"s": {"metrics": _metrics(0.4, [0.2, 1.2])}})}
    assert bad["full plateaued"] == ("fail", 0.4) and bad["LoRA A moved"] == ("fail", 0.2)


def test_the_table_of_figures(tmp_path):
    checks = evaluate(GRID, _check(rows="module == 'v_proj'", above=[0.5], holds="any"))
    passing = figure_gates({"s": {"metrics": _metrics(0.05, [0.9, 1.2])}})
    failing = figure_gates({"s": {"metrics": _metrics(0.4, [0.2, 1.2])}})
    for name, gates in (("fig_a", passing), ("fig_b", failing)):
        meta = {"format": "rankscope.figure/1", "result": f"{name} | result", "variant": "cpu",
                "reproduced": reproduced(checks), "in_shape": checks, "gates": gates}
        (tmp_path / f"{name}.json").write_text(json.dumps(meta))
    (tmp_path / "other.json").write_text("[1]")                          # not figure metadata
    (tmp_path / "README.md").write_text("# Figures\n\nkept\n")
    write_shape_table(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("# Figures\n\nkept\n") and text.count("in-shape table: begin") == 1
    rows = [line for line in text.splitlines() if line.startswith("| `fig")]
    assert "a finding: the runs passed their gates and w did not hold" in rows[0]
    assert "fig_a \\| result" in rows[0] and "**no**" in rows[0] and "4 of 4 pass" in rows[0]
    assert ("inconclusive: its runs did not pass LoRA A moved, full plateaued (s: full plateaued "
            "0.4, threshold 0.15; s: LoRA A moved 0.2, threshold 0.5); train longer") in rows[1]
    write_shape_table(tmp_path)                                          # replaced, not added
    assert (tmp_path / "README.md").read_text() == text
    assert shape_table({}).count("\n") == 1                              # the header alone


@pytest.mark.parametrize("profile, steps, next_run", [
    ("cpu-paper", 600, "train longer: cpu-paper's rule doubles s's 600 steps once"),
    ("cpu-paper", 1200, "cpu-paper's one doubling is spent (steps: s 1200): the gpu variant "
                        "(paper profile) is what to run next"),
    ("quick", 600, "train longer")])
def test_why_not_names_the_run_the_written_rule_asks_for_next(tmp_path, profile, steps, next_run):
    failing = figure_gates({"s": {"metrics": _metrics(0.05, [0.2, 1.2])}})
    meta = {"format": "rankscope.figure/1", "result": "r", "variant": "cpu", "reproduced": "no",
            "in_shape": [], "gates": failing,
            "configs": {"s": {"profile": profile, "steps": steps}}}
    (tmp_path / "fig.json").write_text(json.dumps(meta))
    row = next(line for line in write_shape_table(tmp_path).read_text().splitlines()
               if line.startswith("| `fig`"))
    assert row.endswith(f"| inconclusive: its runs did not pass LoRA A moved (s: LoRA A moved 0.2, "
                        f"threshold 0.5); {next_run} |")
