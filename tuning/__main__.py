"""`python -m tuning`: see `tuning.cli`."""

from tuning.cli import run

run()
