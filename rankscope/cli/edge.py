"""The CLI's edge: every error of rankscope (or the OS) becomes one line and exit status 2."""
from __future__ import annotations

import functools
import sys

import click

from rankscope.errors import InputError, RankscopeError


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


def one_line_errors(fn):
    """Turn rankscope's (and the OS's) errors into ``rankscope: error: …`` and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RankscopeError, ValueError, OSError) as e:
            if isinstance(e, OSError) and e.filename and e.strerror:
                msg = f"{e.filename}: {e.strerror}"     # an OS error outside the write helpers
            else:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            click.echo(f"rankscope: error: {msg}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("rankscope: interrupted", err=True)
            sys.exit(130)

    return wrapper


def ints(text, what: str = "list"):
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated integers, got {text!r}") from None


def strs(text):
    return None if text is None else tuple(x.strip() for x in text.split(",") if x.strip())


def check_ranks(ranks):
    if ranks is not None and any(r <= 0 for r in ranks):
        raise ValueError(f"ranks: every rank must be a positive integer, got {list(ranks)}")
    return ranks


def planted_rank(text):
    """``--planted-rank``: an integer (``4``) or module kinds with ranks (``query=2,value=8``)."""
    if text is None or "=" not in text:
        values = ints(text, "--planted-rank") if text and text.strip() else None
        if values is not None and len(values) != 1:      # 4,8 is no rank: say so, not take 4
            raise ValueError(f"--planted-rank: expected one integer or kind=rank pairs such as "
                             f"query=2,value=8, got {text!r}")
        return values[0] if values else None
    out = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = int(value)
        except ValueError:
            raise ValueError(f"--planted-rank: expected an integer or kind=rank pairs such as "
                             f"query=2,value=8, got {text!r}") from None
    return out


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``--shard I/N`` as (I, N), None when not given.

    Raises:
        InputError: not two integers with 1 ≤ I ≤ N.
    """
    if text is None:
        return None
    parts = text.strip().split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise InputError(f"--shard: expected I/N (e.g. 1/4), got {text!r}")
    i, n = int(parts[0]), int(parts[1])
    if not 1 <= i <= n:
        raise InputError(f"--shard: expected I/N with 1 <= I <= N, got {text!r}")
    return i, n


def sweep_options(fn):
    """The options ``sweep`` and ``run`` share: the task, its known-answer control, what full
    fine-tuning trains and how the learning rates are chosen."""
    from rankscope.train.config import FULL_SCOPES, STRATEGIES
    from rankscope.train.corpora import TASKS

    for decorator in reversed((
        click.option("--task", help=f"Shipped task: {', '.join(TASKS)}."),
        click.option("--planted-rank", help="planted task: rank of ΔW* (4), or per module kind "
                                            "(query=2,value=8)."),
        click.option("--planted-scale", type=float, help="planted task: ‖ΔW*‖_F / ‖W₀‖_F."),
        click.option("--planted-seed", type=int, help="planted task: seed of ΔW*'s directions."),
        click.option("--full-scope", type=click.Choice(FULL_SCOPES),
                     help="What full fine-tuning trains: all parameters, the linear weights, or "
                          "the LoRA targets' weights."),
        click.option("--lr-search/--no-lr-search", default=None,
                     help="Choose each method's learning rate on a validation split first."),
        click.option("--strategy", type=click.Choice(STRATEGIES),
                     help="Full fine-tuning under torchrun: ddp (whole model per process) or "
                          "fsdp (sharded parameters, gradients and optimizer state)."),
    )):
        fn = decorator(fn)
    return fn
