"""``medlens batch MANIFEST --task T --model M --out DIR``: one result envelope per manifest row, in this process
or on a Ray cluster (``--ray``); resumable (rerun the same command). See docs/batch.md."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from medlens import DISCLAIMER
from medlens.cli.ask import MODEL_HELP, declared_task_options, task_option_group, task_settings
from medlens.cli.options import (
    OUTPUT,
    STUDY,
    ModelChoice,
    Output,
    StudyChoice,
    model_group,
    print_json,
    slide_group,
    uses,
)
from medlens.cli.prepare import DicomwebConfig, use_dicomweb_config
from medlens.errors import MedlensError

if TYPE_CHECKING:
    from medlens.prep.slide_recipe import SlideOptions

RAY_PANEL = "Ray"


@uses(model_group("test-tiny", MODEL_HELP), STUDY, task_option_group(), slide_group(prompt=True), OUTPUT)
def batch(
    manifest: Annotated[Path, typer.Argument(help="JSONL or CSV manifest: one row per study or question.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (results, errors, journal).")],
    task: Annotated[
        str | None, typer.Option("--task", "-t", help="Task of the rows that name none (see `medlens tasks`).")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="jsonl, or parquet (results.parquet as well).")] = "jsonl",
    batch_size: Annotated[int, typer.Option(min=1, help="Rows answered per generate call.")] = 8,
    instruction: Annotated[str | None, typer.Option(help="Replace the text placed before the images.")] = None,
    think: Annotated[bool, typer.Option("--think", help="Switch on MedGemma's thinking mode.")] = False,
    max_new_tokens: Annotated[int | None, typer.Option(min=1, help="Cap on generated tokens.")] = None,
    deid: Annotated[
        bool | None,
        typer.Option(
            "--deid/--no-deid",
            help="De-identify the text sent to the model (default: on for a remote engine, off for local ones).",
        ),
    ] = None,
    allow_burned_in: Annotated[
        bool,
        typer.Option(
            "--allow-burned-in",
            help="Send images that may carry burned-in text to a remote engine anyway (refused by default).",
        ),
    ] = False,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            metavar="ADDRESS",
            help="Run on Ray: local (a private Ray on this machine), auto (the cluster this machine is in) or "
            "host:port / ray://host:port.",
            rich_help_panel=RAY_PANEL,
        ),
    ] = None,
    replicas: Annotated[
        int | None, typer.Option(min=1, help="Model replicas (actors) on Ray (default 1).", rich_help_panel=RAY_PANEL)
    ] = None,
    gpus_per_replica: Annotated[
        float | None, typer.Option(min=0, help="GPUs per model replica (default 0).", rich_help_panel=RAY_PANEL)
    ] = None,
    cpus_per_prepare: Annotated[
        float | None,
        typer.Option(min=0.1, help="CPUs per preparing task on Ray (default 1).", rich_help_panel=RAY_PANEL),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    dicomweb_config: DicomwebConfig = None,
    *,
    model: ModelChoice,
    study: StudyChoice,
    task_values: dict[str, Any],
    slide: SlideOptions,
    output: Output,
) -> None:
    """Run a task over every row of a manifest; writes DIR/results.jsonl (one envelope per row that
    succeeded), DIR/errors.jsonl (the rows that failed, why) and, with --format parquet, DIR/results.parquet.
    Rerun the same command to resume: journaled rows are reused, only the rest is done."""
    from medlens.batch import run_batch
    from medlens.tasks import TaskOptions, get_task
    from medlens.tasks.runner import ALLOW_BURNED_IN

    use_dicomweb_config(dicomweb_config)
    settings = _task_settings(task, task_values)
    if allow_burned_in:
        settings["extra"] = {**settings.get("extra", {}), ALLOW_BURNED_IN: True}
    if task is not None:
        get_task(task)  # an unknown --task fails before anything is read
    options = TaskOptions(
        recipe=study.recipe,
        series=study.series,
        modality=study.modality,
        instruction=instruction,
        thinking=think,
        max_new_tokens=max_new_tokens,
        deid=deid,
        slide=slide,
        **settings,
    )
    summary = run_batch(
        manifest,
        model=model.name or "test-tiny",
        out_dir=out,
        task=task,
        engine=model.engine,
        backend_options=model.engine_options(),
        ray=_ray_settings(ray, replicas, gpus_per_replica, cpus_per_prepare),
        batch_size=batch_size,
        fmt=fmt,
        options=options,
        reporter=output.reporter,
    )
    if as_json:
        print_json(summary)
    else:
        for line in summary_lines(summary):
            typer.echo(line)
    output.note(summary.get("warnings", []))


def _task_settings(task: str | None, values: dict[str, Any]) -> dict[str, Any]:
    """The task options given on the command line: checked against --task when given (an option of another
    task is an error), else any task's option applies to the rows whose task takes it."""
    if values.get("overlay") is not None:
        raise MedlensError("--overlay writes one file and is not available in batch (use medlens ask)")
    if task is not None:
        from medlens.tasks import get_task

        return task_settings(get_task(task), values)
    from medlens.tasks import TaskOptions

    given = {name: value for name, value in values.items() if value is not None and name in declared_task_options()}
    extra = {k: v for k, v in given.items() if k not in TaskOptions.__dataclass_fields__}
    fields = {k: v for k, v in given.items() if k not in extra}
    return {**fields, "extra": extra} if extra else fields


def _ray_settings(address: str | None, replicas: int | None, gpus: float | None, cpus: float | None) -> Any:
    """The :class:`~medlens.pipeline.RaySettings` of ``--ray`` and its sizes; None without ``--ray`` (then the
    sizes, which mean nothing locally, are refused)."""
    chosen = {"replicas": replicas, "gpus_per_replica": gpus, "cpus_per_prepare": cpus}
    if address is None:
        if any(v is not None for v in chosen.values()):
            raise MedlensError("--replicas, --gpus-per-replica and --cpus-per-prepare go with --ray ADDRESS")
        return None
    if not address.strip():
        raise MedlensError("--ray needs an address: local, auto or host:port")
    from medlens.pipeline import RaySettings

    return RaySettings(address=address.strip(), **{k: v for k, v in chosen.items() if v is not None})


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The run in a few lines: counts, time, the files written, the disclaimer."""
    lines = [
        f"batch: {summary['rows']} rows: {summary['ok']} results ({summary['done']} made, {summary['reused']} "
        f"reused from the journal), {summary['failed']} failed; {summary['wall_s']:.1f} s ({summary['runner']})"
    ]
    lines += [f"wrote {path}" for name, path in summary["paths"].items() if name != "journal.jsonl"]
    lines.append(DISCLAIMER)
    return lines


def register(app: typer.Typer) -> None:
    app.command()(batch)
