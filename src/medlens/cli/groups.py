"""Command groups with a default subcommand: ``medlens probe DATA`` runs ``probe fit``, ``medlens finetune
CONFIG`` runs ``finetune run``, while ``medlens probe apply ...`` and ``medlens finetune merge ...`` still reach
their own subcommands."""

from __future__ import annotations

import click
from typer.core import TyperGroup


def default_command_group(command: str) -> type[TyperGroup]:
    """A typer group class whose first argument, when it names no subcommand (and is not --help), goes to
    ``command``."""

    class DefaultCommandGroup(TyperGroup):
        default_command = command

        def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
            if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
                args = [self.default_command, *args]
            return super().parse_args(ctx, args)

    return DefaultCommandGroup
