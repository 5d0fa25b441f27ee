"""Fixtures and builders shared by a module's tests and the CLI tests of its verb (tests/cli/).

Import what a test file needs by name (``from study_fixtures import planted, SYNTHETIC``):
pytest finds fixtures imported into a test module, and each module gets its own instance of a
module-scoped one.

- the planted sweep (``rankscope recommend``): tests/recommend/, tests/cli/test_cli_recommend.py
- the report page (``rankscope report``): tests/outputs/test_report.py, tests/cli/test_cli_report.py
- the paper experiments (``rankscope figures``): tests/outputs/test_experiments.py,
  tests/cli/test_cli_figures.py
- synthetic figure data (``rankscope plot``): tests/outputs/test_plots.py,
  tests/cli/test_cli_plot.py
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

# ------------------------------------------------------------------- the planted sweep
#
# The planted sweep is built by hand on the SmolLM2 slice's own module names and shapes: a
# full run whose ΔW has a chosen rank per module (plus tiny noise), and LoRA runs r = 1…16 that
# learned the planted directions (and noise beyond them), with held-out losses that stop
# improving at r = 8. Known by construction, so the expected ranks are exact.

# layer → module → planted singular values (rank = their count); q is 576×576, v is 192×576
PLANTED = {0: {"q_proj": [1.0, 0.8], "v_proj": list(np.linspace(1.0, 0.7, 8))},
           1: {"q_proj": [1.0, 0.9, 0.8, 0.7], "v_proj": [1.0]}}
SHAPES = {"q_proj": (576, 576), "v_proj": (192, 576)}
RANKS = (1, 2, 4, 8, 16)
LOSS = {1: 2.6, 2: 2.3, 4: 2.1, 8: 2.0, 16: 2.0}      # the metric's knee is at r = 8


def name(layer: int, kind: str) -> str:
    return f"model.layers.{layer}.self_attn.{kind}"


def expected() -> dict[str, int]:
    return {name(layer, k): len(s) for layer, mods in PLANTED.items() for k, s in mods.items()}


def _frame(d: int, k: int, gen) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))[0]


@pytest.fixture(scope="module")
def planted(smollm2_slice, make_run, tmp_path_factory):
    """A sweep folder: full-s0 with planted ranks, lora-r{1..16}-s0 learning them."""
    out = tmp_path_factory.mktemp("planted") / "sweep"
    gen = torch.Generator().manual_seed(0)
    common = dict(seed=0, model=str(smollm2_slice), model_path=str(smollm2_slice), task="news",
                  data_hash="d", split_hash="s", task_kind="lm", steps=10,
                  eval_before={"loss": 3.0})
    full, lora = {}, {r: {} for r in RANKS}
    for layer, mods in PLANTED.items():
        for kind, sig in mods.items():
            (d_out, d_in), k = SHAPES[kind], len(sig)
            u, v = _frame(d_out, k, gen), _frame(d_in, k, gen)
            s = torch.tensor(sig + [0.01] * 16, dtype=torch.float64)  # beyond k: LoRA's noise
            full[f"{name(layer, kind)}.delta"] = (u[:, :k] * s[:k]) @ v[:, :k].T \
                + 1e-4 * torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
            for r in RANKS:
                noise_u, noise_v = _frame(d_out, r, gen), _frame(d_in, r, gen)
                cols_u = torch.cat([u[:, :k], noise_u], 1)[:, :r]   # planted first, then noise
                cols_v = torch.cat([v[:, :k], noise_v], 1)[:, :r]
                lora[r][f"{name(layer, kind)}.lora_B"] = cols_u * s[:r]
                lora[r][f"{name(layer, kind)}.lora_A"] = cols_v.T
                lora[r][f"{name(layer, kind)}.scaling"] = torch.tensor(1.0)
    make_run(out / "full-s0", full, run="full-s0", method="full", rank=None,
             eval_after={"loss": 1.98}, **common)
    for r in RANKS:
        make_run(out / f"lora-r{r}-s0", lora[r], run=f"lora-r{r}-s0", method="lora", rank=r,
                 lora_alpha=2.0 * r, alpha_policy="scaled", targets=["q_proj", "v_proj"],
                 eval_after={"loss": LOSS[r]}, **common)
    return out


def planted_tables(planted, out) -> None:
    """The tables recommend reads, by compare's own functions (its ΔW-vs-W and intruder
    analyses, which recommend does not read, are skipped: they cost most of compare's time)."""
    from rankscope.analysis.analyze import analyze_deltas
    from rankscope.analysis.compare import run_metrics
    from rankscope.analysis.similarity import convergence_table
    from rankscope.analysis.decompose import decompose_sweep
    from rankscope.analysis.deltas import from_runs
    from rankscope.store.results import prepare_out, save_tables

    runs = decompose_sweep(planted)
    spectra, modules = analyze_deltas(from_runs(planted), progress=False)
    save_tables(prepare_out(out), {"metrics": run_metrics(runs), "convergence": convergence_table(runs),
                                   "spectra": spectra, "modules": modules},
                inputs={"runs": str(planted)})


@pytest.fixture(scope="module")
def planted_results(planted, tmp_path_factory):
    """The planted sweep's tables and the recommendation written beside them."""
    from rankscope.pipeline.stages import recommend_stage as recommend

    out = tmp_path_factory.mktemp("planted-results") / "results"
    planted_tables(planted, out)
    rec = recommend(planted, out, progress=False, log=lambda s: None)
    return out, rec


# --------------------------------------------------------------------- the report page

SECTIONS = ["verdict", "recommendation", "setup", "training", "metric", "spectra", "phi",
            "convergence", "relation", "intruders", "truncation"]      # the answer first


def images(page: str) -> list[str]:
    return re.findall(r'<img[^>]*src="([^"]*)"', page)


# ---------------------------------------------------------------- the paper experiments

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted((ROOT / "experiments" / "paper").glob("*.yaml"))
CONTROL_FIGURES = sorted((ROOT / "experiments" / "controls" / "figures").glob("*.yaml"))
OTHER = sorted(p for p in (ROOT / "experiments").rglob("*.yaml")
               if p not in PAPER and p not in CONTROL_FIGURES)


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "figure-runs"     # shared with test_plots


def write_experiment(tmp_path, doc: dict, name="exp.yaml"):
    """An experiment file ``name`` of figure metric_rank on a quick sweep, with ``doc`` on top."""
    import yaml

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("model: smollm2-135m@2l\ntask: news\n")
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"result": "r", "figure": "metric_rank",
                                    "sweep": "sweep.yaml", "variants": {"quick": {}}, **doc}))
    return path


# --------------------------------------------------------------- synthetic figure data

@pytest.fixture(autouse=True)
def _close():
    """Close every matplotlib figure after each test (autouse where imported)."""
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def _grid(ni, nj):
    i, j = np.meshgrid(np.arange(1, ni + 1), np.arange(1, nj + 1), indexing="ij")
    return pd.DataFrame({"i": i.ravel(), "j": j.ravel(), "phi": (1.0 / (i * j)).ravel()})


def _rank_rows(series=("a", "b"), with_base=True):
    rows = [{"series": s, "method": "lora", "rank": r, "seed": sd, "value": r + sd + k}
            for k, s in enumerate(series) for r in (1, 2, 8) for sd in (0, 1)]
    rows += [{"series": "full fine-tuning", "method": "full", "rank": None, "seed": sd,
              "value": 3.0 + sd} for sd in (0, 1)]
    if with_base:
        rows.append({"series": "base model", "method": "base", "rank": None, "seed": None,
                     "value": 20.0})
    return pd.DataFrame(rows).assign(quantity="loss")


def _overall() -> str:
    from rankscope.outputs.plots import OVERALL

    return OVERALL


SYNTHETIC = {
    "subspace_heatmap": lambda: _grid(4, 16),
    "metric_vs_rank": lambda: _rank_rows(),
    "convergence_curves": lambda: _rank_rows(("q_proj", _overall()), with_base=False)
    .assign(value=lambda d: d["value"] / 20, quantity="share"),
    "intruder_counts": lambda: _rank_rows(("ε = 0.5", "ε = 0.7"), with_base=False)
    .replace({"series": {"full fine-tuning": "ε = 0.5"}}),
    "relation_bars": lambda: pd.DataFrame(
        [{"rank": r, "seed": s, "directions": d, "value": v * r}
         for r in (4, 64) for s in (0, 1) for d, v in (("ΔW", 0.3), ("W", 20.0), ("random", 0.02))]),
    "energy_rank": lambda: pd.DataFrame(
        [{"layer": l, "module": m, "group": g, "seed": 0, "value": 10 + 5 * l}
         for l in range(3) for m, g in (("q_proj", "attention"), ("up_proj", "MLP"))]
        + [{"module": "LoRA r = 16", "group": "reference", "value": 16.0}]),
    "energy_rank_bars": lambda: pd.DataFrame(
        [{"module": m, "group": "MLP", "tau": t, "value": v}
         for m in ("q_proj", "up_proj") for t, v in (("k_50", 3), ("k_90", 40))]
        + [{"module": "LoRA r = 16", "group": "reference", "tau": None, "value": 16.0}]),
    "truncation_curve": lambda: pd.DataFrame(
        [{"curve": c, "k": k, "value": v} for c in ("gain share, full-s0", "energy share")
         for k, v in ((1, 0.3), (2, 0.6), (4, 0.92), (576, 1.0))]),
    "rank_vs_tokens": lambda: pd.DataFrame(
        [{"series": n, "method": m, "tokens": t, "value": v * t / 1000}
         for n, m, v in (("full fine-tuning, attention", "full", 40), ("LoRA r = 8", "lora", 2))
         for t in (100, 250, 500, 1000)]
        + [{"series": "Gaussian k₉₀ floor, attention", "method": "floor", "value": 294.0}]),
}
