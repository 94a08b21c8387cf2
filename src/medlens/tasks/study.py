"""Shared by the tasks that ask about one prepared study: its request and its envelope details."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from medlens.prep import Prepared, prepare_study
from medlens.privacy import short_hash
from medlens.prompts import messages_for
from medlens.tasks.base import TaskBuild, TaskOptions, TaskRequest


def study_build(
    path: Path,
    prompt: str | Callable[[Prepared], str],
    options: TaskOptions,
    context: dict[str, Any] | None = None,
) -> TaskBuild:
    """Prepare ``path`` and build one request in MedGemma's layout (images first, the prompt last); ``prompt``
    may be a function of the prepared study (to name its modality, say)."""
    prepared = prepare_study(path, options.recipe, options.series, options.modality, slide=options.slide)
    text = prompt(prepared) if callable(prompt) else prompt
    messages = messages_for(prepared, text, instruction=options.instruction, thinking=options.thinking)
    return TaskBuild(
        requests=[TaskRequest(messages, context or {})],
        recipe=prepared.recipe,
        n_images=len(prepared.images),
        warnings=list(prepared.warnings),
        details=study_details(prepared),
    )


def study_details(prepared: Prepared) -> dict[str, Any]:
    """Envelope details of a prepared study: modality, series tag (never the UID), slice counts, and the hashed
    SOP Instance UIDs (with frames) of the images sent, which a DICOM SR of the answer references."""
    details = {
        "modality": prepared.modality,
        "family": prepared.family,
        "series": short_hash(prepared.series_uid) if prepared.series_uid else None,
        "n_source_slices": prepared.n_source_slices,
    }
    if prepared.family != "wsi":  # hashed, never the UIDs: the SR references exactly the images the model saw
        details["instances_sent"] = [
            {"sop": short_hash(s.sop_instance_uid), "frame": s.frame} for s in prepared.slices if s.sop_instance_uid
        ]
    if prepared.family == "wsi":
        meta = prepared.meta
        details |= {
            "magnification": meta["magnification"],
            "level": meta["level"],
            "n_tissue_patches": meta["n_tissue_patches"],
            "failed_patches": len(meta["failed_patches"]),
            "patches": prepared.image_meta,
        }
    return details
