"""What makes two studies comparable, read from DICOM headers: patient (hashed), body part, view, laterality."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from medlens.privacy import short_hash

#: identity key -> the header keywords it is read from (first present wins); hashed keys never keep raw values
_FIELDS: dict[str, tuple[str, ...]] = {
    "patient": ("PatientID",),
    "issuer": ("IssuerOfPatientID",),
    "body_part": ("BodyPartExamined",),
    "view": ("ViewPosition",),
    "laterality": ("ImageLaterality", "Laterality"),
}
_HASHED = frozenset({"patient", "issuer"})


def read_identity(datasets: Iterable[Any], limit: int = 8) -> dict[str, str]:
    """The comparability fields of a series from its first ``limit`` header datasets; patient IDs and issuers
    are kept only as short SHA-256 hashes. Fields no header gives are absent."""
    found: dict[str, str] = {}
    for n, ds in enumerate(datasets):
        if n >= limit or len(found) == len(_FIELDS):
            break
        for key, keywords in _FIELDS.items():
            if key in found:
                continue
            for keyword in keywords:
                try:
                    value = str(ds.get(keyword, "") or "").strip()
                except (NotImplementedError, ValueError, KeyError, TypeError):  # a damaged element: as absent
                    continue
                if value:
                    found[key] = short_hash(value) if key in _HASHED else value.upper()
                    break
    return found
