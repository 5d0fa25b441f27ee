"""``python -m rankscope`` (and ``torchrun -m rankscope``) runs the CLI."""
from rankscope.cli import main

main(prog_name="rankscope")
