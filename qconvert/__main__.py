"""`python -m qconvert` runs the command line."""

from qconvert.cli import main

main()
