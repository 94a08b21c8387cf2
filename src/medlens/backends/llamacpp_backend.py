"""The llama.cpp engine, in process: GGUF models through llama-cpp-python's ``Llama`` (``make llamacpp``).

``load_backend("llamacpp:gemma-3-270m")``, or ``--engine llamacpp --model FILE.gguf`` on the command line. The
model is a built-in GGUF model (``gemma-3-270m``) or a ``.gguf`` file. Options, as ``--model-arg KEY=VALUE``:

- ``n_ctx``: context length in tokens (default 8192); prompt plus answer must fit.
- ``n_threads``: CPU threads (default: every core this process may use; llama-cpp-python's own default is half).
- ``n_batch``: prompt tokens per forward pass (default 512).
- ``seed``: llama.cpp's context seed (sampling is re-seeded from each request's ``seed``).
- ``mmproj``: the model's multimodal projector GGUF; without it, requests with images are refused.
- ``prefix_cache``: continue from the KV cache of the previous request's shared prefix (default off). Faster
  for many questions about one context, but a replayed prefix gives slightly different logits than a full
  evaluation, which changes sampled answers and can flip a greedy near-tie: with it off, a request's answer
  does not depend on the requests before it (llama-cpp-python's server always reuses the prefix).
- ``verbose``: llama.cpp's own log on stderr (default off).

Prompts: a file with a chat template is rendered from it as llama.cpp's OpenAI-compatible server renders it
(jinja2, ``<bos>`` from the template); a file without one (``gemma-3-270m``, a base model) gets the Gemma turns
of :func:`gemma_chat_prompt`, the prompt the transformers engine builds for it (the same token ids). Decoding is
greedy unless a request sets a temperature, with no repetition penalty (llama-cpp-python's server adds 1.1 by
default, which changes "greedy" answers once a token repeats). A completion ends at ``<eos>`` or
``<end_of_turn>`` (counted in ``completion_tokens``, as by the transformers engine) or at ``max_new_tokens``.

Images (with ``mmproj``) go through llama-cpp-python's generic libmtmd chat handler (``MTMDChatHandler``; the
installed version has no Gemma 3 specific one), which needs the model file's chat template.

``llama_cpp`` is imported when a backend is made, so that a missing install is a clear error.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from pathlib import Path
from typing import Any

from medlens.backends.base import Backend, GenerationOutput, GenerationRequest, Messages
from medlens.backends.rendering import END_TOKENS, clean_completion, gemma_chat_prompt, image_parts, openai_messages
from medlens.errors import BackendUnavailableError, MedlensError, ModelNotAvailableError
from medlens.models import GENERATE, model_fingerprint, resolve_model

ENGINE = "llamacpp"
INSTALL_HINT = "run `make llamacpp` (builds it once) or `pip install 'medlens[llamacpp]'`"
DEFAULT_N_CTX = 8192


def import_llama_cpp() -> Any:
    """The ``llama_cpp`` module, or :class:`BackendUnavailableError` saying how to install it."""
    try:
        import llama_cpp
        import llama_cpp.llama_chat_format
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the {ENGINE} engine needs llama-cpp-python, which is not installed ({exc}): {INSTALL_HINT}"
        ) from None
    return llama_cpp


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class LlamaCppBackend(Backend):
    """A GGUF model on llama.cpp, in this process; one request at a time, greedy by default."""

    engine = ENGINE

    def __init__(
        self,
        model: str,
        n_ctx: int = DEFAULT_N_CTX,
        n_threads: int | None = None,
        n_batch: int = 512,
        seed: int = 0,
        mmproj: str | None = None,
        prefix_cache: bool = False,
        verbose: bool = False,
    ) -> None:
        llama_cpp = import_llama_cpp()
        self.model_name = model
        source = resolve_model(model, GENERATE)
        if source.gguf_file is None:
            raise ModelNotAvailableError(
                f"the {ENGINE} engine loads GGUF files; {model} is not one: pass a .gguf file or a GGUF built-in "
                "(gemma-3-270m), or use --engine transformers for a model directory",
                str(source.path),
            )
        self.model_path = str(source.gguf_file)
        self.n_ctx = int(n_ctx)
        self.n_threads = int(n_threads or usable_cores())
        #: reuse the previous request's KV cache for a shared prefix (see the module docstring)
        self.prefix_cache = bool(prefix_cache)
        self.mmproj = str(Path(mmproj).expanduser()) if mmproj else None
        if self.mmproj and not Path(self.mmproj).is_file():
            raise ModelNotAvailableError("mmproj: no such file (the model's multimodal projector GGUF)", self.mmproj)
        #: no projector: requests with images are refused
        self.text_only = self.mmproj is None
        handler = None
        if self.mmproj:
            handler = llama_cpp.llama_chat_format.MTMDChatHandler(clip_model_path=self.mmproj, verbose=verbose)
        # llama-cpp-python prints llama.cpp's warnings through sys.stderr even when not verbose
        log = io.StringIO()
        try:
            with contextlib.nullcontext() if verbose else contextlib.redirect_stderr(log):
                self._llama = llama_cpp.Llama(
                    model_path=self.model_path,
                    n_ctx=self.n_ctx,
                    n_threads=self.n_threads,
                    n_threads_batch=self.n_threads,
                    n_batch=int(n_batch),
                    seed=int(seed),
                    chat_handler=handler,
                    verbose=bool(verbose),
                )
        except ValueError as exc:  # llama-cpp-python's "Failed to load model from file"
            detail = " ".join(log.getvalue().split()[-40:])
            raise ModelNotAvailableError(
                f"llama.cpp cannot load it ({exc}) {detail}".rstrip(), self.model_path
            ) from None
        # llama.cpp's quantised kernels answer differently from transformers on the same file: never mixed
        self.fingerprint = f"{ENGINE}-{model_fingerprint(source.gguf_file)}"
        if self.mmproj:
            self.fingerprint += f"-{model_fingerprint(self.mmproj)}"
        self.is_test_model = source.is_test_model
        self.default_max_new_tokens = source.default_max_new_tokens
        self.model_warning = source.warning
        self._bos = self._token_text(self._llama.token_bos())
        self._template = self._chat_template(llama_cpp)
        #: token ids that end a completion (the model's end of sequence, ``<eos>``, ``<end_of_turn>``)
        self.stop_ids = self._end_token_ids()

    # ------------------------------------------------------------------ prompts

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._llama.detokenize([token], special=True).decode("utf-8", "replace")

    def _chat_template(self, llama_cpp: Any) -> Any:
        """The file's chat template as llama-cpp-python's formatter (what its server renders with), else None."""
        template = self._llama.metadata.get("tokenizer.chat_template")
        if not template:
            return None
        eos = self._token_text(self._llama.token_eos())
        return llama_cpp.llama_chat_format.Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=self._bos)

    def _end_token_ids(self) -> set[int]:
        ids = {self._llama.token_eos()}
        for text in END_TOKENS:
            found = self._llama.tokenize(text.encode(), add_bos=False, special=True)
            if len(found) == 1:
                ids.add(found[0])
        return {i for i in ids if i >= 0}

    def render(self, messages: Messages) -> str:
        """The prompt text: the file's chat template, else :func:`gemma_chat_prompt` (``<bos>`` included)."""
        if self._template is not None:
            return self._template(messages=openai_messages(messages, images=False)).prompt
        return gemma_chat_prompt(messages, self._bos)

    def prompt_ids(self, messages: Messages) -> list[int]:
        """The token ids of the rendered prompt (special tokens parsed; ``<bos>`` added if the text lacks it)."""
        text = self.render(messages)
        add_bos = not (self._bos and text.startswith(self._bos))
        return self._llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    # ------------------------------------------------------------------ generation

    def generate_one(self, request: GenerationRequest) -> GenerationOutput:
        if n_images := len(image_parts(request.messages)):
            if self.text_only:
                raise MedlensError(
                    f"{self.model_name} on the {ENGINE} engine reads text only ({n_images} images in this request): "
                    "pass --model-arg mmproj=PATH (the model's multimodal projector GGUF) to read images, or use "
                    "--engine transformers with a multimodal model"
                )
            return self._generate_with_images(request)
        start = time.perf_counter()
        ids = self.prompt_ids(request.messages)
        tokens, stopped, timings = self.decode(ids, request, start)
        return GenerationOutput(
            text=self.completion_text(tokens),
            prompt_tokens=len(ids),
            completion_tokens=len(tokens),
            finish_reason="stop" if stopped else "length",
            timings=timings,
        )

    def completion_text(self, tokens: list[int]) -> str:
        """The text of generated ``tokens``: control tokens such as the thinking markers ``<unused94>`` and
        ``<unused95>`` kept (llama-cpp-python's server drops them), end and padding markers removed."""
        return clean_completion(self._llama.detokenize(tokens, special=True).decode("utf-8", "replace"))

    def decode(
        self, ids: list[int], request: GenerationRequest, start: float | None = None
    ) -> tuple[list[int], bool, dict[str, float]]:
        """Generate from prompt ``ids``: the new token ids (an end token included), whether an end token came,
        and the seconds of ``preprocess`` (since ``start``), ``prefill`` (to the first token) and ``generate``."""
        began = time.perf_counter()
        room = self.n_ctx - len(ids)
        if room < 1:
            raise MedlensError(
                f"the prompt has {len(ids)} tokens, more than the context of {self.n_ctx}: pass --model-arg "
                f"n_ctx={len(ids) + (request.max_new_tokens or self.default_max_new_tokens)} (or more)"
            )
        limit = min(request.max_new_tokens or self.default_max_new_tokens, room)
        if request.temperature > 0:
            self._llama.set_seed(request.seed)
            sampling: dict[str, Any] = {"temp": request.temperature, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
        else:
            sampling = {"temp": 0.0}
        if not self.prefix_cache:
            self._llama.reset()  # evaluate the whole prompt: the same logits whatever came before
        tokens: list[int] = []
        stopped, first = False, began
        for token in self._llama.generate(ids, repeat_penalty=1.0, **sampling):
            if not tokens:
                first = time.perf_counter()
            tokens.append(int(token))
            if token in self.stop_ids:
                stopped = True
                break
            if len(tokens) >= limit:
                break
        done = time.perf_counter()
        timings = {"prefill": first - began, "generate": done - first}
        if start is not None:
            timings["preprocess"] = began - start
        return tokens, stopped, timings

    def _generate_with_images(self, request: GenerationRequest) -> GenerationOutput:
        """Through llama-cpp-python's libmtmd chat handler (images as PNG data URLs)."""
        start = time.perf_counter()
        options: dict[str, Any] = {"temperature": request.temperature, "repeat_penalty": 1.0, "seed": request.seed}
        if request.temperature > 0:
            options.update(top_k=0, top_p=1.0, min_p=0.0)
        try:
            reply = self._llama.create_chat_completion(
                messages=openai_messages(request.messages),
                max_tokens=request.max_new_tokens or self.default_max_new_tokens,
                **options,
            )
        except ValueError as exc:  # the handler's "requires tokenizer.chat_template", a projector it cannot load
            raise MedlensError(f"llama.cpp cannot read the images with {self.mmproj} ({exc})") from None
        choice, usage = reply["choices"][0], reply.get("usage") or {}
        return GenerationOutput(
            text=clean_completion(choice["message"].get("content") or ""),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
            timings={"generate": time.perf_counter() - start},
        )

    def close(self) -> None:
        """Free the model (llama.cpp's memory)."""
        llama = self.__dict__.pop("_llama", None)
        if llama is not None:
            llama.close()
