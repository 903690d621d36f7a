"""`python -m mosc` runs the CLI."""
from mosc.cli import main

main()
