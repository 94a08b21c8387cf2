"""Fuzz targets for the readers and parsers; run with ``python -m tests.fuzz`` (not collected by pytest)."""
