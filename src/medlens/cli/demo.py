"""``medlens demo``: a synthetic CT study through prepare and ask, on one HTML page, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medlens.cli.options import OUTPUT, Output, uses


@uses(OUTPUT)
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo study and index.html.")] = Path(
        "demo-output"
    ),
    *,
    output: Output,
) -> None:
    """Write a synthetic CT study, prepare it, ask test-tiny about it, and write DIR/index.html."""
    from medlens.demo.run import run_demo

    page = run_demo(out, output.reporter)
    output.note([f"demo written: {page}"])


def register(app: typer.Typer) -> None:
    app.command()(demo)
