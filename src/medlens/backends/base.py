"""The one narrow interface every model engine implements: ``generate(requests) -> outputs``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from medlens.chat import Messages

ProgressCallback = Callable[[int], None]
"""Called with the number of requests just finished."""


@dataclass
class GenerationRequest:
    """One prompt to complete. ``temperature == 0`` means greedy decoding (the MedGemma default)."""

    messages: Messages
    max_new_tokens: int | None = None
    temperature: float = 0.0
    seed: int = 0


@dataclass
class GenerationOutput:
    """What the model wrote, with control markers that matter (``<unused94>``/``<unused95>``) kept."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"
    timings: dict[str, float] = field(default_factory=dict)


class Backend(ABC):
    """A loaded model behind one engine (transformers, vLLM, an HTTP server ...)."""

    #: registry name of the engine
    engine: str = ""
    #: what the user asked for (``test-tiny``, a directory, an HF id)
    model_name: str = ""
    #: set for built-in untrained test models; every result made with them says so
    is_test_model: bool = False
    #: what every result made with this model should say (a test model's noise, a small base model's limits)
    model_warning: str | None = None
    #: default for ``max_new_tokens`` when a request leaves it unset
    default_max_new_tokens: int = 512
    #: identifies the weights (:func:`medlens.models.model_fingerprint` of local ones); results of different
    #: fingerprints are never mixed (evaluation journal, fine-tuning runs)
    fingerprint: str = ""

    @property
    def revision(self) -> str:
        """The weights' fingerprint, else what names the model: engine, model name and server."""
        return self.fingerprint or f"{self.engine}:{self.model_name}:{getattr(self, 'base_url', '')}"

    def generate(
        self, requests: Sequence[GenerationRequest], progress: ProgressCallback | None = None
    ) -> list[GenerationOutput]:
        """Complete every request, in order (one at a time unless an engine batches)."""
        outputs = []
        for request in requests:
            outputs.append(self.generate_one(request))
            if progress is not None:
                progress(1)
        return outputs

    @abstractmethod
    def generate_one(self, request: GenerationRequest) -> GenerationOutput:
        """Complete one request."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the model's memory."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
