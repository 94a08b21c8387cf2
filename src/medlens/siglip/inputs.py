"""Inputs of the MedSigLIP commands: studies (anything ``medlens.prep.prepare_study`` reads) and CSV lists of
them (columns ``path,label``, paths relative to the CSV), embedded one study at a time."""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medlens.errors import InputError, NotFoundError
from medlens.prep import DEFAULT_RECIPE, prepare_study
from medlens.progress import Reporter
from medlens.siglip.encoder import SiglipEncoder
from medlens.siglip.zeroshot import pool_embeddings

CSV_SUFFIX = ".csv"
PATH_COLUMN = "path"
LABEL_COLUMN = "label"


@dataclass(frozen=True)
class InputRef:
    """One study to read, with its label when a CSV gave one."""

    path: Path
    label: str | None = None

    @property
    def source(self) -> str:
        return str(self.path)


def read_label_csv(csv_path: str | Path, require_label: bool = True) -> list[InputRef]:
    """The rows of a ``path,label`` CSV (paths relative to the CSV's folder unless absolute)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise NotFoundError("no such CSV file", str(csv_path))
    needed = (PATH_COLUMN, LABEL_COLUMN) if require_label else (PATH_COLUMN,)
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [(c or "").strip().lower() for c in reader.fieldnames or []]
            missing = [c for c in needed if c not in columns]
            if missing:
                found = ", ".join(c for c in columns if c) or "none"
                raise InputError(f"the CSV needs the columns {','.join(needed)} (found: {found})", str(csv_path))
            rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"not a readable UTF-8 CSV ({exc})", str(csv_path)) from None
    refs = []
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        if not any(row.values()):
            continue
        if not row.get(PATH_COLUMN):
            raise InputError(f"line {number}: empty path", str(csv_path))
        label = row.get(LABEL_COLUMN) or None
        if require_label and label is None:
            raise InputError(f"line {number}: empty label", str(csv_path))
        path = Path(row[PATH_COLUMN]).expanduser()
        refs.append(InputRef(path if path.is_absolute() else csv_path.parent / path, label))
    if not refs:
        raise InputError("the CSV has no rows", str(csv_path))
    return refs


def expand_inputs(paths: Sequence[str | Path], require_label: bool = False) -> list[InputRef]:
    """Studies as given; a ``.csv`` expands to its rows. ``require_label``: every study needs a CSV label."""
    refs: list[InputRef] = []
    for given in paths:
        path = Path(given)
        if path.suffix.lower() == CSV_SUFFIX:
            refs.extend(read_label_csv(path, require_label))
        elif require_label:
            raise InputError(f"labelled studies come in a CSV with the columns {PATH_COLUMN},{LABEL_COLUMN}", str(path))
        else:
            refs.append(InputRef(path))
    return refs


@dataclass
class EmbeddedStudy:
    """The image embeddings of one study (``(k, dim)``: one per image in model order)."""

    ref: InputRef
    embeddings: np.ndarray
    modality: str
    warnings: list[str] = field(default_factory=list)

    @property
    def n_images(self) -> int:
        return len(self.embeddings)

    def pooled(self) -> np.ndarray:
        """One unit vector for the whole study (mean of its image embeddings)."""
        return pool_embeddings(self.embeddings)


def embed_studies(
    encoder: SiglipEncoder,
    refs: Sequence[InputRef],
    batch_size: int = 8,
    recipe: str = DEFAULT_RECIPE,
    series: str | None = None,
    modality: str | None = None,
    reporter: Reporter | None = None,
) -> Iterator[EmbeddedStudy]:
    """Read each study with :func:`medlens.prep.prepare_study` and embed its images, one study at a time."""
    reporter = reporter or Reporter(False)
    with reporter.stage("Embedding studies", total=len(refs)) as update:
        for done, ref in enumerate(refs, start=1):
            prepared = prepare_study(ref.path, recipe=recipe, series=series, modality=modality)
            if not prepared.images:
                raise InputError("no images to embed", ref.source)
            embeddings = encoder.embed_images(prepared.images, batch_size)
            yield EmbeddedStudy(ref, embeddings, prepared.modality, list(prepared.warnings))
            update(done, len(refs))
