"""`python -m aegisctl`."""

from aegisctl.cli import main

main()
