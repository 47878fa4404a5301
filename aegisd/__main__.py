"""`python -m aegisd`."""

from aegisd.cli import main

main()
