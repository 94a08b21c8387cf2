"""Run a task: build its requests, generate with any backend, parse, wrap everything in the envelope.

A run has two halves that :func:`run_task` joins and ``medlens batch`` runs apart (preparation on CPU workers,
answers where the model is loaded): :func:`prepare_task` (read, prepare, build the requests) with
:func:`guard_task` (burned-in refusal and de-identification for the backend), then :func:`answer_task`
(parse the outputs, a second stage when the task has one, the envelope)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medlens.backends import Backend, BackendIdentity, GenerationOutput, GenerationRequest, load_backend
from medlens.errors import InputError, MedlensError
from medlens.files import sha256_of
from medlens.progress import Reporter, Timer
from medlens.prompts import split_thinking
from medlens.tasks.base import Parsed, ParseError, Task, TaskBuild, TaskOptions
from medlens.tasks.envelope import Envelope, InputRef
from medlens.warnings_capture import capture_warnings


def check_inputs(task: Task, inputs: Sequence[Path], question: str | None) -> str:
    """Validate the number of inputs and the question; return the question to use."""
    if not task.min_inputs <= len(inputs) <= task.max_inputs:
        wanted = str(task.min_inputs) if task.min_inputs == task.max_inputs else f"{task.min_inputs}-{task.max_inputs}"
        raise MedlensError(f"task {task.name} takes {wanted} input(s), got {len(inputs)}")
    if not question:
        if task.default_question is None:
            raise MedlensError(f"task {task.name} needs a question")
        return task.default_question
    return question


def parse_output(task: Task, text: str, context: dict) -> Parsed:
    """``task.parse`` that never raises on model output: failures become ``Parsed.error`` (the raw output is
    kept in the envelope either way)."""
    try:
        return task.parse(text, context)
    except ParseError as exc:
        return Parsed(error=str(exc))
    except Exception as exc:  # a parser bug must not lose the model's output
        return Parsed(error=f"parser failed ({type(exc).__name__}: {exc})")


def backend_identity(backend: Backend) -> BackendIdentity:
    """What names a loaded backend's results (its revision names the adapter too)."""
    adapter = getattr(backend, "adapter", None)
    return BackendIdentity(
        engine=backend.engine,
        model_name=backend.model_name,
        revision=backend.revision,
        default_max_new_tokens=backend.default_max_new_tokens,
        is_test_model=backend.is_test_model,
        model_warning=backend.model_warning,
        adapter=adapter.identity() if adapter is not None else None,
    )


def generation_requests(build: TaskBuild, options: TaskOptions) -> list[GenerationRequest]:
    """The build's requests as the engines take them (the run's token cap where a request sets none)."""
    return [
        GenerationRequest(r.messages, max_new_tokens=r.max_new_tokens or options.max_new_tokens) for r in build.requests
    ]


def new_envelope(identity: BackendIdentity, outputs: Sequence[GenerationOutput]) -> Envelope:
    """An envelope filled with what the model and its outputs say (tokens, finish reason, the model's warning)."""
    return Envelope(
        task="",
        model=identity.model_name,
        engine=identity.engine,
        untrained_test_model=identity.is_test_model,
        adapter=identity.adapter,
        prompt_tokens=sum(o.prompt_tokens for o in outputs),
        completion_tokens=sum(o.completion_tokens for o in outputs),
        finish_reason="length" if any(o.finish_reason == "length" for o in outputs) else "stop",
        warnings=[identity.model_warning] if identity.model_warning else [],
    )


def generate(
    backend: Backend, build: TaskBuild, options: TaskOptions, timer: Timer, reporter: Reporter, stage: str = "generate"
) -> tuple[list[str], Envelope]:
    """Run the build's requests; returns the raw texts and a partly filled envelope (tokens, timings)."""
    outputs = generate_outputs(backend, generation_requests(build, options), timer, reporter, stage)
    return [o.text for o in outputs], new_envelope(backend_identity(backend), outputs)


def generate_outputs(
    backend: Backend, requests: list[GenerationRequest], timer: Timer, reporter: Reporter, stage: str = "generate"
) -> list[GenerationOutput]:
    """``backend.generate(requests)``, timed as ``stage`` and shown as progress."""
    with timer(stage), reporter.stage("Generating", total=len(requests)) as update:
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            update(done[0], len(requests))

        return backend.generate(requests, progress=advance)


@dataclass
class PreparedTask:
    """The build half of a task run: its inputs read and prepared, its requests built (and guarded for the
    backend by :func:`guard_task`). Picklable: ``medlens batch`` sends it from a CPU worker to the model."""

    task: Task
    paths: list[Path]
    question: str
    options: TaskOptions
    build: TaskBuild
    #: the names and identifiers the text was scrubbed of (a second stage scrubs its text of them too)
    terms: set[str] | None = None
    timer: Timer = field(default_factory=Timer)


def prepare_task(
    task: Task,
    inputs: Sequence[str | Path],
    question: str | None,
    options: TaskOptions | None = None,
    *,
    reporter: Reporter | None = None,
    timer: Timer | None = None,
) -> PreparedTask:
    """Check the inputs and the question, read and prepare the inputs, build the requests (``read_prepare``
    in the timings)."""
    options = options or TaskOptions()
    reporter = reporter or Reporter(False)
    timer = timer or Timer()
    paths = [Path(p) for p in inputs]
    question = check_inputs(task, paths, question)
    with timer("read_prepare"), reporter.stage(f"Preparing ({task.name})"):
        build = task.build(paths, question, options)
    return PreparedTask(task, paths, question, options, build, timer=timer)


def guard_task(prepared: PreparedTask, remote: bool) -> None:
    """Before the requests go to a backend: for a ``remote`` one, inputs whose images may carry burned-in text
    are refused (:func:`check_burned_in`); the text is de-identified when :func:`should_deidentify` says so."""
    if remote:
        prepared.build.warnings += check_burned_in(prepared.build, prepared.paths, prepared.options)
    if should_deidentify(prepared.options, remote):
        prepared.terms = deidentify_build(prepared.build, prepared.paths, remote)


def task_requests(prepared: PreparedTask) -> list[GenerationRequest]:
    """The prepared task's requests as the engines take them."""
    return generation_requests(prepared.build, prepared.options)


class SecondStageUnavailableError(MedlensError):
    """A two-stage task was answered where no loaded model can be asked its second stage."""


def answer_task(
    prepared: PreparedTask,
    outputs: Sequence[GenerationOutput],
    identity: BackendIdentity,
    backend: Backend | None,
    *,
    reasoner: Callable[[str], Backend] | None = None,
    reporter: Reporter | None = None,
) -> Envelope:
    """The answer half: parse ``outputs`` (one per request of the build, made by the model ``identity``
    names), run the task's second stage on ``backend`` (or on ``reasoner(options.reasoner)`` when the options
    name another model), and fill the envelope. Without a ``backend`` a second stage is an error."""
    task, paths, question, options, build = (
        prepared.task,
        prepared.paths,
        prepared.question,
        prepared.options,
        prepared.build,
    )
    reporter = reporter or Reporter(False)
    timer = prepared.timer
    texts = [o.text for o in outputs]
    envelope = new_envelope(identity, outputs)
    parsed = task.combine([parse_output(task, t, r.context) for t, r in zip(texts, build.requests, strict=True)])
    warnings = [*build.warnings, *parsed.warnings]
    second = task.second_stage(parsed, question, options) if not parsed.error else None
    if second is not None:
        if backend is None:
            raise SecondStageUnavailableError(
                f"task {task.name} asks a model a second time, which this engine path cannot (no loaded model "
                "here); run it with --engine transformers, or without --ray"
            )
        load = reasoner or (lambda name: load_backend(name, identity.engine))
        second_backend = load(options.reasoner) if options.reasoner else backend
        if should_deidentify(options, second_backend):
            deidentify_build(second, paths, second_backend, prepared.terms, note=False)
        texts2, envelope2 = generate(second_backend, second, options, timer, reporter, stage="generate_stage2")
        parsed2 = task.combine([parse_output(task, t, r.context) for t, r in zip(texts2, second.requests, strict=True)])
        warnings += [*second.warnings, *parsed2.warnings]
        parsed = task.merge(parsed, parsed2)
        texts += texts2
        envelope.prompt_tokens += envelope2.prompt_tokens
        envelope.completion_tokens += envelope2.completion_tokens
        envelope.untrained_test_model |= envelope2.untrained_test_model
        envelope.warnings += [w for w in envelope2.warnings if w not in envelope.warnings]
        if envelope2.finish_reason == "length":
            envelope.finish_reason = "length"
        build.details["stages"] = [
            {"stage": 1, "model": envelope.model, "engine": envelope.engine},
            {"stage": 2, "model": envelope2.model, "engine": envelope2.engine},
        ]
    warnings += task.finish(parsed, build, options)
    envelope.question = question
    envelope.model_fingerprint = identity.revision
    return finalize(envelope, task, paths, build, texts, parsed, warnings, timer)


def run_task(
    task: Task,
    inputs: Sequence[str | Path],
    question: str | None,
    model: str | Backend,
    options: TaskOptions | None = None,
    *,
    engine: str = "transformers",
    reporter: Reporter | None = None,
    backend_options: dict[str, Any] | None = None,
) -> Envelope:
    """The whole task: read, prepare, generate, parse; a parse failure is reported, not raised.
    ``backend_options`` go to :func:`~medlens.backends.load_backend` for the model (and the reasoner).
    Library warnings raised meanwhile (pydicom, transformers ...) end up, short, in the envelope's warnings."""
    with capture_warnings() as caught:
        envelope = _run_task(task, inputs, question, model, options, engine, reporter, backend_options)
    envelope.warnings += [w for w in caught if w not in envelope.warnings]
    return envelope


def _run_task(
    task: Task,
    inputs: Sequence[str | Path],
    question: str | None,
    model: str | Backend,
    options: TaskOptions | None,
    engine: str,
    reporter: Reporter | None,
    backend_options: dict[str, Any] | None,
) -> Envelope:
    reporter = reporter or Reporter(False)
    prepared = prepare_task(task, inputs, question, options, reporter=reporter)
    timer = prepared.timer
    options_for_engine = backend_options or {}
    backend = _backend(model, engine, timer, reporter, options_for_engine)
    guard_task(prepared, bool(getattr(backend, "remote", False)))
    outputs = generate_outputs(backend, task_requests(prepared), timer, reporter)
    return answer_task(
        prepared,
        outputs,
        backend_identity(backend),
        backend,
        reasoner=lambda name: _backend(name, engine, timer, reporter, options_for_engine),
        reporter=reporter,
    )


def finalize(
    envelope: Envelope,
    task: Task,
    paths: Sequence[Path],
    build: TaskBuild,
    texts: list[str],
    parsed: Parsed,
    warnings: list[str],
    timer: Timer,
) -> Envelope:
    """Fill the envelope's common fields."""
    split = [split_thinking(t) for t in texts]
    envelope.task = task.name
    envelope.recipe = build.recipe
    envelope.inputs = [input_ref(p) for p in paths]
    envelope.n_images = build.n_images
    envelope.answer = "\n\n".join(s.answer for s in split)
    envelope.thinking = "\n\n".join(s.thinking for s in split if s.thinking) or None
    envelope.final_answer = parsed.final_answer
    envelope.payload = parsed.payload
    envelope.parse_error = parsed.error
    envelope.raw_output = texts
    envelope.details = build.details
    envelope.timings = timer.seconds
    warnings[:0] = envelope.warnings  # what the model itself warns about (untrained, base model ...) first
    if envelope.finish_reason == "length":
        warnings.append("the answer was cut at max_new_tokens")
    if parsed.error:
        warnings.append(f"could not parse the model output: {parsed.error}")
    envelope.warnings = warnings
    return envelope


def _remote(backend: Backend | bool) -> bool:
    return backend if isinstance(backend, bool) else bool(getattr(backend, "remote", False))


def should_deidentify(options: TaskOptions, backend: Backend | bool) -> bool:
    """``options.deid`` when set, else whether the backend is remote (``backend``: one, or whether it is)."""
    return options.deid if options.deid is not None else _remote(backend)


#: ``TaskOptions.extra`` key: send images that may carry burned-in text to a remote backend anyway
ALLOW_BURNED_IN = "allow_burned_in"


class BurnedInTextError(InputError):
    """An input's images may carry text (a name, an ID) and the backend is remote."""


def check_burned_in(build: TaskBuild, paths: Sequence[Path], options: TaskOptions) -> list[str]:
    """Before anything goes to a remote backend: inputs whose images may carry burned-in text (PDF pages, DICOM
    by :func:`medlens.io.deid.burned_in_reason`, the rule of ``medlens deid``) are refused unless
    ``options.extra["allow_burned_in"]``; allowed, each gives a warning."""
    from medlens.io.burned_in import burned_in_inputs

    found = burned_in_inputs(paths, build.details.get("series"))
    return burned_in_verdict(found, bool(options.extra.get(ALLOW_BURNED_IN)), "the backend is remote")


def burned_in_verdict(found: Sequence[tuple[str, str]], allowed: bool, where: str) -> list[str]:
    """:class:`BurnedInTextError` for the first of ``found`` (input, reason) unless ``allowed``; else the
    warnings saying what was sent."""
    if found and not allowed:
        path, reason = found[0]
        raise BurnedInTextError(
            f"its images may carry burned-in text ({reason}) and {where}: nothing was sent; use a local "
            "engine, or pass --allow-burned-in to send it anyway",
            path,
        )
    return [
        f"sent although its images may carry burned-in text ({r}), as --allow-burned-in allows: {p}" for p, r in found
    ]


def deidentify_build(
    build: TaskBuild, paths: Sequence[Path], backend: Backend | bool, terms: set[str] | None = None, note: bool = True
) -> set[str]:
    """Scrub every text part of the build's requests in place (:mod:`medlens.io.text_deid`: the names and
    identifiers found in the inputs, and patterns); a warning says so. Returns the terms (for a second stage)."""
    from medlens.io.text_deid import phi_terms, scrub_messages

    terms = phi_terms(paths) if terms is None else terms
    total = sum(scrub_messages(request.messages, terms) for request in build.requests)
    where = "a remote backend" if _remote(backend) else "the backend"
    if note:
        build.warnings.append(f"the text was de-identified before it was sent to {where}")
    build.details["deid_replacements"] = build.details.get("deid_replacements", 0) + total
    return terms


def input_ref(path: Path) -> InputRef:
    """A local input by its content hash; a ``dicomweb://`` reference (nothing local to hash) by its text's."""
    from medlens.io.dicomweb import is_dicomweb, parse_ref

    if is_dicomweb(path):
        ref = str(parse_ref(path))
        return InputRef(file=ref, sha256=hashlib.sha256(ref.encode()).hexdigest())
    return InputRef(file=str(path), sha256=sha256_of(path))


def _backend(model: str | Backend, engine: str, timer: Timer, reporter: Reporter, options: dict[str, Any]) -> Backend:
    if isinstance(model, Backend):
        return model
    with timer("load_model"), reporter.stage(f"Loading {model}"):
        return load_backend(model, engine, **options)
