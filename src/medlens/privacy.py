"""PHI hygiene: identifiers in logs and messages are shown as short one-way hashes."""

from __future__ import annotations

import hashlib

HASH_CHARS = 10


def short_hash(value: str) -> str:
    """A stable, short, one-way tag for a UID (10 hex characters of its SHA-256)."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()[:HASH_CHARS]


def matches_uid(candidate: str, wanted: str) -> bool:
    """True when ``wanted`` is the full UID or a prefix (>= 6 chars) of its short hash."""
    wanted = wanted.strip()
    if candidate == wanted:
        return True
    return len(wanted) >= 6 and short_hash(candidate).startswith(wanted.lower())
