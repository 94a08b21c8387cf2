"""The result envelope every task returns, from the Python API and from ``medlens ask --task``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from medlens import DISCLAIMER, __version__


class InputRef(BaseModel):
    """An input file and the SHA-256 of its bytes (for a folder: of its files' names and hashes)."""

    file: str
    sha256: str


class AdapterRef(BaseModel):
    """The PEFT adapter a result's model ran with: its folder name and the SHA-256 of its config and weights."""

    name: str
    sha256: str


class Envelope(BaseModel):
    """Same fields for every task; ``payload`` holds the task's validated result."""

    task: str
    model: str
    engine: str
    untrained_test_model: bool = False
    recipe: str | None = None
    #: the question asked (for the DICOM SR / FHIR outputs of medlens.results); None when not recorded
    question: str | None = None
    #: what identifies the weights (Backend.model_fingerprint), for the SR's algorithm identification
    model_fingerprint: str | None = None
    #: the PEFT adapter on the weights (``--adapter``), None for the base model; its hash is also in
    #: ``model_fingerprint``
    adapter: AdapterRef | None = None
    inputs: list[InputRef] = Field(default_factory=list)
    n_images: int = 0
    answer: str = ""
    final_answer: str | None = None
    thinking: str | None = None
    payload: dict[str, Any] | None = None
    parse_error: str | None = None
    raw_output: list[str] = Field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    medlens_version: str = __version__
    disclaimer: str = DISCLAIMER
