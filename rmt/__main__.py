"""`python -m rmt ...` is the `rmt` command (what `torchrun -m rmt train ...` runs)."""

from rmt.cli import app

app()
