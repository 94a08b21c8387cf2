"""``python -m medlens.cli``."""

from medlens.cli import main

main()
