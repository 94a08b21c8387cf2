"""``medlens deid``: de-identify DICOM files and folders (PS3.15 Basic Application Level Confidentiality Profile)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medlens.cli.options import OUTPUT, Output, print_json, uses
from medlens.errors import MedlensError


@uses(OUTPUT)
def deid(
    source: Annotated[Path, typer.Argument(help="A DICOM file or a folder of them.", show_default=False)],
    out: Annotated[Path, typer.Argument(help="The output folder (new or empty).", show_default=False)],
    shift_dates: Annotated[
        int | None,
        typer.Option(
            "--shift-dates",
            metavar="DAYS",
            min=1,
            help="Shift dates back by a per-patient offset of 1..DAYS days (default: dates removed).",
        ),
    ] = None,
    keep_dates: Annotated[bool, typer.Option("--keep-dates", help="Keep dates as they are.")] = False,
    allow_burned_in: Annotated[
        bool,
        typer.Option(
            "--allow-burned-in",
            help="De-identify images that may carry burned-in text (BurnedInAnnotation YES, or absent for "
            "US/SC/XA/ES and secondary captures); their text stays in the pixels.",
        ),
    ] = False,
    salt_file: Annotated[
        Path | None,
        typer.Option(
            "--salt-file",
            metavar="FILE",
            help="Key for UIDs, names and date offsets, so runs agree (created with a random key if missing; "
            "keep it private). Default: a new random key per run.",
        ),
    ] = None,
    *,
    output: Output,
) -> None:
    """De-identify DICOM files: private tags removed, identifying attributes emptied or removed, UIDs
    replaced consistently, dates removed or shifted; pixel data untouched. Prints a JSON summary."""
    from medlens.io.deid import DeidOptions, deidentify, read_salt

    if shift_dates is not None and keep_dates:
        raise MedlensError("--shift-dates and --keep-dates exclude each other")
    dates = "shift" if shift_dates is not None else "keep" if keep_dates else "remove"
    options = DeidOptions(
        dates=dates,
        shift_days=shift_dates or 0,
        allow_burned_in=allow_burned_in,
        salt=read_salt(salt_file) if salt_file else None,
    )
    report = deidentify(source, out, options)
    notes = [f"de-identified {report.files} file(s) into {report.output}"]
    if report.skipped:
        notes.append(f"skipped {len(report.skipped)} file(s) that are not DICOM images (or a DICOMDIR)")
    if report.burned_in_allowed:
        notes.append(
            f"{report.burned_in_allowed} file(s) may still show identifying text in their pixels "
            "(marked PatientIdentityRemoved NO)"
        )
    output.note(notes)
    print_json(report.as_dict())


def register(app: typer.Typer) -> None:
    app.command()(deid)
