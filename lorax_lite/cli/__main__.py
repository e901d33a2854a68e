"""`python -m lorax_lite.cli`."""

from lorax_lite.cli import main

main()
