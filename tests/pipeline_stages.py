"""Pipeline stages for the tests: a picklable dataclass that Ray workers import by name (the tests folder is
on their ``PYTHONPATH``, see ray_cluster.py). A row asks ``questions`` about an optional random image; its
``fault`` makes one stage misbehave the way real inputs do:

- ``corrupt``: prepare raises a typed error naming the file; ``untyped``: prepare raises a ValueError;
- ``bad_image``: the prepared image is float32, so the engine refuses the request (the batch fails, then
  only this row);
- ``finish_fails``: the answer parser raises;
- ``abort``: prepare aborts its process every time (a native decoder crash);
- ``kill_once`` / ``kill_replica_once``: prepare / finish kill their own process with SIGKILL the first time
  (the ``marker`` file remembers), as an OOM killer or a lost node would."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medlens.backends import Backend, GenerationOutput, GenerationRequest
from medlens.errors import CorruptFileError
from medlens.pipeline import Unit


@dataclass(frozen=True)
class ToyStages:
    max_new_tokens: int = 6

    def prepare(self, unit: Unit) -> dict[str, Any]:
        fault = unit.row.get("fault")
        if fault == "corrupt":
            raise CorruptFileError("pixel data truncated at byte 4096", unit.row.get("path", "study.dcm"))
        if fault == "untyped":
            raise ValueError("a decoder bug")
        if fault == "abort":
            os.abort()
        if fault == "kill_once":
            _kill_once(unit.row["marker"])
        image = None
        if unit.row.get("image") is not None:
            height, width = unit.row.get("size", (32, 32))
            image = np.random.default_rng(unit.row["image"]).integers(0, 256, (height, width, 3), dtype=np.uint8)
            if fault == "bad_image":
                image = image.astype(np.float32)
        return {"image": image, "questions": list(unit.row.get("questions") or [unit.row["text"]])}

    def requests(self, unit: Unit, prepared: dict[str, Any]) -> list[GenerationRequest]:
        image = [] if prepared["image"] is None else [{"type": "image", "image": prepared["image"]}]
        return [
            GenerationRequest(
                [{"role": "user", "content": [*image, {"type": "text", "text": question}]}],
                max_new_tokens=self.max_new_tokens,
            )
            for question in prepared["questions"]
        ]

    def finish(
        self, unit: Unit, prepared: dict[str, Any], outputs: list[GenerationOutput], backend: Backend | None
    ) -> dict[str, Any]:
        fault = unit.row.get("fault")
        if fault == "finish_fails":
            raise KeyError("no 'Final Answer' in the output")
        if fault == "kill_replica_once":
            _kill_once(unit.row["marker"])
        return {
            "answers": [output.text for output in outputs],
            "tokens": [output.completion_tokens for output in outputs],
            "finish": [output.finish_reason for output in outputs],
            "backend": backend is not None,
        }


def _kill_once(marker: str) -> None:
    path = Path(marker)
    if not path.exists():
        path.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)


def toy_units(**faults: dict[str, Any]) -> list[Unit]:
    """Eight rows of different prompt lengths (text, one image or two questions about one), plus one row per
    keyword (``name={"fault": ..., ...}``), keyed by name."""
    rows: dict[str, dict[str, Any]] = {
        "short": {"text": "no"},
        "long": {"text": "Describe the chest radiograph. Is there a pleural effusion on the left or the right?"},
        "ct": {"text": "Is there a nodule?", "image": 1, "size": (40, 56)},
        "cxr": {"text": "Describe the image.", "image": 2, "size": (64, 48)},
        "two": {"questions": ["Is there a pneumothorax?", "Which side?"], "image": 3, "size": (32, 32)},
        "fact": {"text": "What is a pleural effusion?"},
        "clear": {"text": "The lungs are clear."},
        "mri": {"text": "Any abnormality?", "image": 4, "size": (48, 48)},
    }
    for name, fault in faults.items():
        rows[name] = {"text": f"Row {name}: is it normal?", "image": 5, "size": (32, 40), **fault}
    return [Unit(key=name, row=row) for name, row in rows.items()]
