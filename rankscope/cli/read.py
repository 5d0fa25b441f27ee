"""The verbs that read what a study wrote: analyze, recommend, report, figures, plot."""
from __future__ import annotations

import json
from pathlib import Path

import click

from rankscope.cli.edge import one_line_errors, strs


@click.command()
@click.argument("runs", required=False, type=click.Path(path_type=str))
@click.option("--base", help="Base model: registry name (smollm2-135m, minilm-l6), folder or hub id.")
@click.option("--adapter", type=click.Path(path_type=str), help="A PEFT LoRA adapter folder.")
@click.option("--finetuned", help="A fully fine-tuned model (name, folder or hub id).")
@click.option("--out", required=True, type=click.Path(path_type=str), help="Output folder.")
@click.option("--overwrite", is_flag=True, help="Replace an output folder that has other content.")
@click.option("--float64", is_flag=True, help="Dense SVDs in float64 (default float32).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where dense SVDs run; auto is CUDA when present.")
@click.option("--svd", "svd", default="auto", show_default=True, metavar="exact|topk:K|auto",
              help="Dense updates: the exact SVD, or only the top K singular values (energy ranks "
                   "above K read '> K'); auto is exact up to 2048 on the smaller side, top-256 above.")
@one_line_errors
def analyze(runs, base, adapter, finetuned, out, overwrite, float64, device, svd):
    """SVD spectra and effective ranks of ΔW, from RUNS (run or sweep folder), an adapter or a model pair."""
    from rankscope.analysis.analyze import analyze as run_analysis
    from rankscope.analysis.tables import summary

    _, modules = run_analysis(runs, base=base, adapter=adapter, finetuned=finetuned, out=out,
                              overwrite=overwrite, float64=float64, device=device, svd=svd)
    table = summary(modules)
    click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    click.echo(f"{len(modules)} modules analysed; wrote {out}/spectra.csv, modules.csv, manifest.json")


@click.command("recommend")
@click.argument("runs", type=click.Path(path_type=str))
@click.option("--out", required=True, type=click.Path(path_type=str), help="Results folder.")
@click.option("--budget", help="Trainable LoRA parameters to allocate: 1.5M, 200k, 1500000.")
@click.option("--targets", help="Comma list of module kinds or names, or all-linear "
                                "(default: the sweep's LoRA targets).")
@click.option("--validate", is_flag=True, help="Retrain the recommendation and the uniform rank "
                                               "nearest its parameter count, side by side.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@one_line_errors
def recommend(runs, out, budget, targets, validate, quiet):
    """Recommend a LoRA rank per module of sweep RUNS, with its evidence and a PEFT config."""
    from rankscope.pipeline.stages import recommend_stage

    rec = recommend_stage(runs, out, budget=budget, targets=strs(targets), validate=validate,
                          progress=not quiet, log=lambda s: click.echo(s, err=True))
    click.echo(rec.rationale)
    click.echo(json.dumps(rec.config, indent=2))
    click.echo("wrote recommendation.csv, lora_config.json, rationale.md"
               + (", validate.csv" if validate else "") + f" to {out}")


@click.command("report")
@click.argument("runs", type=click.Path(path_type=str))
@click.option("--out", required=True, type=click.Path(path_type=str), help="Results folder.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@one_line_errors
def report(runs, out, quiet):
    """Write OUT/report.html (self-contained, offline) and OUT/report.md for sweep RUNS."""
    from rankscope.pipeline.stages import report_stage

    html = report_stage(runs, out, progress=not quiet, log=lambda s: click.echo(s, err=True))
    click.echo(f"wrote {html} and {Path(out) / 'report.md'}")


@click.command("figures")
@click.argument("experiment", type=click.Path(path_type=str))
@click.option("--all", "all_", is_flag=True, help="EXPERIMENT is a folder: run every YAML in it.")
@click.option("--variant", type=click.Choice(("auto", "quick", "cpu", "gpu")), default="auto",
              show_default=True, help="quick (CI), cpu, gpu; auto: gpu where CUDA is present.")
@click.option("--out", default="figures", show_default=True, type=click.Path(path_type=str),
              help="Folder of the PNGs and their CSVs.")
@click.option("--runs-root", default="runs", show_default=True, type=click.Path(path_type=str),
              help="Folder of the sweeps and their results.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@one_line_errors
def figures(experiment, all_, variant, out, runs_root, quiet):
    """Run EXPERIMENT.yaml (or every one in a folder, --all) end to end: sweep, analysis, figure."""
    from rankscope.outputs.experiments import default_variant, experiment_files, load_experiment
    from rankscope.pipeline.figures import run_experiment

    files = experiment_files(experiment, all_=all_)
    for f in files:
        load_experiment(f)                      # every file valid before any training starts
    variant = default_variant() if variant == "auto" else variant
    for f in files:
        run_experiment(f, variant=variant, out=out, runs_root=runs_root,
                       log=lambda s: click.echo(s, err=True), progress=not quiet)
    from rankscope.outputs.shape_table import write_shape_table

    click.echo(f"wrote the reproduced-or-not table to {write_shape_table(out)}")


@click.command("plot")
@click.argument("csv", type=click.Path(path_type=str))
@click.option("--out", type=click.Path(path_type=str), help="PNG path (default: beside the CSV).")
@one_line_errors
def plot(csv, out):
    """Re-draw a figure from its CSV alone (e.g. figures/fig3_subspace.csv)."""
    from rankscope.outputs.experiments import redraw

    click.echo(f"wrote {redraw(csv, out)}")
