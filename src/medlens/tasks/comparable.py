"""Whether several prepared studies may be compared: one patient, one body part, one view and side.

Rules (docs/tasks.md "Comparing studies"): a difference in patient ID (hashed), body part, view or laterality
is an :class:`~medlens.errors.InputError` naming both inputs and the field; ``allow_different_patients`` turns
only the patient mismatch into a warning. AP vs PA is a warning (portable follow-ups of a PA study are common).
A field a header does not give cannot be checked: that is a warning, as are inputs with no DICOM header at all."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medlens.errors import InputError

#: view pairs that differ only in beam direction: compared with a warning
_FRONTAL = frozenset({"AP", "PA"})
_LABELS = {"body_part": "BodyPartExamined", "view": "ViewPosition", "laterality": "laterality"}


def check_comparable(
    inputs: Sequence[Path], studies: Sequence[Any], allow_different_patients: bool = False
) -> list[str]:
    """Warnings for what could not be checked or is allowed; raise ``InputError`` for what is not comparable.
    ``studies`` are :class:`~medlens.prep.Prepared` (their ``identity``), ``inputs`` the paths in the same order."""
    warnings: list[str] = []
    ids = [dict(s.identity) for s in studies]
    silent = [str(p) for p, i in zip(inputs, ids, strict=True) if not i]
    if silent:
        warnings.append(
            f"no DICOM identity header in {', '.join(silent)}: patient, body part and view could not be checked"
        )
    a_path, first = inputs[0], ids[0]
    for path, other in zip(inputs[1:], ids[1:], strict=True):
        pair = f"{a_path} and {path}"
        warnings += _patients(pair, first, other, allow_different_patients)
        for key, label in _LABELS.items():
            x, y = first.get(key), other.get(key)
            if x is None or y is None:
                if first and other and (x or y):
                    warnings.append(f"{label} is missing on one of {pair}: not checked")
                continue
            if x == y:
                continue
            if key == "view" and {x, y} <= _FRONTAL:
                warnings.append(
                    f"{pair} differ in ViewPosition ({x} vs {y}): AP and PA compared; magnification differs"
                )
                continue
            raise InputError(f"{pair} are not comparable: {label} differs ({x} vs {y})")
    return warnings


def _patients(pair: str, a: dict[str, str], b: dict[str, str], allow: bool) -> list[str]:
    """Patient check on hashed IDs; the issuer only qualifies the message when both inputs give one."""
    pa, pb = a.get("patient"), b.get("patient")
    if pa is None or pb is None:
        return [f"PatientID is missing on one of {pair}: same patient not checked"] if a and b else []
    ia, ib = a.get("issuer"), b.get("issuer")
    if pa == pb and (ia is None or ib is None or ia == ib):
        return []
    reason = f"PatientID differs (hash {pa} vs {pb})" if pa != pb else "the same PatientID"
    if ia and ib and ia != ib:
        reason += f" and IssuerOfPatientID differs (hash {ia} vs {ib})"
    message = f"{pair} may be different patients: {reason}"
    if allow:
        return [f"{message}; compared anyway (allow_different_patients)"]
    raise InputError(f"{message}; pass --allow-different-patients to compare them anyway")
