"""DICOM input: scan every file's header, build the series, pick one, hand back a lazy stack."""

from __future__ import annotations

import warnings
from collections import Counter

from medlens.errors import InputError, NoImagesFoundError
from medlens.io.dicom_header import DicomInstance, read_instance
from medlens.io.dicom_series import SeriesCandidate, build_series, choose_series, to_stack
from medlens.io.discover import FoundFile
from medlens.io.types import ImageStack
from medlens.progress import Update as Progress


def scan_dicom(
    files: list[FoundFile], skipped: list[InputError], progress: Progress | None = None
) -> list[DicomInstance]:
    """Read every header; files that are not usable images are added to ``skipped`` with the reason."""
    instances: list[DicomInstance] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, f in enumerate(files):
            try:
                instances.append(read_instance(f.path, f.display))
            except InputError as exc:
                skipped.append(exc)
            if progress:
                progress(i + 1, len(files))
    return instances


def read_dicom(
    files: list[FoundFile],
    skipped: list[InputError],
    source: str,
    series: str | None = None,
    progress: Progress | None = None,
) -> ImageStack:
    """The chosen series of the DICOM files as an ImageStack."""
    instances = scan_dicom(files, skipped, progress)
    if not instances:
        if len(files) == 1 and files[0].display == source:  # the input is this one file: its own error
            raise skipped[-1]
        raise NoImagesFoundError(_nothing_usable(skipped), source)
    candidates = build_series(instances)
    chosen = choose_series(candidates, series, source)
    stack = to_stack(chosen, source)
    if skipped:
        stack.notes.append(skipped_summary(skipped))
    return stack


def list_series(files: list[FoundFile], skipped: list[InputError]) -> list[SeriesCandidate]:
    """Every series in the files (for ``medlens inspect``)."""
    return build_series(scan_dicom(files, skipped))


def skipped_summary(skipped: list[InputError]) -> str:
    reasons = Counter(_reason_kind(e.reason) for e in skipped)
    return f"skipped {len(skipped)} file(s): " + ", ".join(f"{n} {kind}" for kind, n in reasons.most_common())


def _nothing_usable(skipped: list[InputError]) -> str:
    if not skipped:
        return "no files found"
    examples = "; ".join(str(e) for e in skipped[:3])
    return f"no readable images ({skipped_summary(skipped)}; e.g. {examples})"


def _reason_kind(reason: str) -> str:
    return reason.split(" (")[0].split(":")[0][:60]
