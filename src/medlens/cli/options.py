"""Option groups shared by the commands, each declared once.

A command decorated with :func:`uses` gets every option of the groups it names on its command line (in a
help panel per group) and receives each group as one object in the parameter of the group's name: a
:class:`ModelChoice`, a :class:`StudyChoice`, :class:`~medlens.prep.slide_recipe.SlideOptions`, an
:class:`Output`. Adding an option to a group adds it to every command that uses the group.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from medlens.errors import MedlensError

if TYPE_CHECKING:
    from medlens.prep.slide_recipe import SlideOptions

KEYWORD = inspect.Parameter.KEYWORD_ONLY


def option(name: str, kind: Any, default: Any, *flags: str, help: str, panel: str | None = None, **more: Any):
    """One command-line option as a parameter: ``--name-with-dashes`` (or ``flags``), its type and help."""
    info = typer.Option(*flags, help=help, rich_help_panel=panel, **more)
    return inspect.Parameter(name, KEYWORD, default=default, annotation=Annotated[kind, info])


@dataclass(frozen=True)
class OptionGroup:
    """Options several commands share: the command receives ``build(**values)`` in its parameter ``name``."""

    name: str
    options: tuple[inspect.Parameter, ...]
    build: Callable[..., Any]


def uses(*groups: OptionGroup) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the options of ``groups``; each group arrives built, as one keyword argument."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        names = {group.name for group in groups}
        # the group parameters' annotations are left unevaluated: their types may be imported for type checking only
        own = [_evaluated(command, p) for p in inspect.signature(command).parameters.values() if p.name not in names]
        params = own + [p for group in groups for p in group.options]

        @functools.wraps(command)
        def run(**values: Any) -> Any:
            for group in groups:
                values[group.name] = group.build(**{p.name: values.pop(p.name) for p in group.options})
            return command(**values)

        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return decorate


def _evaluated(command: Callable[..., Any], param: inspect.Parameter) -> inspect.Parameter:
    """``param`` keyword-only, its annotation evaluated in the command's module."""
    annotation = param.annotation
    if isinstance(annotation, str):
        annotation = eval(annotation, command.__globals__)
    return param.replace(kind=KEYWORD, annotation=annotation)


# ---------------------------------------------------------------- output


@dataclass(frozen=True)
class Output:
    """``--quiet``: progress bars and notes on stderr, or neither (results on stdout either way)."""

    quiet: bool = False

    @property
    def reporter(self) -> Any:
        from medlens.progress import Reporter

        return Reporter(enabled=not self.quiet)

    def note(self, lines: Iterable[str]) -> None:
        if not self.quiet:
            for line in lines:
                typer.echo(f"medlens: {line}", err=True)


def print_json(value: Any, indent: int | None = 2) -> None:
    """A result on stdout as JSON (non-ASCII kept)."""
    typer.echo(json.dumps(value, indent=indent, ensure_ascii=False))


OUTPUT = OptionGroup(
    "output",
    (option("quiet", bool, False, "--quiet", "-q", help="No progress bars or notes on stderr."),),
    Output,
)


# ---------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelChoice:
    """The model a command loads and how: engine, device, dtype and engine-specific ``--model-arg`` values."""

    name: str | None
    engine: str = "transformers"
    device: str = "auto"
    dtype: str = "auto"
    args: dict[str, Any] = field(default_factory=dict)

    def engine_options(self) -> dict[str, Any]:
        """What :func:`medlens.backends.load_backend` gets besides the model name."""
        from medlens.backends import engine_options

        return engine_options(self.device, self.dtype, self.args)


def parse_model_args(pairs: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; a value is read as JSON when it is JSON (numbers, true/false, null), else text."""
    args: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise MedlensError(f"--model-arg must look like KEY=VALUE, got {pair!r}")
        try:
            args[key.strip().replace("-", "_")] = json.loads(text)
        except ValueError:
            args[key.strip().replace("-", "_")] = text
    return args


def model_group(default: str | None, help: str, engines: bool = True) -> OptionGroup:
    """``--model`` (default ``default``), ``--engine`` and ``--adapter`` when the command has several engines,
    ``--device``, ``--dtype`` and ``--model-arg``; device and dtype spellings are checked before anything is read."""
    from medlens.models.device import DEVICE_CHOICES, DTYPE_CHOICES, check_device_name, check_dtype_name

    panel = "Model"
    params = [option("model", str | None if default is None else str, default, "--model", "-m", help=help, panel=panel)]
    if engines:
        from medlens.backends import ENGINES

        engines_help = f"Backend engine ({', '.join(ENGINES)}; see docs/engines.md)."
        params.append(option("engine", str, "transformers", help=engines_help, panel=panel))
        adapter_help = "PEFT adapter folder (LoRA) put on the model (transformers, vllm; see docs/adapters.md)."
        params.append(option("adapter", Path | None, None, "--adapter", help=adapter_help, panel=panel))
    params += [
        option("device", str, "auto", help=f"Where the model runs: {DEVICE_CHOICES}.", panel=panel),
        option("dtype", str, "auto", help=f"Weights dtype: {DTYPE_CHOICES} (auto: bfloat16 on GPU).", panel=panel),
        option(
            "model_arg",
            list[str] | None,
            None,
            "--model-arg",
            help="KEY=VALUE passed to the engine (e.g. share_prefix=false, timeout=60); repeatable.",
            panel=panel,
        ),
    ]

    def build(
        model: str | None,
        device: str,
        dtype: str,
        model_arg: list[str] | None,
        engine: str = "transformers",
        adapter: Path | None = None,
    ) -> ModelChoice:
        args = parse_model_args(model_arg)
        if adapter is not None:  # the engine's adapter= option (also --model-arg adapter=DIR)
            args["adapter"] = str(adapter)
        return ModelChoice(model, engine, check_device_name(device), check_dtype_name(dtype), args)

    return OptionGroup("model", tuple(params), build)


# ---------------------------------------------------------------- study


@dataclass(frozen=True)
class StudyChoice:
    """How a study is read and prepared: recipe, series, modality."""

    recipe: str
    series: str | None = None
    modality: str | None = None


def _study_group() -> OptionGroup:
    from medlens.prep.recipes import DEFAULT_RECIPE

    panel = "Study"
    return OptionGroup(
        "study",
        (
            option("recipe", str, DEFAULT_RECIPE, help="Preparation recipe.", panel=panel),
            option(
                "series",
                str | None,
                None,
                help="SeriesInstanceUID (or its short hash) when the study has several series.",
                panel=panel,
            ),
            option("modality", str | None, None, help="CT, MR, CR ... for inputs without DICOM metadata.", panel=panel),
        ),
        StudyChoice,
    )


STUDY = _study_group()


# ---------------------------------------------------------------- whole slides


def slide_group(prompt: bool) -> OptionGroup:
    """Whole-slide options; ``prompt`` adds tissue and procedure, which only the prompt uses."""
    panel = "Whole slides"
    params = [
        option(
            "magnification",
            float | None,
            None,
            help="5, 10 or 20 (default 20x, or the most the slide has).",
            panel=panel,
        ),
        option("max_patches", int, 126, min=1, help="At most this many patches (seeded sample).", panel=panel),
        option("min_tissue", float, 0.5, min=0.0, max=1.0, help="Least tissue fraction of a patch.", panel=panel),
        option("seed", int, 0, help="Seed of the patch sample.", panel=panel),
        option("mpp", float | None, None, help="Level-0 microns per pixel, when the file lacks it.", panel=panel),
        option(
            "workers",
            int | None,
            None,
            min=0,
            help="Decoding processes for slides and compressed DICOM (default every usable core; 0 = no isolation).",
            panel=panel,
        ),
        option("slide_backend", str | None, None, help="openslide, tiffslide or wsidicom.", panel=panel),
    ]
    if prompt:
        params += [
            option("tissue", str | None, None, help="Tissue type for the prompt (breast, colon ...).", panel=panel),
            option("procedure", str | None, None, help="Procedure for the prompt (core biopsy ...).", panel=panel),
        ]

    def build(slide_backend: str | None, **values: Any) -> SlideOptions:
        from medlens.io import worker_pool
        from medlens.prep.slide_recipe import SlideOptions

        worker_pool.configure(workers=values.get("workers"))  # compressed DICOM frames decode in the same pool
        return SlideOptions(backend=slide_backend, **values)

    return OptionGroup("slide", tuple(params), build)


INPUT_HELP = (
    "DICOM file, folder (searched recursively) or .zip; NIfTI; PNG/JPEG; a whole slide (SVS, TIFF, NDPI, MRXS ... "
    "or a DICOM WSI folder)."
)
InputArg = Annotated[Path, typer.Argument(help=INPUT_HELP)]
