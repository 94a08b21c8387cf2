"""``medlens finetune CONFIG [key=value ...]`` (LoRA / QLoRA on the recipe of :mod:`medlens.finetune.recipe`),
``medlens finetune --list-configs``, ``--accelerate-config ddp|fsdp`` and ``medlens finetune merge ADAPTER --out DIR``.

Import-light: the recipe (torch, transformers, peft, trl) is imported inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medlens import DISCLAIMER
from medlens.cli.groups import default_command_group
from medlens.errors import InputError

finetune_app = typer.Typer(
    cls=default_command_group("run"),
    help="Fine-tune MedGemma (LoRA / QLoRA) on a manifest or a benchmark's train split, prepared exactly as for "
    f"ask and eval: `medlens finetune CONFIG.yaml [key=value ...]`; see docs/finetune.md. {DISCLAIMER}",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@finetune_app.command("run")
def run_command(
    config: Annotated[str | None, typer.Argument(help="Config YAML file, or a shipped config name.")] = None,
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Overrides as dotted KEY=VALUE, e.g. train.lr=1e-4 data.limit=50.")
    ] = None,
    list_configs: Annotated[bool, typer.Option("--list-configs", help="List the shipped configs.")] = False,
    accelerate_config: Annotated[
        str | None, typer.Option(help="Print the path of a shipped Accelerate config (ddp, fsdp) and exit.")
    ] = None,
) -> None:
    """Run the fine-tuning recipe: setup, data (+ overlap guard, memory estimate), train, save, cleanup."""
    from medlens.finetune.config import shipped_configs

    if list_configs:
        for name, path in shipped_configs().items():
            typer.echo(f"{name}\t{path}")
        return
    if accelerate_config is not None:
        typer.echo(_accelerate_config(accelerate_config))
        return
    if config is None:
        raise InputError("give a config file or name (medlens finetune --list-configs)")
    from medlens.api import finetune

    def say(line: str) -> None:
        typer.echo(line, err=True)

    result = finetune(config, overrides or [], say=say)
    typer.echo(f"adapter: {result.adapter_dir} ({result.steps} steps)")
    if result.losses:
        typer.echo(f"loss: {result.losses[0]:.4f} -> {result.losses[-1]:.4f} (log: {result.run_dir}/train_log.jsonl)")
    if result.merged_dir:
        typer.echo(f"merged model: {result.merged_dir}")
    typer.echo(DISCLAIMER)


@finetune_app.command("merge")
def merge_command(
    adapter: Annotated[Path, typer.Argument(help="Adapter folder written by medlens finetune.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the merged model.")],
    base: Annotated[str | None, typer.Option(help="Base model (default: the one the adapter names).")] = None,
    device: Annotated[str, typer.Option(help="Device to merge on.")] = "cpu",
) -> None:
    """Merge an adapter into its base model and save a model folder (`medlens ask --model DIR` runs it)."""
    from medlens.finetune.adapter import merge

    typer.echo(f"merged model: {merge(adapter, out, base, device)}")
    typer.echo(DISCLAIMER)


def _accelerate_config(name: str) -> Path:
    from importlib.resources import files

    folder = Path(str(files("medlens.finetune").joinpath("configs", "accelerate")))
    found = {p.stem: p for p in folder.glob("*.yaml")}
    if name not in found:
        raise InputError(f"no shipped Accelerate config {name!r} (shipped: {', '.join(sorted(found))})")
    return found[name]


def register(app: typer.Typer) -> None:
    """Add ``medlens finetune`` to the app."""
    app.add_typer(finetune_app, name="finetune")
