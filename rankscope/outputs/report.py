"""``rankscope report``: a sweep's whole story as one self-contained HTML page and as Markdown.

The sections: setup, training curves, metric vs r, spectra and effective ranks, φ heatmaps,
convergence, ΔW vs W, intruder dimensions, truncation, the verdict, and the recommendation
with its PEFT config (and its validation, when ``recommend --validate`` ran). It reads only
what earlier stages wrote; ``pipeline.stages.report_stage`` brings those up to date first.
Figures come from ``figure_data`` (the paper figures' builders) and ``report_figures``;
``report_render`` renders the sections.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import yaml

from rankscope.outputs import figure_data as PX
from rankscope.outputs import report_figures as RF
from rankscope.errors import InputError
from rankscope.store.results import VALIDATED
from rankscope.store.runs import LR_SEARCH_FILE, SWEEP_FILE, sweep_root
from rankscope.recommend.text import size_note, validation_side
from rankscope.analysis.verdict import metric_by_rank


@dataclass
class Section:
    """A titled part of the report: blocks of ("md", text), ("fig", caption, png, name),
    ("table", caption, DataFrame) and ("code", language, text), in order."""

    title: str
    anchor: str
    blocks: list = field(default_factory=list)

    def md(self, text: str) -> "Section":
        self.blocks.append(("md", text))
        return self

    def table(self, caption: str, df: pd.DataFrame) -> "Section":
        self.blocks.append(("table", caption, df))
        return self

    def figure(self, caption: str, draw, df: pd.DataFrame | None, *, name: str, **kw) -> "Section":
        """Add a figure drawn by ``draw`` (a plot function, or None for a figure_data frame)."""
        if df is None or df.empty:
            return self.md(f"_{caption}: no data._")
        try:
            png = RF.figure_png(draw, df, **kw)
        except InputError as e:             # e.g. a metric-vs-r panel of a sweep without LoRA
            return self.md(f"_{caption}: not available ({e})._")
        self.blocks.append(("fig", caption, png, name))
        return self

    def built(self, caption: str, builder, results: dict, *, name: str, **settings) -> "Section":
        """Add a ``figure_data`` figure, or a note when its tables are missing."""
        try:
            df = builder(results, **settings)
        except InputError as e:
            return self.md(f"_{caption}: not available ({e})._")
        return self.figure(caption, None, df, name=name)


def _label(sets) -> str:
    targets = next((s.meta.get("targets") for s in sets if s.method == "lora"), None)
    return "LoRA on {" + ", ".join(targets) + "}" if targets else "LoRA"


def setup_section(runs: Path, sets, frames: dict) -> Section:
    """Model, data, training, device and versions; the runs with their metrics."""
    m = sets[0].meta
    cfg = (sweep_root(runs) / SWEEP_FILE)
    sweep = yaml.safe_load(cfg.read_text()) if cfg.exists() else {}
    rows = {"model": m.get("model"), "task": m.get("task") or m.get("data"),
            "task kind": m.get("task_kind"), "data hash": str(m.get("data_hash"))[:12],
            "examples (train / held out)": f"{m.get('n_train_examples')} / {m.get('n_eval_examples')}",
            "steps": m.get("steps"), "tokens per step": m.get("tokens_per_step"),
            "learning rates (full / LoRA)": f"{sweep.get('lr_full')} / {sweep.get('lr_lora')}",
            "LoRA targets": ", ".join(sweep.get("targets") or []),
            "α policy": f"{sweep.get('alpha_policy')} (alpha = {sweep.get('alpha')})",
            "device": f"{m.get('device')} ×{m.get('world_size')}, bf16 autocast {m.get('bf16_autocast')}",
            "versions": ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items() if v),
            "git revision": m.get("git"), "trained": m.get("time")}
    search = lr_search_frame(runs)
    if search is not None:
        chosen = search[search["chosen"]].set_index("method")["lr"]
        rows["learning rates (full / LoRA)"] = (f"{chosen.get('full')} / {chosen.get('lora')}, "
                                                "chosen on a validation split")
    s = Section("Setup", "setup").table("", pd.DataFrame({"": list(rows), "value": list(rows.values())}))
    if search is not None:
        s.table("Learning-rate search: each candidate's metric on a validation split of the "
                "training examples (the held-out split is not used); the sweep trains at the "
                "chosen rates", search)
    met = frames.get("metrics")
    if met is not None and len(met):
        s.table("Runs: held-out metrics before and after training", met.drop(
            columns=[c for c in met if c.endswith("perplexity")]))
    return s


def lr_search_frame(runs: Path) -> pd.DataFrame | None:
    """The learning-rate search's candidates (method, LoRA rank, rate, validation metric,
    chosen), or None when the sweep ran none."""
    path = sweep_root(runs) / LR_SEARCH_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    chosen = {m: c["lr"] for m, c in record.get("chosen", {}).items()}
    return pd.DataFrame([{"method": r["method"], "rank": r["rank"], "lr": r["lr"],
                          **{f"validation {k}": v for k, v in r["validation"].items()},
                          "chosen": chosen.get(r["method"]) == r["lr"]}
                         for r in record["candidates"]]).astype({"rank": "Int64"})


def training_frame(runs: Path) -> pd.DataFrame:
    """Every run's training loss per step, from its ``metrics.jsonl``."""
    from rankscope.store.runs import find_runs

    rows = []
    for run_dir in find_runs(runs):
        path, method = run_dir / "metrics.jsonl", json.loads((run_dir / "manifest.json").read_text())["method"]
        if path.exists():
            for line in path.read_text().splitlines():
                rec = json.loads(line) if line.strip() else {}
                if rec.get("kind") == "train":
                    rows.append({"run": run_dir.name, "method": method, "step": rec["step"],
                                 "loss": rec["loss"]})
    return pd.DataFrame(rows)


def analysis_sections(runs: Path, sets, frames: dict) -> list[Section]:
    """Training curves, metric vs r, spectra, φ, convergence, ΔW vs W, intruders, truncation."""
    from rankscope.analysis.tables import summary

    results = {_label(sets): frames}
    out = [Section("Training curves", "training").figure(
        "Training loss per step", RF.training_curves, training_frame(runs), name="training", panels=2)]
    s = Section("Metric vs r", "metric").built("Held-out metric vs LoRA rank (Hu et al. Tables 6, 18)",
                                               PX.metric_rank, results, name="metric_vs_rank")
    if frames.get("metrics") is not None:
        s.table("Mean, standard deviation and count over seeds", metric_by_rank(frames["metrics"]))
    out.append(s)
    s = Section("Spectra and effective ranks", "spectra")
    spectra, mods = frames.get("spectra"), frames.get("modules")
    if spectra is not None and len(spectra):
        s.figure("Singular values of ΔW, normalised, by module", RF.spectrum_curves,
                 RF.spectrum_frame(spectra), name="spectra", panels=1.4)
    s.built("Energy rank of the full update by layer and module (Biderman et al.)", PX.energy,
            results, name="energy_rank")
    if mods is not None and len(mods):
        s.table("Effective ranks per run and module (medians over layers)", summary(mods))
    if frames.get("snapshots") is not None and len(frames["snapshots"]):    # runs with snapshots
        s.built("Energy rank k₉₀ of ΔW against training tokens, beside the Gaussian floor "
                "(Biderman et al.)", PX.rank_tokens, results, name="rank_vs_tokens")
    out.append(s)
    s = Section("Subspace similarity φ", "phi")
    s.built("φ(i, j) between two ranks of one seed, column space (B) and row space (A) "
            "(Hu et al. Fig. 3)",
            PX.subspace_ranks, results, name="phi_ranks")
    s.built("φ(i, j) between two seeds at the top rank, both spaces, and two random subspaces "
            "(Hu et al. Fig. 4)",
            PX.subspace_seeds, results, name="phi_seeds")
    sub = frames.get("subspace")
    if sub is not None and len(sub):
        keys = [c for c in ("pair", "side", "basis", "i") if c in sub]
        vals = [c for c in ("phi", "null_q95", "null_q99", "a_moved") if c in sub]
        s.table("Median φ of the top direction (i = j = 1) and of the top-m directions, beside "
                "the random null's 95% and 99% quantiles and how far A moved (‖A − A₀‖/‖A₀‖)",
                sub.groupby(keys, dropna=False)[vals].median().reset_index())
    out.append(s)
    out.append(Section("Convergence to the full update", "convergence").built(
        "ΔW_r against ΔW_full and ΔW_r′ as r grows", PX.convergence, results, name="convergence"))
    out.append(Section("ΔW vs W", "relation").built(
        "‖UᵀWV‖_F for ΔW's, W's own and random directions, and amplification (Hu et al. Table 7)",
        PX.relation, results, name="relation"))
    out.append(Section("Intruder dimensions", "intruders").built(
        "Intruder dimensions of W₀ + ΔW (Shuttleworth et al.)", PX.intruders, results,
        name="intruders"))
    s = Section("Truncation test", "truncation").built(
        "Share of the full gain kept by W₀ + trunc_k(ΔW)", PX.truncation, results, name="truncation")
    ts = frames.get("truncation_summary")
    if ts is not None and len(ts):
        s.table("Functional rank: the smallest k keeping each share of the gain", ts)
    out.append(s)
    return out


def recommendation_section(out: Path) -> Section:
    """The rationale, the ranks by layer, the per-module table, the config, the validation."""
    text = (out / "rationale.md").read_text().split("\n## Validation")[0]   # shown below as a table
    s = Section("Recommendation", "recommendation").md(text)
    rec = pd.read_csv(out / "recommendation.csv")
    if rec["layer"].notna().any():
        s.figure("Recommended rank by layer", RF.rank_by_layer, rec.dropna(subset=["layer"]),
                 name="recommended_ranks")
    cols = [c for c in ("layer", "module", "r", "r_evidence", "confidence", "r_energy", "r_phi",
                        "r_knee", "r_truncation", "params") if c in rec]
    s.table("Per module (evidence ranks; all columns and reasons in recommendation.csv)", rec[cols])
    s.blocks.append(("code", "json", (out / "lora_config.json").read_text()))
    val, tested = out / "validate.csv", out / VALIDATED
    current = json.loads((out / "lora_config.json").read_text())
    if val.exists() and (not tested.exists()
                         or json.loads(tested.read_text()).get("recommended") != current):
        s.md("_Validation: validate.csv tested an earlier recommendation; run `rankscope recommend "
             "… --validate` again._")
    elif val.exists():
        v = pd.read_csv(val)
        key = "accuracy" if "after_accuracy" in v else "loss"
        side = validation_side(v, metric=key)
        s.table(f"Validation: the recommendation and the uniform rank nearest its size, "
                f"retrained (held-out {key}, mean over seeds)", side)
        note = size_note(side)
        if note:
            s.md(note)
    else:
        s.md("_Validation: not run (`rankscope recommend … --validate` retrains the recommendation "
             "beside the uniform rank nearest its parameter count)._")
    return s


def verdict_section(out: Path) -> Section:
    """The verdict's headline and what to run next, then its table of gates and tests."""
    md, table = out / "verdict.md", out / "verdict.csv"
    s = Section("Verdict", "verdict")
    if not md.exists():
        return s.md("_No verdict: the sweep has no metrics table._")
    text = md.read_text().replace("## Verdict\n", "", 1)
    s.md("\n".join(line for line in text.splitlines() if not line.startswith("- **")))
    if table.exists():
        s.table("Gates and tests, each with its value, its declared threshold and the gate it "
                "needs (verdict.csv)", pd.read_csv(table).fillna(""))
    return s


def build_report(runs: str | Path, out: str | Path, *, sets, frames: dict,
                 log: Callable[[str], None] = print) -> Path:
    """Write ``out/report.html`` (self-contained) and ``out/report.md`` (+ ``report_files/``).

    Reads only what the earlier stages wrote (``pipeline.stages.report_stage`` makes sure it
    is up to date): ``frames``, the verdict and the recommendation files in ``out``.

    Returns:
        The path of report.html.
    """
    from rankscope.outputs.report_render import write_html, write_markdown

    runs, out = Path(runs), Path(out)
    m = sets[0].meta
    title = f"rankscope report: {m.get('model')} on {m.get('task') or m.get('data')}"
    # the answer first (the verdict and the recommendation), then the evidence section by section
    sections = [verdict_section(out), recommendation_section(out), setup_section(runs, sets, frames),
                *analysis_sections(runs, sets, frames)]
    html = write_html(out / "report.html", title, sections)
    write_markdown(out / "report.md", title, sections)
    return html
