"""Pure geometry of slice stacks: normals, positions along them, and the checks a volume must pass."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: |normal . z| above this counts as axial (allows gantry tilt up to ~35 degrees)
AXIAL_COSINE = 0.8
#: two orientations differ when a direction cosine differs by more than this (~0.6 degrees)
ORIENTATION_TOLERANCE = 0.01
#: slice gaps may differ from the median by this fraction (or SPACING_ABS_MM, whichever is larger)
SPACING_REL_TOLERANCE = 0.02
SPACING_ABS_MM = 0.01


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal of a slice from ImageOrientationPatient (row x column cosines), signed so that its
    largest component is positive: stacks then run inferior->superior (axial), anterior->posterior
    (coronal) or right->left (sagittal) whatever the scanner's row/column convention."""
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:6], float)
    normal = np.cross(row, col)
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        raise ValueError("degenerate ImageOrientationPatient")
    normal /= norm
    return -normal if normal[np.argmax(np.abs(normal))] < 0 else normal


def same_orientation(a: Sequence[float], b: Sequence[float]) -> bool:
    return bool(np.max(np.abs(np.asarray(a, float) - np.asarray(b, float))) <= ORIENTATION_TOLERANCE)


def is_axial(orientation: Sequence[float]) -> bool:
    return abs(float(slice_normal(orientation)[2])) >= AXIAL_COSINE


def plane_name(orientation: Sequence[float] | None) -> str:
    if orientation is None:
        return "unknown"
    axis = int(np.argmax(np.abs(slice_normal(orientation))))
    return ("sagittal", "coronal", "axial")[axis]


def positions_along(normal: np.ndarray, positions: Sequence[Sequence[float]]) -> np.ndarray:
    """Distance of each ImagePositionPatient along the normal, in mm."""
    return np.asarray(positions, float) @ normal


def spacing_problem(z_sorted: np.ndarray) -> tuple[float | None, str | None]:
    """The slice spacing of sorted positions, and a description of what is wrong with it (or None)."""
    if len(z_sorted) < 2:
        return None, None
    gaps = np.diff(z_sorted)
    if np.any(gaps < 1e-3):
        n_dup = int(np.sum(gaps < 1e-3))
        return None, f"{n_dup} slice position(s) repeated (several acquisitions or phases in one series?)"
    median = float(np.median(gaps))
    tolerance = max(SPACING_REL_TOLERANCE * median, SPACING_ABS_MM)
    worst = float(np.max(np.abs(gaps - median)))
    if worst > tolerance:
        return median, (
            f"inconsistent slice spacing: gaps from {gaps.min():.3g} to {gaps.max():.3g} mm "
            f"(median {median:.3g} mm; missing slices or variable thickness)"
        )
    return median, None
