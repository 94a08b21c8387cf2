"""Group DICOM instances into series, order each geometrically, check it is one volume, pick one."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from medlens.errors import InconsistentSeriesError, SeriesSelectionError
from medlens.io import geometry
from medlens.io.dicom_header import DicomInstance
from medlens.io.dicom_pixels import FrameEntry, FrameReader
from medlens.io.types import ImageStack, SliceRef
from medlens.privacy import matches_uid, short_hash

#: MedGemma 1.5 volumes were axial with at most 512x512 pixels per slice (docs/recipe.md, Reading)
TRAINING_MAX_SIDE = 512


@dataclass
class SeriesCandidate:
    """One series, its frames in geometric order, and anything that stops it being one volume."""

    uid: str
    study_uid: str
    modality: str
    description: str
    series_number: int | None
    entries: list[FrameEntry]
    z: list[float | None] = field(default_factory=list)
    orientation: tuple[float, ...] | None = None
    slice_spacing: float | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def tag(self) -> str:
        return short_hash(self.uid)

    @property
    def rows(self) -> int:
        return self.entries[0].instance.image_rows

    @property
    def columns(self) -> int:
        return self.entries[0].instance.image_columns

    @property
    def is_color(self) -> bool:
        return self.entries[0].instance.is_color

    @property
    def plane(self) -> str:
        return geometry.plane_name(self.orientation) if self.orientation else "2-D"

    @property
    def like_training(self) -> bool:
        """Axial (or plain 2-D) and at most 512x512, as MedGemma 1.5's volumes were."""
        return self.plane in ("axial", "2-D") and max(self.rows, self.columns) <= TRAINING_MAX_SIDE

    def summary(self) -> str:
        return f"{self.tag} {self.modality} {len(self.entries)} image(s) {self.plane} {self.columns}x{self.rows}" + (
            f' "{self.description}"' if self.description else ""
        )


def build_series(instances: Sequence[DicomInstance]) -> list[SeriesCandidate]:
    """Group by SeriesInstanceUID; order and check each group."""
    groups: dict[str, list[DicomInstance]] = defaultdict(list)
    for inst in instances:
        groups[inst.series_uid].append(inst)
    out = []
    for uid, members in groups.items():
        first = members[0]
        entries = [
            FrameEntry(inst, i if len(inst.frames) > 1 else None, geo)
            for inst in members
            for i, geo in enumerate(inst.frames)
        ]
        cand = SeriesCandidate(uid, first.study_uid, first.modality, first.description, first.series_number, entries)
        _order_and_check(cand)
        _check_layouts(cand, members)
        out.append(cand)
    return sorted(out, key=lambda c: (c.series_number is None, c.series_number or 0, c.uid))


def _order_and_check(cand: SeriesCandidate) -> None:
    entries = cand.entries
    sizes = {(e.instance.image_rows, e.instance.image_columns) for e in entries}
    if len(sizes) > 1:
        shown = ", ".join(f"{c}x{r}" for r, c in sorted(sizes))
        cand.problems.append(f"slices of different sizes in one series ({shown})")
    if len({e.instance.is_color for e in entries}) > 1:
        cand.problems.append("colour and grey-level images mixed in one series")
    oriented = [e for e in entries if e.geometry.position is not None and e.geometry.orientation is not None]
    if len(entries) > 1 and len(oriented) == len(entries):
        first = entries[0].geometry.orientation
        assert first is not None
        if not all(geometry.same_orientation(e.geometry.orientation, first) for e in entries):  # type: ignore[arg-type]
            planes = {geometry.plane_name(e.geometry.orientation) for e in entries}  # only to say which
            cand.problems.append(f"mixed slice orientations in one series ({', '.join(sorted(planes))})")
        normal = geometry.slice_normal(first)
        z = geometry.positions_along(normal, [e.geometry.position for e in entries])  # type: ignore[misc]
        order = np.lexsort((np.arange(len(entries)), z))
        cand.entries = [entries[i] for i in order]
        cand.z = [float(z[i]) for i in order]
        cand.orientation = first
        spacing, problem = geometry.spacing_problem(np.asarray(cand.z))
        cand.slice_spacing = spacing
        if problem and not cand.problems:
            cand.problems.append(problem)
        return
    cand.orientation = entries[0].geometry.orientation if len(entries) == 1 else None
    cand.entries = sorted(entries, key=lambda e: (e.instance.instance_number or 0, e.frame or 0))
    cand.z = [None] * len(cand.entries)
    if len(entries) > 1:
        cand.notes.append(
            f"series {cand.tag}: no ImagePositionPatient/ImageOrientationPatient on every image; "
            "ordered by InstanceNumber and frame"
        )


def _check_layouts(cand: SeriesCandidate, members: Sequence[DicomInstance]) -> None:
    """Frames that are not slices (a cine clip ...) come first among the problems; MOSAICs get a note."""
    layout = [p for p in dict.fromkeys(m.layout_problem for m in members) if p]
    cand.problems[:0] = layout
    mosaics = [m.mosaic for m in members if m.mosaic is not None]
    if mosaics:
        cand.notes = [n for n in cand.notes if "no ImagePositionPatient" not in n]
        cand.notes.append(
            f"series {cand.tag}: Siemens MOSAIC untiled into {sum(m.count for m in mosaics)} slice(s) of "
            f"{mosaics[0].tile_columns}x{mosaics[0].tile_rows}, in tile order (CSA slice positions not used)"
        )


def choose_series(candidates: list[SeriesCandidate], wanted: str | None, source: str) -> SeriesCandidate:
    """The series the user named, else the one most like MedGemma's training data; says why in its notes."""
    if wanted:
        matches = [c for c in candidates if matches_uid(c.uid, wanted)]
        if not matches:
            listing = "; ".join(c.summary() for c in candidates)
            raise SeriesSelectionError(f"series {wanted!r} is not in the input (series here: {listing})", source)
        chosen = matches[0]
        if chosen.problems:
            raise InconsistentSeriesError(f"series {chosen.tag}: {chosen.problems[0]}", source)
        chosen.notes.append(f"using series {chosen.summary()} as requested")
        return chosen
    studies = {c.study_uid for c in candidates}
    if len(studies) > 1:
        listing = "; ".join(c.summary() for c in candidates)
        raise SeriesSelectionError(
            f"input holds {len(studies)} different studies; pass --series with one of: {listing}", source
        )
    usable = [c for c in candidates if not c.problems]
    if not usable:
        detail = "; ".join(f"series {c.tag}: {c.problems[0]}" for c in candidates)
        raise InconsistentSeriesError(detail if len(candidates) == 1 else f"no usable series ({detail})", source)
    preferred = [c for c in usable if c.like_training]
    pool = preferred or usable
    chosen = max(pool, key=lambda c: (len(c.entries), -(c.series_number or 0)))
    if len(candidates) > 1:
        why = (
            "the most images among axial series of at most 512x512"
            if preferred
            else "the most images (no series is axial with at most 512x512 pixels, as MedGemma 1.5's were)"
        )
        chosen.notes.append(f"picked series {chosen.summary()} out of {len(candidates)}: {why}")
        for c in candidates:
            if c.problems:
                chosen.notes.append(f"series {c.tag} not usable: {c.problems[0]}")
    elif len(chosen.entries) > 1 and not chosen.like_training:
        chosen.notes.append(
            f"series {chosen.tag} is {chosen.plane} {chosen.columns}x{chosen.rows}; "
            "MedGemma 1.5's volumes were axial with at most 512x512 pixels"
        )
    return chosen


def to_stack(cand: SeriesCandidate, source: str) -> ImageStack:
    """An ImageStack whose loader decodes only the requested frames of the chosen series."""
    from medlens.io.dicom_identity import read_identity

    entries = cand.entries
    color = cand.is_color
    slices = [
        SliceRef(
            file=e.instance.display,
            sop_instance_uid=e.instance.sop_instance_uid,
            frame=e.frame,
            z=z,
            voi=e.geometry.voi,
            invert=e.instance.invert,
            instance_number=e.instance.instance_number,
        )
        for e, z in zip(entries, cand.z, strict=True)
    ]
    first = entries[0].instance
    reader = FrameReader(entries, color)  # compressed frames decode in the worker pool, a window ahead
    return ImageStack(
        modality=cand.modality,
        source=source,
        slices=slices,
        loader=reader.load,
        prefetch=reader.prefetch,
        rows=cand.rows,
        columns=cand.columns,
        is_color=color,
        series_uid=cand.uid,
        study_uid=cand.study_uid,
        description=cand.description,
        pixel_spacing=first.pixel_spacing,
        slice_spacing=cand.slice_spacing,
        orientation=cand.orientation,
        acquired=min((e.instance.acquisition for e in entries if e.instance.acquisition), default=None),
        identity=read_identity(e.instance.dataset for e in entries),
        notes=list(cand.notes),
    )
