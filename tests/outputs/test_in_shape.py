"""The "in shape" checks of a figure, on figure data built by hand, and the table of figures;
each paper experiment's checks on figure data whose answer is known by construction."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from study_fixtures import PAPER

from rankscope.errors import InputError
from rankscope.outputs.experiments import load_experiment
from rankscope.outputs.in_shape import (caption_note, check_criteria, evaluate, figure_gates,
                                        reproduced, spearman)
from rankscope.outputs.shape_table import shape_table, write_shape_table

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
    assert {g["gate"]: g["status"] for g in ok}.items() >= {
        "full gained": "pass", "full plateaued": "pass", "LoRA gained": "pass",
        "LoRA A moved": "pass"}.items()
    assert reproduced([{"status": "yes"}], ok) == "yes"         # no gate blocks: the checks say
    bad = {g["gate"]: (g["status"], g["value"]) for g in
           figure_gates({"s": {"metrics": _metrics(0.4, [0.2, 1.2])}})}
    assert bad["full plateaued"] == ("fail", 0.4) and bad["LoRA A moved"] == ("fail", 0.2)


def test_the_table_of_figures(tmp_path):
    checks = evaluate(GRID, _check(rows="module == 'v_proj'", above=[0.5], holds="any"))
    passing = figure_gates({"s": {"metrics": _metrics(0.05, [0.9, 1.2])}})
    failing = figure_gates({"s": {"metrics": _metrics(0.4, [0.2, 1.2])}})
    for name, gates in (("fig_a", passing), ("fig_b", failing)):
        meta = {"format": "rankscope.figure/1", "result": f"{name} | result", "variant": "cpu",
                "reproduced": reproduced(checks, gates), "in_shape": checks, "gates": gates}
        (tmp_path / f"{name}.json").write_text(json.dumps(meta))
    (tmp_path / "other.json").write_text("[1]")                          # not figure metadata
    (tmp_path / "README.md").write_text("# Figures\n\nkept\n")
    write_shape_table(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("# Figures\n\nkept\n") and text.count("in-shape table: begin") == 1
    rows = [line for line in text.splitlines() if line.startswith("| `fig")]
    assert "a finding: the runs passed their gates and w did not hold" in rows[0]
    assert "fig_a \\| result" in rows[0] and "**no**" in rows[0] and "4 of 4 pass" in rows[0]
    assert "**inconclusive**" in rows[1]                                # whatever its checks say
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


# ------------------------------------------------------------------ trends, sanity, gates

def _trend(**c):
    return check_criteria([{"what": "t", "value": "value", "x": "rank", **c}], "exp")


RANKS = [1, 2, 4, 8, 16, 64]


def test_a_decreasing_series_passes_a_decreasing_trend_and_records_its_numbers():
    df = pd.DataFrame({"rank": RANKS * 2, "seed": [0] * 6 + [1] * 6,      # one row per seed
                       "value": [21.5, 15.0, 9.0, 5.0, 3.0, 1.9, 20.0, 16.0, 8.0, 6.0, 2.5, 2.0]})
    down, up = evaluate(df, _trend(trend="decreasing") + _trend(trend="increasing"))
    assert down["status"] == "yes" and up["status"] == "no"
    assert down["measured"]["spearman"] == pytest.approx(-0.9895, abs=1e-4)
    assert down["measured"]["median at rank 1"] == 20.75
    assert down["measured"]["median at rank 64"] == 1.95 and down["measured"]["n"] == 12
    assert down["trend"] == "decreasing" and down["x"] == "rank"


def test_a_flat_noisy_series_is_no_trend_and_a_constant_one_fails():
    gen = np.random.default_rng(0)
    flat = pd.DataFrame({"rank": RANKS * 3, "value": 3.0 + 0.05 * gen.standard_normal(18)})
    assert abs(spearman(flat["rank"], flat["value"])) < 0.5
    got = evaluate(flat, _trend(trend="decreasing") + _trend(trend="increasing"))
    assert [c["status"] for c in got] == ["no", "no"]
    const = pd.DataFrame({"rank": RANKS, "value": 0.0})                 # e.g. no intruders at all
    got = evaluate(const, _trend(trend="decreasing"))[0]
    assert got["status"] == "no" and got["measured"]["spearman"] is None


def test_a_trend_needs_three_values_of_x_and_its_ends_to_agree():
    two = pd.DataFrame({"rank": [8, 64, 8, 64], "value": [2.0, 1.0, 2.1, 1.1]})
    got = evaluate(two, _trend(trend="decreasing"))[0]
    assert got["status"] == "no data" and "2 value(s) of rank; a trend needs 3" in got["note"]
    # falls in the middle, back at its start at the end: ρ ≈ −0.51, but the top rank is not
    # below the first
    bowl = pd.DataFrame({"rank": [2 ** p for p in range(10)],
                         "value": [3.0, 2.8, 2.6, 2.4, 2.2, 2.0, 1.8, 1.6, 1.4, 3.0]})
    assert spearman(bowl["rank"], bowl["value"]) == pytest.approx(-0.5106, abs=1e-4)
    assert evaluate(bowl, _trend(trend="decreasing"))[0]["status"] == "no"


def test_a_trend_margin_asks_the_end_to_move_by_a_share_of_the_start():
    df = pd.DataFrame({"rank": [1, 4, 16, 64], "value": [2.00, 1.99, 1.985, 1.99]})   # −0.5%
    assert evaluate(df, _trend(trend="decreasing"))[0]["status"] == "yes"
    assert evaluate(df, _trend(trend="decreasing", margin=0.01))[0]["status"] == "no"
    assert evaluate(df.assign(value=[2.0, 1.9, 1.8, 1.7]),
                    _trend(trend="decreasing", margin=0.01))[0]["status"] == "yes"


def test_a_sanity_check_is_reported_but_does_not_count():
    sane = _check(rows="module == 'v_proj'", below=["null_q99"], holds="any", sanity=True)
    q = _check(rows="module == 'q_proj'", above=[0.5], holds="any")
    got = evaluate(GRID, q + sane)
    assert [c["status"] for c in got] == ["yes", "yes"] and got[1]["sanity"] is True
    assert reproduced(got) == "yes" == reproduced(got[:1])
    insane = evaluate(GRID, q + _check(rows="module == 'v_proj'", above=[0.5], sanity=True))
    assert insane[1]["status"] == "no" and reproduced(insane) == "yes"    # still not evidence
    assert reproduced(evaluate(GRID, sane)) == "untested"                 # no evidence at all
    note = caption_note("yes", insane, [])
    assert note == ("Reproduced in shape: yes (1 of 1 checks; sanity checks: 0 of 1 held); "
                    "every gate passed.")


def test_a_failed_gate_makes_any_figure_inconclusive():
    checks = evaluate(GRID, _check(rows="module == 'q_proj'", above=[0.5], holds="any"))
    failing = figure_gates({"s": {"metrics": _metrics(0.4, [0.9, 1.2])}})    # not plateaued
    passing = figure_gates({"s": {"metrics": _metrics(0.05, [0.9, 1.2])}})
    assert reproduced(checks, passing) == "yes" and reproduced(checks, failing) == "inconclusive"
    assert reproduced([], failing) == "inconclusive"
    skipped = [{"gate": "LoRA stable", "status": "skipped"}]              # nothing to judge
    assert reproduced(checks, skipped) == "yes"
    note = caption_note("inconclusive", checks, failing)
    assert note.startswith("Reproduced in shape: inconclusive (1 of 1 checks); gates not passed:"
                           " full plateaued")


def test_a_reduced_check_by_group_and_a_median_with_its_spread():
    df = pd.DataFrame({"run": ["a"] * 3 + ["b"] * 3, "k": [1, 2, 4] * 2,
                       "value": [0.5, 0.92, 0.97, 0.4, 0.6, 0.85]})
    each = check_criteria([{"what": "w", "value": "value", "by": "run", "over": "max",
                            "above": 0.9}], "e")
    got = evaluate(df, each)[0]
    assert got["status"] == "no" and got["passed"] == 1 and got["rows"] == 2
    assert got["measured"] == {"run a": 0.97, "run b": 0.85}
    some = check_criteria([{"what": "w", "value": "value", "by": "run", "over": "max",
                            "above": 0.9, "holds": "any"}], "e")
    assert evaluate(df, some)[0]["status"] == "yes"
    med = evaluate(df, check_criteria([{"what": "w", "value": "value", "over": "median",
                                        "above": 0.5}], "e"))[0]
    assert med["measured"] == {"median": 0.725, "min": 0.4, "max": 0.97, "n": 6}


def test_a_check_that_needs_several_layers_reads_no_data_on_one():
    one = GRID.assign(layer=3)
    need = _check(rows="i == 1", over="median", above=0.2, needs={"layer": 3})
    got = evaluate(one, need)[0]
    assert got["status"] == "no data" and got["note"] == ("rows hold 1 value(s) of layer; the "
                                                          "check needs 3")
    three = pd.concat([GRID.assign(layer=lay) for lay in (1, 3, 5)])
    assert evaluate(three, need)[0]["status"] == "yes"


@pytest.mark.parametrize("doc, message", [
    ({"trend": "down", "x": "rank"}, "trend must be one of decreasing, increasing"),
    ({"trend": "decreasing"}, "a trend needs 'x'"),
    ({"trend": "decreasing", "x": "rank", "above": 1}, "a trend check takes no 'above'"),
    ({"trend": "decreasing", "x": "rank", "margin": -0.1}, "margin must be a number ≥ 0"),
    ({"x": "rank", "above": 1}, "'x' belongs to a trend check"),
    ({"above": 1, "sanity": "yes"}, "sanity must be true or false"),
    ({"above": 1, "needs": {"layer": 0}}, "needs maps columns to counts ≥ 1"),
    ({"above": 1, "needs": ["layer"]}, "needs maps columns to counts"),
    ({"above": 1, "by": "run"}, "by takes a column name and needs 'over'"),
])
def test_bad_new_keys_are_one_line_naming_the_check(doc, message):
    with pytest.raises(InputError, match=message) as e:
        check_criteria([{"what": "w", "value": "value", **doc}], "experiment x.yaml")
    assert str(e.value).startswith("experiment x.yaml: in_shape[0]: ") and "\n" not in str(e.value)


# ------------------------- each paper experiment's checks, on data known by construction

def _paper_checks(name: str) -> list[dict]:
    from rankscope.train.config import load_yaml

    path = next(p for p in PAPER if p.stem == name)
    return check_criteria(load_yaml(path)["in_shape"], name)


def _statuses(name: str, df: pd.DataFrame) -> list[str]:
    return [c["status"] for c in evaluate(df, _paper_checks(name))]


def _relation_table(delta_dirs: dict, *, q99: float = 0.1, fro=None) -> pd.DataFrame:
    """Table 7's numbers per rank for ΔWq (seeds 0, 1 alike), ΔWv within noise at every r;
    ‖ΔW‖_F per rank from ``fro`` (default 6.91 up to r = 4, 3.57 above, as Hu et al.'s)."""
    rows = []
    for module, dirs in (("q_proj", delta_dirs), ("v_proj", {r: q99 / 2 for r in delta_dirs})):
        for r, d in dirs.items():
            for seed in (0, 1):
                fro_r = (fro or {}).get(r, 6.91 if r <= 4 else 3.57)
                rows.append({"run": f"lora-r{r}-s{seed}", "method": "lora", "rank": r,
                             "seed": seed, "layer": 1, "module": module, "name": module,
                             "delta_fro": fro_r, "delta_dirs": d, "w_dirs": 20.0 + r / 4,
                             "random_expected": q99 / 3, "w_fro": 61.95, "random_q99": q99,
                             "amplification": fro_r / d,
                             "amplification_within_noise": d <= q99})
    return pd.DataFrame(rows)


def test_table7_checks_each_rank_against_its_null_and_amplification_as_a_trend():
    from rankscope.outputs.figure_data import relation

    paper = {1: 0.05, 2: 0.2, 4: 0.32, 8: 0.6, 16: 1.0, 64: 1.90}     # r = 1 within noise
    df = relation({"s": {"relation": _relation_table(paper)}}, modules=["q_proj", "v_proj"])
    assert {"random_q99", "w_own"} <= set(df.columns)
    amp = df[df["plot"] == "convergence_curves"]
    assert amp.loc[amp["series"] == "v_proj", "within_noise"].all()
    got = evaluate(df, _paper_checks("table7_delta_vs_w"))
    assert [c["status"] for c in got] == ["yes", "yes"]
    assert got[0]["rows"] == 8                                   # r = 4, 8, 16, 64 × 2 seeds
    assert got[1]["measured"]["n"] == 10                         # r = 1 (within noise) left out
    # one run at r = 8 inside the random null fails the per-rank check
    rel = _relation_table(paper)
    rel.loc[(rel["module"] == "q_proj") & (rel["rank"] == 8) & (rel["seed"] == 1),
            "delta_dirs"] = 0.09
    got = evaluate(relation({"s": {"relation": rel}}), _paper_checks("table7_delta_vs_w"))
    assert got[0]["status"] == "no" and got[0]["passed"] == 7
    # amplification that grows with r: "> 1" everywhere, but not the published trend
    rising = _relation_table({r: 1.0 for r in paper}, fro={r: 2.0 + r for r in paper})
    assert _statuses("table7_delta_vs_w", relation({"s": {"relation": rising}})) == ["yes", "no"]


def _intruder_table(lora_counts: dict, full_count: int = 0) -> pd.DataFrame:
    rows = []
    for method, counts in (("lora", lora_counts), ("full", {None: [full_count] * 2})):
        for r, per_seed in counts.items():
            for seed, count in enumerate(per_seed):
                for module in ("q_proj", "v_proj"):
                    rows.extend({"run": f"{method}-r{r}-s{seed}", "method": method, "rank": r,
                                 "seed": seed, "layer": 0, "module": module, "name": module,
                                 "k": 10, "eps": e, "count": count} for e in (0.3, 0.5, 0.7, 0.9))
    return pd.DataFrame(rows)


def test_intruder_counts_must_fall_as_r_grows():
    from rankscope.outputs.figure_data import intruders

    falling = {1: [4, 5], 2: [3, 3], 4: [2, 3], 8: [1, 2], 16: [1, 1], 64: [0, 0]}
    df = intruders({"s": {"intruders": _intruder_table(falling)}}, eps=[0.3, 0.5, 0.7, 0.9])
    assert _statuses("intruders_shuttleworth", df) == ["yes", "yes", "yes"]
    flat = {r: [2, 1] if i % 2 else [1, 2] for i, r in enumerate(falling)}    # intruders, no trend
    df = intruders({"s": {"intruders": _intruder_table(flat)}}, eps=[0.3, 0.5, 0.7, 0.9])
    assert _statuses("intruders_shuttleworth", df) == ["yes", "no", "yes"]
    df = intruders({"s": {"intruders": _intruder_table(falling, full_count=3)}})
    assert _statuses("intruders_shuttleworth", df)[2] == "no"             # full has them too


def _energy_modules(k90: dict) -> pd.DataFrame:
    """Full runs' k₉₀ per group at SmolLM2's shapes: q_proj 576 × 576 (Gaussian k₉₀ 294),
    up_proj 1536 × 576 (410)."""
    shapes = {"self_attn.q_proj": (576, 576, 294), "mlp.up_proj": (1536, 576, 410)}
    rows = []
    for layer in range(3):
        for module, (d_out, d_in, floor) in shapes.items():
            k = k90["attention" if "attn" in module else "MLP"]
            rows.append({"run": "full-s0", "method": "full", "rank": None, "seed": 0,
                         "layer": layer, "module": module.split(".")[1],
                         "name": f"model.layers.{layer}.{module}", "d_out": d_out, "d_in": d_in,
                         "energy_rank_50": k // 4, "energy_rank_90": k, "energy_rank_99": 2 * k,
                         "energy_rank_90_noise": floor, "energy_rank_90_seeddiff": None})
    return pd.DataFrame(rows)


def test_energy_ranks_are_read_as_shares_of_the_width_and_of_the_noise_floor():
    from rankscope.outputs.figure_data import energy

    df = energy({"s": {"modules": _energy_modules({"attention": 100, "MLP": 160})}})
    rows = df[(df["plot"] == "energy_rank") & (df["group"] == "MLP")]
    assert rows["share_of_min_d"].iloc[0] == pytest.approx(160 / 576)
    assert rows["share_of_floor"].iloc[0] == pytest.approx(160 / 410)
    assert _statuses("energy_rank_biderman", df) == ["yes"] * 5
    # 160 directions (Biderman's 10 × r = 16) of a 576-wide model is no small share, but 20 is
    # below 0.039 × 576 = 22.5; and the MLP's 130 > attention's 100 is not more rank than its
    # wider floor allows (130/410 = 0.32 < 100/294 = 0.34)
    df = energy({"s": {"modules": _energy_modules({"attention": 100, "MLP": 130})}})
    assert _statuses("energy_rank_biderman", df) == ["yes", "yes", "yes", "yes", "no"]
    # attention's 20 is under both bars (20/576 = 0.035, 20/294 = 0.068); the MLP's 420 is
    # above its Gaussian floor (410): noise, not rank
    df = energy({"s": {"modules": _energy_modules({"attention": 20, "MLP": 420})}})
    assert _statuses("energy_rank_biderman", df) == ["no", "no", "yes", "no", "yes"]


def _grid(pair: str, side: str, source: str, layer: int, module: str, u1, u2, *,
          seeds=(0, 1), ranks=(16, 16)) -> pd.DataFrame:
    from rankscope.linalg.subspace import phi_grid

    ia, jb = u1.shape[1], u2.shape[1]
    ii, jj = np.meshgrid(np.arange(1, ia + 1), np.arange(1, jb + 1), indexing="ij")
    return pd.DataFrame({"pair": pair, "side": side, "source": source,
                         "basis": {"left": "B", "right": "A"}[side] if source == "trained"
                         else "random", "layer": layer, "module": module, "name": module,
                         "rank_1": ranks[0], "rank_2": ranks[1], "seed_1": seeds[0],
                         "seed_2": seeds[1], "i": ii.ravel(), "j": jj.ravel(),
                         "phi": phi_grid(u1, u2, imax=ia, jmax=jb).ravel(), "null_q99": 0.1,
                         "a_moved": 1.2})


def _seed_tables(q_shared: bool) -> dict:
    """Two seeds at r = 16 on 64 × 64 modules: ΔWq's frames the same for both seeds (or not),
    ΔWv's independent; and the random twin."""
    import torch

    from rankscope.linalg.subspace import random_orthonormal

    gen = torch.Generator().manual_seed(0)
    haar = lambda: random_orthonormal(64, 16, generator=gen)       # noqa: E731
    rows = []
    for side in ("left", "right"):
        q = haar()
        rows += [_grid("seeds", side, "trained", 1, "q_proj", q, q if q_shared else haar()),
                 _grid("seeds", side, "trained", 1, "v_proj", haar(), haar()),
                 _grid("seeds", side, "random", 1, "q_proj", haar(), haar())]
    mods = pd.DataFrame({"name": ["q_proj", "v_proj"], "d_out": 64, "d_in": 64})
    return {"s": {"subspace_grid": pd.concat(rows, ignore_index=True), "modules": mods}}


def test_fig4_is_a_block_test_and_its_random_pair_a_sanity_check():
    from rankscope.outputs.figure_subspace import diag_null_q99, subspace_seeds

    df = subspace_seeds(_seed_tables(q_shared=True))
    q = df[(df["module"] == "q_proj") & (df["source"] == "trained")]
    assert q["diag_phi"].to_numpy() == pytest.approx(1.0) and (q["diag_k"] == 16).all()
    assert q["diag_null_q99"].iloc[0] == diag_null_q99(64, 16)
    got = evaluate(df, _paper_checks("fig4_seeds"))
    assert [c["status"] for c in got] == ["yes", "yes", "yes"] and got[2]["sanity"]
    assert reproduced(got) == "yes"
    got = evaluate(subspace_seeds(_seed_tables(q_shared=False)), _paper_checks("fig4_seeds"))
    assert got[0]["status"] == "no" and got[2]["status"] == "yes"
    assert reproduced(got) in ("no", "partly")          # the random pair is no evidence


def test_the_block_statistics_null_by_construction():
    from scipy.stats import beta

    from rankscope.outputs.figure_subspace import diag_null_q99

    mean = np.mean(np.arange(1, 17) / 384)               # E φ(i, i) = i/n
    assert mean < diag_null_q99(384, 16) < 3 * mean
    exact = beta.ppf(0.99, 0.5, (384 - 1) / 2)           # k = 1: φ(1, 1) ~ Beta(1/2, (n − 1)/2)
    assert diag_null_q99(384, 1) == pytest.approx(exact, rel=0.3)


def _rank_tables(phi11: dict) -> dict:
    """The r = 4 vs 8 pair of one seed, φ(1, 1) per layer as given, 0.05 elsewhere."""
    rows = []
    for layer, p in phi11.items():
        for module in ("q_proj", "v_proj"):
            for side in ("left", "right"):
                ii, jj = np.meshgrid(np.arange(1, 5), np.arange(1, 9), indexing="ij")
                phi = np.where((ii == 1) & (jj == 1), p if module == "q_proj" else 0.2, 0.05)
                rows.append(pd.DataFrame({
                    "pair": "ranks", "side": side, "source": "trained",
                    "basis": {"left": "B", "right": "A"}[side], "layer": layer,
                    "module": module, "name": module, "rank_1": 4, "rank_2": 8, "seed_1": 0,
                    "seed_2": 0, "i": ii.ravel(), "j": jj.ravel(), "phi": phi.ravel(),
                    "null_q99": 0.03, "a_moved": 1.0}))
    return {"s": {"subspace_grid": pd.concat(rows, ignore_index=True)}}


def test_fig3_reads_phi11_over_layers_not_at_one():
    from rankscope.outputs.figure_subspace import subspace_ranks

    df = subspace_ranks(_rank_tables({1: 0.6, 3: 0.7, 5: 0.45}))
    assert set(df["layer"]) == {1, 3, 5} and df["panel"].nunique() == 2 * 2 * (2 + 2)
    got = evaluate(df, _paper_checks("fig3_subspace"))
    assert [c["status"] for c in got] == ["yes", "no"]          # ΔWv's φ(1, 1) is 0.2
    assert got[0]["measured"] == {"median": 0.6, "min": 0.45, "max": 0.7, "n": 6}
    one = evaluate(subspace_ranks(_rank_tables({3: 0.9})), _paper_checks("fig3_subspace"))
    assert [c["status"] for c in one] == ["no data", "no data"]
    assert reproduced(one) == "untested"


def test_truncation_reads_k_as_a_share_of_the_width_per_run():
    from rankscope.outputs.figure_data import truncation

    ks = [1, 4, 16, 32, 64, 128]
    gains = ([0.3, 0.6, 0.8, 0.93, 0.97, 0.99], [0.3, 0.6, 0.8, 0.91, 0.97, 0.99])   # per seed
    curve = pd.DataFrame([{"run": f"full-s{s}", "method": "full", "k": k, "gain_share": g,
                           "k0_share": 0.2} for s, by_k in enumerate(gains)
                          for k, g in zip(ks, by_k)])
    mods = pd.DataFrame({"method": "full", "name": ["q", "up"], "d_out": [384, 1536],
                         "d_in": 384})
    df = truncation({"s": {"truncation": curve, "modules": mods}})
    assert df["k_share"].max() == 128 / 384
    got = evaluate(df, _paper_checks("truncation"))[0]         # k ≤ 48 of 384: k = 32 at most
    assert got["status"] == "yes" and got["measured"] == {"run full-s0": 0.93, "run full-s1": 0.91}
    curve.loc[(curve["run"] == "full-s1") & (curve["k"] == 32), "gain_share"] = 0.85
    df = truncation({"s": {"truncation": curve, "modules": mods}})
    assert _statuses("truncation", df) == ["no"]              # one seed's does not: k = 64 is over


def test_rank_vs_tokens_reads_growth_as_a_trend():
    from rankscope.outputs.figure_data import rank_tokens

    def table(k90: list[float]) -> pd.DataFrame:
        return pd.DataFrame([{"run": "full-s0", "method": "full", "rank": None, "seed": 0,
                              "name": f"model.layers.0.{m}", "tokens": 1000 * s, "share": s,
                              "k90": k * (1.2 if "mlp" in m else 1.0), "fro": 1.0,
                              "noise_k90": 294} for m in ("self_attn.q_proj", "mlp.up_proj")
                             for s, k in zip((0.1, 0.25, 0.5, 1.0), k90)])

    assert _statuses("rank_vs_tokens", rank_tokens({"s": {"snapshots": table(
        [30, 40, 45, 60])}})) == ["yes", "yes", "yes"]
    assert _statuses("rank_vs_tokens", rank_tokens({"s": {"snapshots": table(
        [50, 40, 45, 40])}})) == ["no", "no", "yes"]


def test_mlp_targets_needs_rank_as_a_trend_and_a_failed_gate_is_inconclusive():
    from rankscope.outputs.figure_data import metric_rank

    def metrics(losses: dict, full: bool = False) -> pd.DataFrame:
        rows = [{"run": f"lora-r{r}-s0", "method": "lora", "rank": r, "seed": 0,
                 "before_loss": 3.0, "after_loss": v} for r, v in losses.items()]
        if full:
            rows.append({"run": "full-s0", "method": "full", "rank": None, "seed": 0,
                         "before_loss": 3.0, "after_loss": 1.5})
        return pd.DataFrame(rows)

    results = {"{Wq, Wv}": {"metrics": metrics({1: 2.1, 4: 2.0, 16: 2.0, 64: 2.0}, full=True)},
               "MLP": {"metrics": metrics({1: 2.0, 4: 1.9, 16: 1.85, 64: 1.8})},
               "all linear": {"metrics": metrics({1: 1.9, 4: 1.8, 16: 1.7, 64: 1.7})}}
    got = evaluate(metric_rank(results, metric="loss"), _paper_checks("mlp_targets"))
    assert [c["status"] for c in got] == ["yes", "yes"] and reproduced(got) == "yes"
    not_moved = [{"sweep": "all linear", "gate": "LoRA A moved", "status": "fail",
                  "value": 0.34, "threshold": 0.5}]
    assert reproduced(got, not_moved) == "inconclusive"
    results["MLP"] = {"metrics": metrics({1: 2.0, 4: 1.99, 16: 2.0, 64: 1.995})}   # flat
    assert _statuses("mlp_targets", metric_rank(results, metric="loss")) == ["yes", "no"]


def test_the_table_says_what_was_not_read_and_a_failed_sanity_check():
    checks = evaluate(GRID, _check(rows="module == 'q_proj'", above=[0.5], holds="any")
                      + _check(rows="module == 'k_proj'", above=[0.5])
                      + _check(rows="module == 'v_proj'", above=[0.5], sanity=True))
    gates = [{"gate": "full gained", "status": "pass"},
             {"gate": "LoRA stable", "status": "skipped"}]
    meta = {"reproduced": reproduced(checks, gates), "in_shape": checks, "gates": gates,
            "variant": "cpu", "result": "r"}
    row = shape_table({"fig": meta}).splitlines()[-1]
    assert "**partly**" in row and "| 1 of 1 pass (1 skipped) |" in row
    assert "sanity, not evidence: w → no" in row
    assert row.endswith("| not read: w (no rows); a sanity check did not hold (the pipeline, not "
                        "the paper): w |")


def test_tables_6_and_18_read_flat_as_every_rank_equivalent_to_the_largest():
    """Per-example held-out losses built so that r = 4 and 16 sit on r = 64's loss and r = 1
    lies 0.3 above it: the equivalence columns say so, and the flat check follows them."""
    from rankscope.outputs.figure_data import metric_rank

    rng = np.random.default_rng(0)
    hard = rng.normal(0, 0.3, 300)
    means = {("base", None): 3.0, ("full", None): 1.0, ("lora", 1): 1.3, ("lora", 4): 1.0,
             ("lora", 16): 1.0, ("lora", 64): 1.0}
    ex, rows = [], []
    for (method, rank), mean in means.items():
        for seed in ([None] if method == "base" else (0, 1, 2)):
            loss = mean + hard + rng.normal(0, 0.02, 300)
            ex.append(pd.DataFrame({"method": method, "rank": rank, "seed": seed,
                                    "example": np.arange(300), "loss": loss}))
            if method != "base":
                rows.append({"run": f"{method}-{rank}-{seed}", "method": method, "rank": rank,
                             "seed": seed, "before_loss": 3.0, "after_loss": float(loss.mean()),
                             "equivalence_margin": 0.03})
    tables = {"metrics": pd.DataFrame(rows), "examples": pd.concat(ex, ignore_index=True)}
    df = metric_rank({"{Wq, Wv}": tables}, metric="loss")
    by_rank = df[df["method"] == "lora"].groupby("rank")["vs_top"].first().dropna()
    assert by_rank.to_dict() == {1: "worse", 4: "equivalent", 16: "equivalent"}
    margin = df["vs_top_margin"].dropna().iloc[0]
    assert margin == pytest.approx(0.03 * 2.0, rel=0.02)          # 3% of r = 64's gain
    assert [c["status"] for c in evaluate(df, _paper_checks("table18_loss_vs_rank"))] == \
        ["yes", "yes"]
    tables["examples"].loc[(tables["examples"]["rank"] == 16), "loss"] += 0.2   # off the plateau
    df = metric_rank({"{Wq, Wv}": tables}, metric="loss")
    assert _statuses("table18_loss_vs_rank", df)[0] == "no"
