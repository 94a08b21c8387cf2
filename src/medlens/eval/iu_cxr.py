"""The Indiana University chest X-ray reports shipped in the ``torchxrayvision`` package
(``data/NLMCXR_reports.tgz``, CC BY-NC-ND): read from the installed package at run time, never copied.

Each report becomes an item with its FINDINGS and IMPRESSION text and, as targets, which of a fixed set of
common findings its MeSH "major" terms name (``normal`` when it is indexed as normal).

Train / held-out split (``split`` loader option; for fine-tuning and its before/after evaluation): a report
goes to the held-out split when the SHA-256 of ``"{seed}:{report text, lower case, spaces collapsed}"``, read
as a number in [0, 1), is below ``held_out`` (default 0.1). The split is by report text, so reports with the
same words (many normal ones) always land on the same side, it is stable when items are added or reordered,
and the same seed always gives the same split. ``split: all`` (the default) keeps every report."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from medlens.errors import InputError, MedlensError

#: the splits the loader knows
SPLITS = ("all", "train", "held_out")
ARCHIVE = "data/NLMCXR_reports.tgz"
#: label -> MeSH major headings (first component, lower case) that count as it
LABELS: dict[str, tuple[str, ...]] = {
    "normal": ("normal",),
    "cardiomegaly": ("cardiomegaly",),
    "opacity": ("opacity",),
    "atelectasis": ("pulmonary atelectasis", "atelectasis"),
    "pleural effusion": ("pleural effusion",),
    "nodule": ("nodule", "multiple pulmonary nodules"),
    "granuloma": ("calcified granuloma", "granuloma", "granulomatous disease"),
    "emphysema": ("pulmonary emphysema", "emphysema"),
}


def archive_path() -> Path:
    """Where the installed torchxrayvision keeps the reports (without importing it: it needs torchvision)."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise MedlensError(
            "iu-cxr-findings reads the reports shipped in the torchxrayvision package: "
            "pip install --no-deps torchxrayvision (make install does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / ARCHIVE
    if not path.exists():
        raise MedlensError(f"this torchxrayvision has no {ARCHIVE}", str(path))
    return path


def load_items(
    labels: list[str] | None = None, split: str = "all", held_out: float = 0.1, seed: int = 0
) -> list[dict[str, Any]]:
    """One item per report with findings or impression text: ``id``, ``report``, ``target`` (sorted labels);
    only those of ``split`` (``train``/``held_out``: see the module docstring)."""
    if split not in SPLITS:
        raise InputError(f"iu-cxr-reports: split must be one of {', '.join(SPLITS)}, not {split!r}")
    if not 0 < held_out < 1:
        raise InputError(f"iu-cxr-reports: held_out must be a fraction between 0 and 1, not {held_out!r}")
    wanted = {name: LABELS[name] for name in (labels or LABELS)}
    items = []
    with tarfile.open(archive_path(), "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: _number(m.name)):
            if not member.isfile() or not member.name.endswith(".xml"):
                continue
            handle = tar.extractfile(member)
            item = _item(ET.parse(handle).getroot(), Path(member.name).stem, wanted) if handle else None
            if item and (split == "all" or (in_held_out(item["report"], held_out, seed) == (split == "held_out"))):
                items.append(item)
    return items


def in_held_out(report: str, fraction: float, seed: int) -> bool:
    """Whether ``report`` belongs to the held-out split (seeded hash of its normalised text)."""
    text = " ".join(report.lower().split())
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _item(root: ET.Element, report_id: str, wanted: dict[str, tuple[str, ...]]) -> dict[str, Any] | None:
    sections = {(node.get("Label") or "").upper(): (node.text or "").strip() for node in root.iter("AbstractText")}
    findings, impression = sections.get("FINDINGS", ""), sections.get("IMPRESSION", "")
    if not findings and not impression:
        return None
    headings = {(m.text or "").split("/")[0].strip().lower() for m in root.iter("major")}
    target = sorted(label for label, mesh in wanted.items() if headings & set(mesh))
    report = "\n".join(
        part
        for part in (f"FINDINGS: {findings}" if findings else "", f"IMPRESSION: {impression}" if impression else "")
        if part
    )
    return {"id": f"iu-{report_id}", "report": report, "target": target}


def _number(name: str) -> int:
    match = re.search(r"(\d+)\.xml$", name)
    return int(match.group(1)) if match else 0
