"""The study's verbs: sweep, compare, truncate and the whole job, ``run``."""
from __future__ import annotations

from pathlib import Path

import click
import pandas as pd

from rankscope.cli.edge import check_ranks, ints, one_line_errors, parse_shard, planted_rank, strs, \
    sweep_options


@click.command()
@click.argument("config", required=False, type=click.Path(path_type=str))
@click.option("--out", required=True, type=click.Path(path_type=str), help="Sweep folder.")
@click.option("--profile", type=click.Choice(["quick", "cpu-paper", "paper"]), help="Sizing preset.")
@click.option("--model", help="Registry name, local folder or hub id.")
@sweep_options
@click.option("--data", type=click.Path(path_type=str), help="Your own JSONL/CSV/text file.")
@click.option("--task-kind", type=click.Choice(["lm", "sft", "cls"]), help="Schema of --data.")
@click.option("--methods", help="Comma list: full,lora.")
@click.option("--ranks", help="Comma list of LoRA ranks, e.g. 1,2,4,8.")
@click.option("--seeds", help="Comma list of seeds.")
@click.option("--targets", help="Comma list of LoRA target modules, or all-linear.")
@click.option("--alpha-policy", type=click.Choice(["fixed", "scaled", "rslora"]))
@click.option("--alpha", type=float, help="α (fixed, rslora) or c in α = c·r (scaled).")
@click.option("--steps", type=int, help="Optimizer steps per run.")
@click.option("--batch-size", type=int, help="Sequences per micro-batch (global).")
@click.option("--grad-accum", type=int, help="Micro-batches per step.")
@click.option("--max-len", type=int, help="Tokens per sequence.")
@click.option("--lr-full", type=float, help="Peak learning rate, full fine-tuning.")
@click.option("--lr-lora", type=float, help="Peak learning rate, LoRA.")
@click.option("--checkpoint-every", type=int, help="Save a resumable checkpoint every N steps.")
@click.option("--max-eval-examples", type=int, help="Cap on held-out examples (blocks for lm).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--bf16/--no-bf16", default=None, help="bf16 autocast (weights stay float32).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--shard", metavar="I/N", help="Train only the I-th of N slices of the grid "
              "(runs I, I+N, …) into the shared OUT: one per GPU, node or job-array task.")
@one_line_errors
def sweep(config, out, quiet, shard, **flags):
    """Fine-tune full and LoRA runs over ranks and seeds into OUT (resumable)."""
    from rankscope.train.config import build_sweep
    from rankscope.train.sweep import grid_table, run_sweep

    flags["ranks"] = check_ranks(ints(flags["ranks"], "--ranks"))
    flags["seeds"] = ints(flags["seeds"], "--seeds")
    flags["methods"], flags["targets"] = strs(flags["methods"]), strs(flags["targets"])
    flags["planted_rank"] = planted_rank(flags["planted_rank"])
    cfg = build_sweep(yaml_path=config, overrides=flags)
    manifests = run_sweep(cfg, out, shard=parse_shard(shard), progress=not quiet,
                          log=click.echo)
    table = grid_table(manifests)
    if len(table):
        click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        click.echo(f"{len(table)} runs in {out}")





@click.command()
@click.argument("runs", type=click.Path(path_type=str))
@click.option("--out", required=True, type=click.Path(path_type=str), help="Results folder.")
@click.option("--grid-layers", help="Comma list of layers for the φ(i, j) grids (default: middle).")
@click.option("--overwrite", is_flag=True, help="Replace an output folder that holds anything "
                                                "but this sweep's results.")
@click.option("--device", default="auto", show_default=True,
              type=click.Choice(["auto", "cpu", "cuda"]), help="Where dense SVDs run.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@one_line_errors
def compare(runs, out, grid_layers, overwrite, device, quiet):
    """Subspace similarity, convergence, ΔW vs W, intruders and the verdict for a sweep RUNS."""
    from rankscope.pipeline.stages import compare_stage
    from rankscope.store.results import load_tables

    layers = list(ints(grid_layers, "--grid-layers") or []) or None
    compare_stage(runs, out, grid_layers=layers, device=device, overwrite=overwrite,
                  progress=not quiet, log=lambda s: click.echo(s, err=True))
    click.echo((Path(out) / "verdict.md").read_text())
    click.echo(f"wrote {', '.join(sorted(load_tables(out)))} to {out}")


@click.command()
@click.argument("runs", type=click.Path(path_type=str))
@click.option("--out", required=True, type=click.Path(path_type=str), help="Results folder.")
@click.option("--ks", default="1,2,4,8,16,32,64", show_default=True, help="Truncation ranks.")
@click.option("--lora-min-rank", type=int, help="Also truncate LoRA runs of at least this rank.")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--quiet", is_flag=True, help="No progress bars.")
@one_line_errors
def truncate(runs, out, ks, lora_min_rank, device, quiet):
    """Re-evaluate W_0 + trunc_k(ΔW) for each k: the functional intrinsic rank."""
    from rankscope.pipeline.stages import truncate_stage

    curve = truncate_stage(runs, out, ks=ints(ks, "--ks"), lora_min_rank=lora_min_rank,
                           device=device, progress=not quiet, log=lambda s: click.echo(s, err=True))
    summary = pd.read_csv(Path(out) / "truncation_summary.csv")
    cols = ["run", "k", [c for c in curve if c.startswith("eval_")][0], "gain_share"]
    click.echo(curve[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    click.echo(summary.to_string(index=False))





@click.command("run")
@click.argument("config", required=False, type=click.Path(path_type=str))
@click.option("--out", default="rankscope-study", show_default=True,
              type=click.Path(path_type=str), help="Study folder: runs/ and results/ inside.")
@click.option("--profile", type=click.Choice(["quick", "cpu-paper", "paper"]),
              help="Sizing preset; default paper on a GPU, quick on a CPU.")
@click.option("--model", help="Registry name, local folder or hub id (default smollm2-135m).")
@sweep_options
@click.option("--data", type=click.Path(path_type=str), help="Your own JSONL/CSV/text file.")
@click.option("--task-kind", type=click.Choice(["lm", "sft", "cls"]), help="Schema of --data.")
@click.option("--ranks", help="Comma list of LoRA ranks.")
@click.option("--seeds", help="Comma list of seeds.")
@click.option("--steps", type=int, help="Optimizer steps per run.")
@click.option("--targets", help="Comma list of LoRA target modules, or all-linear.")
@click.option("--budget", help="Parameter budget for the recommendation (1.5M, 200k, …).")
@click.option("--validate", is_flag=True, help="Retrain the recommended config vs a uniform rank.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--quiet", is_flag=True, help="No progress bars.")
@one_line_errors
def run_cmd(config, out, profile, budget, validate, quiet, **flags):
    """The whole job: sweep, analyses, truncation test, recommendation and report."""
    from rankscope.pipeline.job import job_config, run_job

    flags["ranks"] = check_ranks(ints(flags["ranks"], "--ranks"))
    flags["seeds"], flags["targets"] = ints(flags["seeds"], "--seeds"), strs(flags["targets"])
    flags["planted_rank"] = planted_rank(flags["planted_rank"])
    cfg = job_config(config=config, profile=profile, overrides=flags)
    run_job(cfg, out, budget=budget, validate=validate, progress=not quiet, log=click.echo)
