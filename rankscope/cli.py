"""The ``rankscope`` command line: each verb parses, calls one function, maps errors to one line."""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import click

from rankscope.cli_errors import one_line_errors


class OneLineGroup(click.Group):
    """A click group whose own usage errors (unknown option, missing argument) are one line too."""

    def main(self, *args, **kwargs):
        kwargs.pop("standalone_mode", None)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as e:
            click.echo(f"rankscope: error: {e.format_message()}", err=True)
            sys.exit(2)
        except click.ClickException as e:
            click.echo(f"rankscope: error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("rankscope: aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rankscope")
def main():
    """rankscope: does the fine-tuning update ΔW have a low intrinsic rank? Measure it."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")


@main.command()
@click.argument("runs", required=False, type=click.Path(path_type=str))
@click.option("--base", help="Base model: registry name (smollm2-135m, minilm-l6), folder or hub id.")
@click.option("--adapter", type=click.Path(path_type=str), help="A PEFT LoRA adapter folder.")
@click.option("--finetuned", help="A fully fine-tuned model (name, folder or hub id).")
@click.option("--out", required=True, type=click.Path(path_type=str), help="Output folder.")
@click.option("--overwrite", is_flag=True, help="Replace an output folder that has other content.")
@click.option("--float64", is_flag=True, help="Dense SVDs in float64 (default float32).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where dense SVDs run; auto is CUDA when present.")
@one_line_errors
def analyze(runs, base, adapter, finetuned, out, overwrite, float64, device):
    """SVD spectra and effective ranks of ΔW, from RUNS (run or sweep folder), an adapter or a model pair."""
    from rankscope.analysis.analyze import analyze as run_analysis, summary

    _, modules = run_analysis(runs, base=base, adapter=adapter, finetuned=finetuned, out=out,
                              overwrite=overwrite, float64=float64, device=device)
    table = summary(modules)
    click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    click.echo(f"{len(modules)} modules analysed; wrote {out}/spectra.csv, modules.csv, manifest.json")



def _ints(text, what: str = "list"):
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated integers, got {text!r}") from None


def _strs(text):
    return None if text is None else tuple(x.strip() for x in text.split(",") if x.strip())


def _check_ranks(ranks):
    if ranks is not None and any(r <= 0 for r in ranks):
        raise ValueError(f"ranks: every rank must be a positive integer, got {list(ranks)}")
    return ranks


@main.command()
@click.argument("config", required=False, type=click.Path(path_type=str))
@click.option("--out", required=True, type=click.Path(path_type=str), help="Sweep folder.")
@click.option("--profile", type=click.Choice(["quick", "paper"]), help="Sizing preset.")
@click.option("--model", help="Registry name, local folder or hub id.")
@click.option("--task", help="Shipped task: news, qa, sentiment, topic.")
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
@one_line_errors
def sweep(config, out, quiet, **flags):
    """Fine-tune full and LoRA runs over ranks and seeds into OUT (resumable)."""
    from rankscope.train.config import build_sweep
    from rankscope.train.sweep import grid_table, run_sweep

    flags["ranks"] = _check_ranks(_ints(flags["ranks"], "--ranks"))
    flags["seeds"] = _ints(flags["seeds"], "--seeds")
    flags["methods"], flags["targets"] = _strs(flags["methods"]), _strs(flags["targets"])
    cfg = build_sweep(yaml_path=config, overrides=flags)
    manifests = run_sweep(cfg, out, progress=not quiet, log=click.echo)
    table = grid_table(manifests)
    if len(table):
        click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        click.echo(f"{len(table)} runs in {out}")



@main.command()
@click.argument("runs", type=click.Path(path_type=str))
@click.option("--out", required=True, type=click.Path(path_type=str), help="Results folder.")
@click.option("--grid-layers", help="Comma list of layers for the φ(i, j) grids (default: middle).")
@click.option("--overwrite", is_flag=True, help="Replace an output folder that holds anything "
                                                "but this sweep's results.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@one_line_errors
def compare(runs, out, grid_layers, overwrite, quiet):
    """Subspace similarity, convergence, ΔW vs W, intruders and the verdict for a sweep RUNS."""
    from rankscope.analysis.compare import compare as run_compare
    from rankscope.store.atomic import atomic_dir
    from rankscope.store.results import check_results_out
    from rankscope.store.runs import find_runs

    layers = list(_ints(grid_layers, "--grid-layers") or []) or None
    find_runs(runs)                         # every check before the output folder is touched
    if check_results_out(out, runs, overwrite=overwrite):   # this sweep's results: update
        frames = run_compare(runs, out, grid_layers=layers, progress=not quiet)
    else:                                   # new or replaced: renamed into place when done
        with atomic_dir(out, overwrite=True) as tmp:
            frames = run_compare(runs, tmp, grid_layers=layers, progress=not quiet)
    click.echo((Path(out) / "verdict.md").read_text())
    click.echo(f"wrote {', '.join(sorted(frames))} to {out}")


@main.command()
@click.argument("runs", type=click.Path(path_type=str))
@click.option("--out", required=True, type=click.Path(path_type=str), help="Results folder.")
@click.option("--ks", default="1,2,4,8,16,32,64", show_default=True, help="Truncation ranks.")
@click.option("--lora-min-rank", type=int, help="Also truncate LoRA runs of at least this rank.")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--quiet", is_flag=True, help="No progress bars.")
@one_line_errors
def truncate(runs, out, ks, lora_min_rank, device, quiet):
    """Re-evaluate W_0 + trunc_k(ΔW) for each k: the functional intrinsic rank."""
    from rankscope.store.atomic import check_out_dir
    from rankscope.store.results import check_same_sweep, prepare_out, save_tables, write_verdict
    from rankscope.analysis.truncate import truncate_sweep

    check_out_dir(out, overwrite=True)      # a file, or an unwritable parent: refused now
    check_same_sweep(runs, out)
    curve, summary = truncate_sweep(runs, ks=_ints(ks, "--ks"), lora_min_rank=lora_min_rank,
                                    device=device, progress=not quiet)
    out_dir = prepare_out(out)              # made only once the tables exist
    save_tables(out_dir, {"truncation": curve, "truncation_summary": summary},
                inputs={"runs": str(runs)})
    if (out_dir / "metrics.csv").exists():
        write_verdict(out_dir)
    cols = ["run", "k", [c for c in curve if c.startswith("eval_")][0], "gain_share"]
    click.echo(curve[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    click.echo(summary.to_string(index=False))



@main.command("run")
@click.argument("config", required=False, type=click.Path(path_type=str))
@click.option("--out", default="rankscope-study", show_default=True,
              type=click.Path(path_type=str), help="Study folder: runs/ and results/ inside.")
@click.option("--profile", type=click.Choice(["quick", "paper"]),
              help="Sizing preset; default paper on a GPU, quick on a CPU.")
@click.option("--model", help="Registry name, local folder or hub id (default smollm2-135m).")
@click.option("--task", help="Shipped task: news, qa, sentiment, topic.")
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
    from rankscope.pipeline import job_config, run_job

    flags["ranks"] = _check_ranks(_ints(flags["ranks"], "--ranks"))
    flags["seeds"], flags["targets"] = _ints(flags["seeds"], "--seeds"), _strs(flags["targets"])
    cfg = job_config(config=config, profile=profile, overrides=flags)
    run_job(cfg, out, budget=budget, validate=validate, progress=not quiet, log=click.echo)


def _register() -> None:
    from rankscope.outputs.experiments import figures_command, plot_command
    from rankscope.recommend.stage import recommend_command
    from rankscope.outputs.report import report_command

    for command in (figures_command, plot_command, recommend_command, report_command):
        main.add_command(command)


_register()


if __name__ == "__main__":
    main()
