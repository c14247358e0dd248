"""`python -m featsvm ...` is the same as the `featsvm` command."""

from featsvm.cli import main

main(prog_name="featsvm")
