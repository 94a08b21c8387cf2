"""One API request as a task run: the form read into task, question and options, the task run with
:func:`medlens.tasks.runner.run_task` on the shared (batched) backend, the envelope made client-facing
(upload names, never server paths) and, when asked, the images exactly as sent to the model."""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from medlens.backends import Backend
from medlens.errors import MedlensError
from medlens.io.limits import decoded_budget
from medlens.serve.problems import ApiError, BadField, redact_paths
from medlens.serve.scheduler import RunContext, StageReporter
from medlens.serve.settings import ServeSettings
from medlens.serve.uploads import StudyInput, Upload, UploadError, parse_inputs
from medlens.tasks import Task, TaskBuild, TaskOptions, get_task
from medlens.tasks.envelope import InputRef
from medlens.tasks.runner import run_task

#: TaskOptions fields a client may not set: they name server paths or load other models
SERVER_ONLY = frozenset({"overlay", "reasoner", "extra"})
#: whole-slide settings that size the server's reader processes: the operator's, not a client's
SLIDE_SERVER_ONLY = frozenset({"workers", "memory_mb", "timeout_s"})
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
PREVIEW_QUALITY = 90


@dataclass
class AnalyzeForm:
    """The checked form fields of an analyze / job / stream request."""

    task: str
    question: str | None
    options: TaskOptions
    return_images: bool
    inputs: list[dict[str, Any]] | None


def read_form(upload: Upload, settings: ServeSettings) -> AnalyzeForm:
    """Task, question, options, inputs and return_images from the form; 400/422 naming a bad field."""
    fields = upload.fields
    name = (fields.get("task") or "qa").strip()
    try:
        task = get_task(name)
    except MedlensError as exc:
        raise BadField(str(exc)) from None
    flag = fields.get("return_images", "").strip().lower()
    if flag not in TRUE_WORDS + FALSE_WORDS:
        raise BadField(f"form field 'return_images' must be true or false, got {flag[:20]!r}")
    return AnalyzeForm(
        task=name,
        question=fields.get("question") or None,
        options=task_options(task, fields.get("options"), settings),
        return_images=flag in TRUE_WORDS,
        inputs=parse_inputs(fields.get("inputs")),
    )


@typing.no_type_check
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TaskOptions)


def task_options(task: Task, text: str | None, settings: ServeSettings) -> TaskOptions:
    """:class:`TaskOptions` from the ``options`` JSON object; an unknown key -> 422 naming the nearest."""
    from pydantic import TypeAdapter, ValidationError

    from medlens.prep.slide_recipe import SlideOptions

    if text is None or not text.strip():
        return TaskOptions()
    try:
        given = json.loads(text)
    except ValueError as exc:
        raise BadField(f"form field 'options' is not JSON ({exc})") from None
    if not isinstance(given, dict):
        raise BadField("form field 'options' must be a JSON object")
    types = _field_types()
    declared = {decl.name: decl.type for decl in task.options}
    allowed = {k: v for k, v in types.items() if k not in SERVER_ONLY} | {
        k: v for k, v in declared.items() if k not in SERVER_ONLY
    }
    fields: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in given.items():
        if key not in allowed:
            if key in SERVER_ONLY:
                raise BadField(f"option {key!r} cannot be set over HTTP")
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise BadField(f"unknown option {key!r}{hint}")
        try:
            if key == "slide":
                if not isinstance(value, dict):
                    raise BadField("option 'slide' must be a JSON object")
                if refused := sorted(SLIDE_SERVER_ONLY & set(value)):
                    raise BadField(f"slide option {refused[0]!r} cannot be set over HTTP")
                known = [f.name for f in dataclasses.fields(SlideOptions) if f.name not in SLIDE_SERVER_ONLY]
                if unknown := sorted(set(value) - set(known)):
                    close = difflib.get_close_matches(str(unknown[0]), known, n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    raise BadField(f"unknown slide option {unknown[0]!r}{hint}")
                value = TypeAdapter(SlideOptions).validate_python(value)
            else:
                value = TypeAdapter(allowed[key]).validate_python(value)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise BadField(f"option {key!r}: {first['msg']}") from None
        (fields if key in types else extra)[key] = value
    cap = settings.max_new_tokens
    if (wanted := fields.get("max_new_tokens")) is not None and not 1 <= wanted <= cap:
        raise BadField(f"option 'max_new_tokens' must be within 1..{cap} (the server's cap), got {wanted}")
    return TaskOptions(**fields, extra=extra)


def run_analysis(
    form: AnalyzeForm,
    inputs: list[StudyInput],
    upload: Upload,
    backend: Backend,
    context: RunContext,
    settings: ServeSettings,
) -> dict[str, Any]:
    """Run the task; the envelope as JSON with upload names (plus ``images`` when asked). A typed medlens
    error becomes a 400 whose message names the upload, never a server path."""
    task = get_task(form.task)
    builds: list[TaskBuild] = []

    def watch(made: TaskBuild | None) -> TaskBuild | None:
        if made is not None:
            if made.n_images > settings.max_images:
                raise UploadError(
                    f"the study makes {made.n_images} images, over the server's {settings.max_images} (max_images)"
                )
            builds.append(made)
        return made

    task.build = _after(task.build, watch)  # type: ignore[method-assign]
    task.second_stage = _after(task.second_stage, watch)  # type: ignore[method-assign]
    try:
        with decoded_budget(settings.max_decoded_bytes):
            envelope = run_task(
                task, [i.path for i in inputs], form.question, backend, form.options, reporter=StageReporter(context)
            )
    except ApiError:
        raise
    except MedlensError as exc:
        if context.cancel.is_set():
            context.check()
        raise ApiError(redact_paths(str(exc), upload.names), 400, type(exc).__name__.split("[")[0]) from None
    envelope.inputs = [InputRef(file=i.name, sha256=i.sha256) for i in inputs]
    result = json.loads(redact_paths(json.dumps(envelope.model_dump(mode="json")), _json_names(upload.names)))
    if form.return_images:
        result["images"] = sent_images(builds)
    return result


def _after(method: Callable[..., Any], watch: Callable[[Any], Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        return watch(method(*args, **kwargs))

    return run


def _json_names(names: dict[str, str]) -> dict[str, str]:
    """The path prefixes as they appear inside JSON text."""
    return {json.dumps(k)[1:-1]: json.dumps(v)[1:-1] for k, v in names.items()}


def sent_images(builds: list[TaskBuild]) -> list[dict[str, Any]]:
    """Every image of the builds' prompts, in prompt order, as JPEG previews with a label
    (``slice n of N`` when the prompt names slices, else ``image n``)."""
    images: list[dict[str, Any]] = []
    for build in builds:
        for request in build.requests:
            for message in request.messages:
                content = message.get("content")
                parts = content if isinstance(content, list) else []
                found = [
                    (n, part["image"]) for n, part in enumerate(parts) if isinstance(part, dict) and "image" in part
                ]
                for n, image in found:
                    after = parts[n + 1] if n + 1 < len(parts) else {}
                    text = after.get("text", "") if isinstance(after, dict) else ""
                    slice_word = text.startswith("SLICE ") and text[6:].strip().isdigit()
                    label = f"slice {text[6:].strip()} of {len(found)}" if slice_word else f"image {len(images) + 1}"
                    images.append(preview(image, label))
    return images


def preview(image: Any, label: str) -> dict[str, Any]:
    """A display-only JPEG data URL of one prepared image (an RGB array or a PIL image)."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    picture = Image.fromarray(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
    picture = picture.convert("RGB")
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=PREVIEW_QUALITY)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return {
        "label": label,
        "width": picture.width,
        "height": picture.height,
        "data_url": f"data:image/jpeg;base64,{data}",
    }


def field_names() -> list[str]:
    """Every TaskOptions field a client may set (for docs and the task listing)."""
    return [f.name for f in dataclasses.fields(TaskOptions) if f.name not in SERVER_ONLY]
