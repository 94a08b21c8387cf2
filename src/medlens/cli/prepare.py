"""``medlens prepare`` (exactly what the model would get) and ``medlens inspect`` (what an input holds).

``prepare`` writes, per input kind: the prepared images of a study or slide; the page images of a PDF as the
lab-extract task renders them; or, for a FHIR bundle / clinical notes, ``summary.txt`` with the text the ehr-qa
task puts in its prompt. A manifest.json goes with each.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from medlens.cli.options import INPUT_HELP, OUTPUT, STUDY, Output, StudyChoice, slide_group, uses
from medlens.registry import Registry

if TYPE_CHECKING:
    from medlens.prep.slide_recipe import SlideOptions

#: a path, or a study on a configured DICOMweb server (kept as text: a Path would fold its ``//``)
SourceArg = Annotated[
    str, typer.Argument(help=INPUT_HELP + " Or dicomweb://SERVER/STUDY_UID[/SERIES_UID] (see --dicomweb-config).")
]
DicomwebConfig = Annotated[
    Path | None,
    typer.Option(
        "--dicomweb-config",
        help="DICOMweb servers file (default $MEDLENS_DICOMWEB_CONFIG or ~/.config/medlens/dicomweb.toml).",
    ),
]

#: where the ehr-qa question goes in summary.txt (prepare has no question)
QUESTION_PLACEHOLDER = "<your question>"


Writer = Callable[..., str]
#: what ``prepare`` writes for an input kind other than an image study: kind -> writer returning a note
WRITERS: Registry[Writer] = Registry("prepare writer")


def _parts(build: Any, kind: str) -> list[Any]:
    """The ``kind`` ("image" or "text") parts of a task build's messages, in prompt order."""
    return [p[kind] for r in build.requests for m in r.messages for p in m["content"] if p["type"] == kind]


@WRITERS.register("pdf")
def write_pdf(path: Path, out: Path, overwrite: bool, dpi: int, token_budget: int) -> str:
    """The pages as the lab-extract task renders them (same reader, same dpi)."""
    from medlens.prep import write_prepared
    from medlens.prep.prepared import Prepared
    from medlens.tasks import TaskOptions, get_task

    build = get_task("lab-extract").build([path], "", TaskOptions(dpi=dpi))
    pages = _parts(build, "image")
    prepared = Prepared(
        recipe="lab-extract",
        modality="document",
        family="document",
        images=pages,
        slices=[],
        source=str(path),
        series_uid=None,
        n_source_slices=len(pages),
        warnings=list(build.warnings),
        image_meta=[{"page": n, "dpi": dpi, "width": p.shape[1], "height": p.shape[0]} for n, p in enumerate(pages, 1)],
        meta={"task": "lab-extract", "dpi": dpi},
    )
    manifest = write_prepared(prepared, out, overwrite)
    return f"wrote {len(pages)} page image(s) at {dpi} dpi and {manifest}"


@WRITERS.register("fhir")
@WRITERS.register("notes")
def write_record(path: Path, out: Path, overwrite: bool, dpi: int, token_budget: int) -> str:
    """summary.txt: the prompt text of the ehr-qa task (the question replaced by a placeholder)."""
    from medlens.prep import write_prepared
    from medlens.prep.prepared import Prepared
    from medlens.tasks import TaskOptions, get_task

    build = get_task("ehr-qa").build([path], QUESTION_PLACEHOLDER, TaskOptions(token_budget=token_budget))
    text = "\n".join(_parts(build, "text"))
    details = build.details
    prepared = Prepared(
        recipe="ehr-qa",
        modality="record",
        family="record",
        images=[],
        slices=[],
        source=str(path),
        series_uid=None,
        n_source_slices=0,
        warnings=list(build.warnings),
        image_meta=[],
        meta={
            "task": "ehr-qa",
            "summary": "summary.txt",
            "question_placeholder": QUESTION_PLACEHOLDER,
            **{
                k: details[k]
                for k in ("summary_tokens", "token_budget", "entries_total", "entries_kept")
                if k in details
            },
        },
    )
    manifest = write_prepared(prepared, out, overwrite, texts={"summary.txt": text + "\n"})
    return f"wrote summary.txt ({details.get('summary_tokens')} estimated tokens) and {manifest}"


@uses(STUDY, slide_group(prompt=False), OUTPUT)
def prepare(
    input: SourceArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for 0001.png ... and manifest.json.")],
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the output of an earlier prepare in --out.")
    ] = False,
    dpi: Annotated[int, typer.Option(min=50, max=600, help="PDF: resolution pages are rendered at.")] = 150,
    token_budget: Annotated[
        int, typer.Option(min=200, help="FHIR/notes: tokens the patient summary must fit in.")
    ] = 6000,
    dicomweb_config: DicomwebConfig = None,
    *,
    study: StudyChoice,
    slide: SlideOptions,
    output: Output,
) -> None:
    """Write exactly what the model would get and a manifest: the images of a study (before the processor's
    resize); for a whole slide the patches, their level-0 coordinates and an overview.png; for a PDF the page
    images; for a FHIR bundle or notes summary.txt, the text the ehr-qa prompt holds."""
    from medlens.interrupts import on_interrupt
    from medlens.io.discover import document_kind, unsafe_members
    from medlens.warnings_capture import capture_warnings

    use_dicomweb_config(dicomweb_config)
    remote = input.startswith("dicomweb:")
    source: Any = input if remote else Path(input)
    if not remote and source.is_file() and source.suffix.lower() == ".zip":
        output.note(unsafe_members(source))
    kind = None if remote else document_kind(source)  # pdf, fhir or notes; None for an image study or slide
    untouched = f"interrupted: {out} left as it was (written only when complete); rerun to prepare"
    warnings: list[str] = []
    with on_interrupt(lambda: untouched), capture_warnings() as caught:
        if kind is not None:
            done = WRITERS.get(kind)(source, out, overwrite, dpi, token_budget)
        else:
            from medlens.prep import prepare_study, write_prepared

            prepared = prepare_study(source, study.recipe, study.series, study.modality, output.reporter, slide=slide)
            manifest = write_prepared(prepared, out, overwrite)
            warnings = prepared.warnings
            done = f"wrote {len(prepared.images)} image(s) ({prepared.modality}, {prepared.family}) and {manifest}"
    output.note([*warnings, *(w for w in caught if w not in warnings), done])


@uses(OUTPUT)
def inspect(input: SourceArg, output: Output, dicomweb_config: DicomwebConfig = None) -> None:
    """Describe an input: the series of a DICOM input (UIDs as short hashes, usable with --series), a NIfTI's
    geometry, an image's size, a PDF's pages, a FHIR bundle's resources, a slide's pyramid (never its label
    or macro image); the series of a dicomweb:// study. An input that cannot be read exits 2 with the reason."""
    use_dicomweb_config(dicomweb_config)
    if input.startswith("dicomweb:"):
        from medlens.io.dicomweb import describe_dicomweb

        for line in describe_dicomweb(input):
            typer.echo(line)
        return
    from medlens.io.describe import describe

    described = describe(Path(input))
    for line in described.lines:
        typer.echo(line)
    output.note(described.warnings)


def use_dicomweb_config(path: Path | None) -> None:
    """``--dicomweb-config FILE``: the same as MEDLENS_DICOMWEB_CONFIG=FILE for this command."""
    if path is not None:
        import os

        from medlens.io.dicomweb_config import ENV

        os.environ[ENV] = str(path)


def register(app: typer.Typer) -> None:
    app.command()(prepare)
    app.command()(inspect)
