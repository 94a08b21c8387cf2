"""Task results out to the hospital: a DICOM Comprehensive 3D SR in the source study, and FHIR R4 JSON."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medlens.results.fhir_out import build_fhir, validate_fhir
from medlens.results.sr import (
    DicomSourcesNeededError,
    SRBuildError,
    build_sr,
    load_sources,
    save_output,
    write_sr,
)

__all__ = [
    "DicomSourcesNeededError",
    "SRBuildError",
    "build_fhir",
    "build_sr",
    "load_sources",
    "store_sr",
    "validate_fhir",
    "write_outputs",
    "write_sr",
]


def store_sr(envelope: Mapping[str, Any] | Any, inputs: Sequence[Path | str], server: str) -> str:
    """Build the SR of ``envelope`` and store it on the configured DICOMweb ``server`` (STOW-RS), in the source
    study; returns its SOP Instance UID."""
    from medlens.io.dicomweb import store

    sr = build_sr(envelope, load_sources(inputs))
    store(server, [sr], study_uid=str(sr.StudyInstanceUID))
    return str(sr.SOPInstanceUID)


def write_outputs(
    envelope: Mapping[str, Any] | Any,
    inputs: Sequence[Path | str],
    sr_out: Path | str | None = None,
    fhir_out: Path | str | None = None,
    *,
    question: str | None = None,
) -> list[Path]:
    """Write the SR (``sr_out``) and/or the FHIR Bundle (``fhir_out``) of ``envelope``, reading the source
    DICOM headers from ``inputs`` (the files/folders the task ran on) once. Returns the paths written."""
    if sr_out is None and fhir_out is None:
        return []
    sources = load_sources(inputs)
    written: list[Path] = []
    sr_uid = None
    if sr_out is not None:
        sr = build_sr(envelope, sources, question=question)
        sr_uid = str(sr.SOPInstanceUID)
        written.append(save_output(sr_out, lambda f: sr.save_as(f, enforce_file_format=True), "the SR"))
    if fhir_out is not None:
        bundle = build_fhir(envelope, sources, question=question, sr_uid=sr_uid)
        text = (json.dumps(bundle, indent=2) + "\n").encode("utf-8")
        written.append(save_output(fhir_out, lambda f: f.write(text), "the FHIR JSON"))
    return written
