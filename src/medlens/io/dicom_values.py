"""Fast reads of simple header values straight from pydicom's raw elements.

pydicom converts a raw element to a typed value (with validation) on first access, which costs more than
reading the file for the ~25 fields medlens needs. Text and binary numbers are decoded here directly;
anything unusual (sequences, ambiguous VRs, already converted values) goes through pydicom.
"""

from __future__ import annotations

import struct
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword

_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "SH", "TM", "UI"})
_BINARY_VRS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d"}
_TAGS: dict[str, int] = {}


def tag(keyword: str) -> int:
    """The tag of a DICOM keyword (memoised)."""
    if keyword not in _TAGS:
        found = tag_for_keyword(keyword)
        if found is None:
            raise KeyError(keyword)
        _TAGS[keyword] = found
    return _TAGS[keyword]


def values(ds: Any, keyword: str) -> tuple[Any, ...] | None:
    """All values of a simple element (strings for text VRs, numbers for binary ones); None if absent/empty."""
    if ds is None:
        return None
    elem = ds.get_item(tag(keyword))
    if elem is None:
        return None
    if getattr(elem, "is_raw", False) and isinstance(elem.value, bytes):
        vr = elem.VR or _dictionary_vr(keyword)
        if vr in _TEXT_VRS:
            text = elem.value.decode("latin-1").strip(" \x00")
            return tuple(part.strip(" \x00") for part in text.split("\\")) if text else None
        if vr in _BINARY_VRS:
            fmt = _BINARY_VRS[vr]
            n = len(elem.value) // struct.calcsize(fmt)
            order = "<" if elem.is_little_endian else ">"
            return struct.unpack(f"{order}{n}{fmt}", elem.value[: n * struct.calcsize(fmt)]) or None
    value = ds[tag(keyword)].value
    if value is None or value == "" or value == b"":
        return None
    if isinstance(value, str | bytes | int | float):
        return (value,)
    return tuple(value)


def first(ds: Any, keyword: str) -> Any:
    found = values(ds, keyword)
    return found[0] if found else None


def text(ds: Any, keyword: str, default: str = "") -> str:
    value = first(ds, keyword)
    return str(value).strip() if value is not None else default


def integer(ds: Any, keyword: str) -> int | None:
    try:
        return int(float(first(ds, keyword)))
    except (TypeError, ValueError):
        return None


def floats(ds: Any, keyword: str, n: int) -> tuple[float, ...] | None:
    found = values(ds, keyword)
    try:
        out = tuple(float(v) for v in found) if found else ()
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(abs(v) != float("inf") and v == v for v in out) else None


def _dictionary_vr(keyword: str) -> str:
    try:
        return dictionary_VR(tag(keyword))
    except KeyError:
        return ""
