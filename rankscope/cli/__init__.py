"""The ``rankscope`` command line: each verb parses, calls one function, maps errors to one line.

``study`` holds the verbs that train and analyse (sweep, compare, truncate, run), ``read`` the
verbs that read what a study wrote (analyze, recommend, report, figures, plot), ``edge`` the
one-line error edge they share.
"""
from __future__ import annotations

import os
import warnings

import click

from rankscope.cli import export, read, study
from rankscope.cli.edge import OneLineGroup


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rankscope")
def main():
    """rankscope: does the fine-tuning update ΔW have a low intrinsic rank? Measure it."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")


for _command in (read.analyze, study.sweep, study.compare, study.truncate, read.recommend,
                 read.report, study.run_cmd, read.figures, read.plot, export.export):
    main.add_command(_command)
