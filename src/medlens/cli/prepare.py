"""``medlens prepare`` (the exact images the model sees) and ``medlens inspect`` (what an input holds)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from medlens.cli.options import OUTPUT, STUDY, InputArg, Output, StudyChoice, slide_group, uses

if TYPE_CHECKING:
    from medlens.prep.slide_recipe import SlideOptions


@uses(STUDY, slide_group(prompt=False), OUTPUT)
def prepare(
    input: InputArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for 0001.png ... and manifest.json.")],
    study: StudyChoice,
    slide: SlideOptions,
    output: Output,
) -> None:
    """Write exactly the images the model would see (before the processor's resize) and a manifest; for a
    whole slide the patches, their level-0 coordinates and an overview.png of tissue and patches."""
    from medlens.prep import prepare_study, write_prepared

    prepared = prepare_study(input, study.recipe, study.series, study.modality, output.reporter, slide=slide)
    manifest = write_prepared(prepared, out)
    output.note(prepared.warnings)
    output.note([f"wrote {len(prepared.images)} image(s) ({prepared.modality}, {prepared.family}) and {manifest}"])


@uses(OUTPUT)
def inspect(input: InputArg, output: Output) -> None:
    """List the series of a DICOM input (UIDs shown as short hashes, usable with --series), or the pyramid of
    a whole slide (levels, mpp, magnifications; never its label or macro image)."""
    from medlens.io.dicom import list_series, skipped_summary
    from medlens.io.discover import discover
    from medlens.io.slide import find_slide

    found = discover(input)
    spec = find_slide(input, None if input.is_file() and input.suffix.lower() != ".zip" else found)
    if spec is not None:
        with spec.open() as slide:
            info = slide.summary()
        typer.echo(
            f"slide ({info['backend']}): {info['width']}x{info['height']} px, mpp {info['mpp']}, "
            f"objective {info['objective_power']}"
        )
        for i, level in enumerate(info["levels"]):
            mag = f"{level['magnification']:.3g}x" if level["magnification"] else "magnification unknown"
            typer.echo(f"  level {i}: {level['width']}x{level['height']}, downsample {level['downsample']:g}, {mag}")
        return
    for cand in list_series(found.dicom, found.skipped):
        status = "ok" if not cand.problems else f"not usable: {cand.problems[0]}"
        typer.echo(f"{cand.summary()}  [{status}]")
    if found.skipped and not output.quiet:
        typer.echo(skipped_summary(found.skipped), err=True)


def register(app: typer.Typer) -> None:
    app.command()(prepare)
    app.command()(inspect)
