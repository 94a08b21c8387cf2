"""A backend that answers with canned texts, for testing tasks and runners without a model."""

from __future__ import annotations

from medlens.backends.base import Backend, GenerationOutput, GenerationRequest


class ScriptedBackend(Backend):
    """Answers requests with the given texts in order (the last one repeats); records every request."""

    engine = "scripted"

    def __init__(self, *texts: str, name: str = "scripted") -> None:
        self.texts, self.model_name = list(texts), name
        self.requests: list[GenerationRequest] = []

    def generate_one(self, request: GenerationRequest) -> GenerationOutput:
        self.requests.append(request)
        text = self.texts.pop(0) if len(self.texts) > 1 else self.texts[0]
        return GenerationOutput(text, 10, 5, "stop")
