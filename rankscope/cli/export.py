"""The verb that writes what a study measured as a PEFT LoRA adapter: export."""
from __future__ import annotations

import click

from rankscope.cli.edge import one_line_errors


@click.command("export")
@click.argument("run", required=False, type=click.Path(path_type=str))
@click.option("--adapter", type=click.Path(path_type=str), help="A PEFT LoRA adapter folder to resize.")
@click.option("--base", help="Base model (registry name, folder or hub id): of --finetuned, or "
                             "instead of the one --adapter's config names.")
@click.option("--finetuned", help="A fully fine-tuned model (name, folder or hub id).")
@click.option("--rank", type=int, help="One rank k for every module.")
@click.option("--energy", type=float, help="Per module, the smallest k holding this share of "
                                           "‖ΔW‖_F², in (0, 1].")
@click.option("--from", "from_", type=click.Path(path_type=str),
              help="Per-module ranks of a PEFT config (rankscope recommend's lora_config.json).")
@click.option("--save-changed-modules", is_flag=True,
              help="Full fine-tunes: put changed norms, biases, embeddings and heads into "
                   "modules_to_save.")
@click.option("--out", required=True, type=click.Path(path_type=str), help="Adapter folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace an output folder that has other content.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where dense SVDs run; auto is CUDA when present.")
@click.option("--no-eval", is_flag=True, help="RUN: skip the held-out evaluation of the "
                                              "exported adapter beside the run's own metric.")
@one_line_errors
def export(run, adapter, base, finetuned, rank, energy, from_, save_changed_modules, out,
           overwrite, device, no_eval):
    """Write a PEFT LoRA adapter from RUN (a run folder), --adapter, or --base with --finetuned.

    A full update is cut to its rank-k SVD, a LoRA update resized by the exact SVD of s·B·A;
    OUT gets adapter_config.json, adapter_model.safetensors and export.json (each module's
    rank and the share of its update's energy kept). From a sweep's run, the adapter is also
    loaded by peft and evaluated on the run's held-out split, beside the run's own metric.
    """
    from rankscope.export.adapters import export_adapter
    from rankscope.export.ranks import RankRule, read_recommendation
    from rankscope.export.sources import resolve_source
    from rankscope.store.atomic import check_out_dir

    config = read_recommendation(from_) if from_ is not None else None
    rule = RankRule(rank=rank, energy=energy, config=config, config_path=from_)
    check_out_dir(out, overwrite=overwrite)           # refuse before any model is loaded
    source = resolve_source(run, adapter=adapter, base=base, finetuned=finetuned)
    record = export_adapter(source, rule=rule, out=out, overwrite=overwrite,
                            save_changed=save_changed_modules, device=device,
                            evaluate=not no_eval)
    on = [m for m in record["modules"] if m["rank"] > 0]
    ranks = sorted({m["rank"] for m in on})
    kept = [m["retained_energy"] for m in on]
    span = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"
    click.echo(f"{len(on)} of {len(record['modules'])} modules at rank {span} "
               f"({record['lora_params']:,} LoRA parameters); energy kept: "
               f"min {min(kept):.3f}, mean {sum(kept) / len(kept):.3f}")
    if record["modules_to_save"]:
        click.echo(f"modules_to_save: {', '.join(record['modules_to_save'])}")
    if record["changed_not_saved"]:
        left = record["changed_not_saved"]
        click.echo(f"note: {len(left)} other changed parameters not exported ({left[0]}, …); "
                   "--save-changed-modules adds them", err=True)
    h = record.get("heldout") or {}
    if "skipped" in h:
        click.echo(f"note: no held-out evaluation of the adapter: {h['skipped']}", err=True)
    elif h:
        for key in h["exported"]:
            if key == "perplexity":
                continue
            click.echo(f"held-out {key} ({h['n_examples']} examples): exported "
                       f"{h['exported'][key]:.4g}, source run {_get(h['source'], key)}, "
                       f"base model {_get(h['base'], key)}")
    click.echo(f"wrote {out}: adapter_config.json, adapter_model.safetensors, export.json")


def _get(metrics: dict | None, key: str) -> str:
    value = (metrics or {}).get(key)
    return "n/a" if value is None else f"{value:.4g}"
