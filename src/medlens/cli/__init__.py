"""The ``medlens`` command line. Exit codes: 0 success, 2 bad input or usage (one line on stderr), 1 bugs,
130 / 143 interrupted by SIGINT (Ctrl-C) / SIGTERM (one line: what was saved, how to resume).

One module per command group, each with ``register(app)``; a new group (serve, finetune, batch ...) is a
module added to :data:`COMMAND_GROUPS`. Shared options are declared once in :mod:`medlens.cli.options`.
Building the app imports no model library: ``medlens --help`` stays fast.
"""

from __future__ import annotations

import sys

import typer

from medlens import DISCLAIMER
from medlens.cli import ask, batch, deid, demo, evaluate, finetune, overlap, prepare, serve, siglip
from medlens.errors import MedlensError
from medlens.interrupts import Interrupted, install_handlers

#: the command groups, in the order ``medlens --help`` lists them
COMMAND_GROUPS = (prepare, ask, evaluate, batch, siglip, demo, serve, deid, overlap, finetune)

app = typer.Typer(
    name="medlens",
    help=f"Run MedGemma on DICOM, NIfTI and image studies, prepared as MedGemma 1.5 expects. {DISCLAIMER}",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
for _group in COMMAND_GROUPS:
    _group.register(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point: typed medlens errors become one line on stderr and exit code 2; SIGINT / SIGTERM one line
    saying what was saved and exit code 130 / 143."""
    install_handlers()
    try:
        code = app(args=argv, standalone_mode=False)
    except MedlensError as exc:
        typer.echo(f"medlens: error: {exc}".replace("\n", " "), err=True)
        sys.exit(2)
    except Interrupted as exc:
        typer.echo(f"medlens: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("medlens: interrupted", err=True)
        sys.exit(130)
    except typer.exceptions.TyperException as exc:  # usage errors: typer prints them, exit code 2
        show = getattr(exc, "show", None)
        if show is None:
            raise
        show()
        sys.exit(getattr(exc, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)
