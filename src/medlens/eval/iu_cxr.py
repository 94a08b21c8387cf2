"""The Indiana University chest X-ray reports shipped in the ``torchxrayvision`` package
(``data/NLMCXR_reports.tgz``, CC BY-NC-ND): read from the installed package at run time, never copied.

Each report becomes an item with its FINDINGS and IMPRESSION text and, as targets, which of a fixed set of
common findings its MeSH "major" terms name (``normal`` when it is indexed as normal)."""

from __future__ import annotations

import importlib.util
import re
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from medlens.errors import MedlensError

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


def load_items(labels: list[str] | None = None) -> list[dict[str, Any]]:
    """One item per report with findings or impression text: ``id``, ``report``, ``target`` (sorted labels)."""
    wanted = {name: LABELS[name] for name in (labels or LABELS)}
    items = []
    with tarfile.open(archive_path(), "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: _number(m.name)):
            if not member.isfile() or not member.name.endswith(".xml"):
                continue
            handle = tar.extractfile(member)
            item = _item(ET.parse(handle).getroot(), Path(member.name).stem, wanted) if handle else None
            if item:
                items.append(item)
    return items


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
