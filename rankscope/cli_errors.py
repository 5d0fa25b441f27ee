"""The CLI's error edge, shared by every module that defines a click command."""
from __future__ import annotations

import functools
import sys

import click

from rankscope.errors import RankscopeError


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
