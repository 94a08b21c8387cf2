"""The one narrow interface every model engine implements: ``generate(requests) -> outputs``."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from medlens.chat import Messages
from medlens.errors import MedlensError

if TYPE_CHECKING:
    from medlens.models.adapter import AdapterInfo

ProgressCallback = Callable[[int], None]
"""Called with the number of requests just finished."""
OutputCallback = Callable[[int, "GenerationOutput"], None]
"""Called with a request's index and its output as soon as that output exists (before ``generate`` returns),
so that a caller can save it even if the call is interrupted later."""
TextCallback = Callable[[int, str], None]
"""Called with a request's index and a piece of its generated text: as it is decoded by engines that stream,
else the whole text once the request is done. The pieces are for display as the text comes; the output's
``text`` (cleaned of end markers) is what counts."""


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


class GenerationFailed(MedlensError):
    """One request of a ``generate`` call failed for good; the outputs that did complete are kept.

    - ``outputs``: request index (position in the sequence given to ``generate``) -> output, for every request
      that completed before the call gave up; nothing else is in it.
    - ``index``: the request whose failure ended the call; ``error``: that failure (also ``__cause__``).
    - ``total``: how many requests the call had. Requests neither in ``outputs`` nor ``index`` were not run,
      or were abandoned mid-way; running them again is safe.

    Made with :meth:`wrap`, an instance is also of ``type(error)``: ``except BackendUnavailableError`` still
    catches a call that gave up on an unreachable server, and ``except GenerationFailed`` sees the outputs.
    """

    def __init__(self, error: MedlensError, index: int, outputs: Mapping[int, GenerationOutput], total: int) -> None:
        self.__dict__.update(error.__dict__)  # the error's own attributes (token counts ...) read through
        self.error = error
        self.index = index
        self.outputs = dict(outputs)
        self.total = total
        if total == 1:
            reason = error.reason
        else:
            reason = f"request index {index} of {total} failed ({len(self.outputs)} completed): {error.reason}"
        MedlensError.__init__(self, reason, error.path)

    @classmethod
    def wrap(
        cls, error: MedlensError, index: int, outputs: Mapping[int, GenerationOutput], total: int
    ) -> GenerationFailed:
        """A ``GenerationFailed`` that is also an instance of ``type(error)``."""
        kind = type(error)
        combined: type[GenerationFailed]
        if issubclass(kind, GenerationFailed):
            combined = kind
        elif issubclass(cls, kind):  # a plain MedlensError
            combined = cls
        else:
            combined = cls._combined(kind)
        failed = combined(error, index, outputs, total)
        failed.__cause__ = error
        return failed

    @staticmethod
    @functools.cache
    def _combined(kind: type[MedlensError]) -> type[GenerationFailed]:
        return type(f"GenerationFailed[{kind.__name__}]", (GenerationFailed, kind), {"__module__": __name__})

    def __reduce__(self) -> tuple[Callable[..., GenerationFailed], tuple[object, ...]]:
        return GenerationFailed.wrap, (self.error, self.index, self.outputs, self.total)


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
    #: True when requests leave this machine (a server that is not on a loopback address): medlens then
    #: de-identifies the text it sends (``TaskOptions.deid`` None means: follow this)
    remote: bool = False
    #: the PEFT adapter on the weights (engines that take ``adapter=``); its hash is part of ``fingerprint``
    adapter: AdapterInfo | None = None

    @property
    def revision(self) -> str:
        """The weights' fingerprint, else what names the model: engine, model name and server."""
        return self.fingerprint or f"{self.engine}:{self.model_name}:{getattr(self, 'base_url', '')}"

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        progress: ProgressCallback | None = None,
        on_output: OutputCallback | None = None,
        on_text: TextCallback | None = None,
    ) -> list[GenerationOutput]:
        """Complete every request, in order (one at a time unless an engine batches); ``on_output(index,
        output)`` as each one is done; ``on_text(index, text)`` with its whole text (engines that stream
        override this and send pieces as they come)."""
        outputs = []
        for index, request in enumerate(requests):
            outputs.append(self.generate_one(request))
            if on_text is not None:
                on_text(index, outputs[-1].text)
            if on_output is not None:
                on_output(index, outputs[-1])
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
