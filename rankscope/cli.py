"""The ``rankscope`` command line: each verb parses, calls one function, maps errors to one line."""
from __future__ import annotations

import functools
import os
import sys

import click

from .errors import RankscopeError


def one_line_errors(fn):
    """Turn rankscope's (and the OS's) errors into ``rankscope: error: …`` and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RankscopeError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError,
                NotADirectoryError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            click.echo(f"rankscope: error: {msg}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("rankscope: interrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rankscope")
def main():
    """rankscope: does the fine-tuning update ΔW have a low intrinsic rank? Measure it."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@main.command()
@click.argument("runs", required=False, type=click.Path(path_type=str))
@click.option("--base", help="Base model: registry name (smollm2-135m, minilm-l6), folder or hub id.")
@click.option("--adapter", type=click.Path(path_type=str), help="A PEFT LoRA adapter folder.")
@click.option("--finetuned", help="A fully fine-tuned model (name, folder or hub id).")
@click.option("--out", required=True, type=click.Path(path_type=str), help="Output folder.")
@click.option("--overwrite", is_flag=True, help="Replace an output folder that has other content.")
@click.option("--float64", is_flag=True, help="Dense SVDs in float64 (default float32).")
@click.option("--device", default=None, help="Where dense SVDs run: cpu (default) or cuda.")
@one_line_errors
def analyze(runs, base, adapter, finetuned, out, overwrite, float64, device):
    """SVD spectra and effective ranks of ΔW, from RUNS (run or sweep folder), an adapter or a model pair."""
    from .analysis import analyze as run_analysis, summary

    _, modules = run_analysis(runs, base=base, adapter=adapter, finetuned=finetuned, out=out,
                              overwrite=overwrite, float64=float64, device=device)
    table = summary(modules)
    click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    click.echo(f"{len(modules)} modules analysed; wrote {out}/spectra.csv, modules.csv, manifest.json")


if __name__ == "__main__":
    main()
