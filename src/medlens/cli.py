"""The ``medlens`` command line. Exit codes: 0 success, 2 bad input or usage (one line on stderr), 1 bugs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from medlens import DISCLAIMER
from medlens.errors import MedlensError
from medlens.prep import DEFAULT_RECIPE

app = typer.Typer(
    name="medlens",
    help=f"Run MedGemma on DICOM, NIfTI and image studies, prepared as MedGemma 1.5 expects. {DISCLAIMER}",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

InputArg = Annotated[
    Path,
    typer.Argument(
        help="DICOM file, folder (searched recursively) or .zip; NIfTI; PNG/JPEG; a whole slide (SVS, TIFF, NDPI, "
        "MRXS ... or a DICOM WSI folder)."
    ),
]
RecipeOpt = Annotated[str, typer.Option(help="Preparation recipe.")]
SeriesOpt = Annotated[
    str | None, typer.Option(help="SeriesInstanceUID (or its short hash) when the study has several series.")
]
ModalityOpt = Annotated[str | None, typer.Option(help="CT, MR, CR ... for inputs without DICOM metadata.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
# Whole-slide images (SVS, TIFF, NDPI, MRXS ... and DICOM WSI).
MagnificationOpt = Annotated[
    float | None, typer.Option(help="Slides: 5, 10 or 20 (default 20x, or the most the slide has).")
]
MaxPatchesOpt = Annotated[int, typer.Option(min=1, help="Slides: at most this many patches (seeded sample).")]
MinTissueOpt = Annotated[float, typer.Option(min=0.0, max=1.0, help="Slides: least tissue fraction of a patch.")]
SeedOpt = Annotated[int, typer.Option(help="Slides: seed of the patch sample.")]
TissueOpt = Annotated[str | None, typer.Option(help="Slides: tissue type for the prompt (breast, colon ...).")]
ProcedureOpt = Annotated[str | None, typer.Option(help="Slides: procedure for the prompt (core biopsy ...).")]
MppOpt = Annotated[float | None, typer.Option(help="Slides: level-0 microns per pixel, when the file lacks it.")]
WorkersOpt = Annotated[
    int | None, typer.Option(min=0, help="Slides: reader processes (default one per CPU; 0 = no isolation).")
]
SlideBackendOpt = Annotated[str | None, typer.Option(help="Slides: openslide, tiffslide or wsidicom.")]


def _reporter(quiet: bool):
    from medlens.progress import Reporter

    return Reporter(enabled=not quiet)


def _slide_options(**values):
    from medlens.prep.slide_recipe import SlideOptions

    return SlideOptions(**values)


def _note(lines: list[str], quiet: bool) -> None:
    if not quiet:
        for line in lines:
            typer.echo(f"medlens: {line}", err=True)


@app.command()
def prepare(
    input: InputArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for 0001.png ... and manifest.json.")],
    recipe: RecipeOpt = DEFAULT_RECIPE,
    series: SeriesOpt = None,
    modality: ModalityOpt = None,
    magnification: MagnificationOpt = None,
    max_patches: MaxPatchesOpt = 126,
    min_tissue: MinTissueOpt = 0.5,
    seed: SeedOpt = 0,
    mpp: MppOpt = None,
    workers: WorkersOpt = None,
    slide_backend: SlideBackendOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Write exactly the images the model would see (before the processor's resize) and a manifest; for a
    whole slide the patches, their level-0 coordinates and an overview.png of tissue and patches."""
    from medlens.api import prepare_study, write_prepared

    slide = _slide_options(
        magnification=magnification,
        max_patches=max_patches,
        min_tissue=min_tissue,
        seed=seed,
        mpp=mpp,
        workers=workers,
        backend=slide_backend,
    )
    prepared = prepare_study(input, recipe, series, modality, _reporter(quiet), slide=slide)
    manifest = write_prepared(prepared, out)
    _note(prepared.warnings, quiet)
    _note([f"wrote {len(prepared.images)} image(s) ({prepared.modality}, {prepared.family}) and {manifest}"], quiet)


@app.command()
def ask(
    args: Annotated[
        list[str],
        typer.Argument(
            help="Input(s) then the question: INPUT [INPUT2] QUESTION. Tasks with a default prompt "
            "(localize, lab-extract, report ...) need no question.",
            metavar="INPUT... [QUESTION]",
        ),
    ],
    task: Annotated[
        str,
        typer.Option(
            "--task",
            "-t",
            help="qa, localize, compare, lab-extract, ehr-qa, report, differential (see `medlens tasks`).",
        ),
    ] = "qa",
    model: Annotated[
        str, typer.Option("--model", "-m", help="test-tiny, a local model folder, or a cached HF id.")
    ] = "test-tiny",
    engine: Annotated[str, typer.Option(help="Backend engine.")] = "transformers",
    recipe: RecipeOpt = DEFAULT_RECIPE,
    series: SeriesOpt = None,
    modality: ModalityOpt = None,
    instruction: Annotated[str | None, typer.Option(help="Replace the text placed before the slices.")] = None,
    think: Annotated[bool, typer.Option("--think", help="Switch on MedGemma's thinking mode.")] = False,
    max_new_tokens: Annotated[int | None, typer.Option(min=1, help="Cap on generated tokens.")] = None,
    overlay: Annotated[Path | None, typer.Option(help="localize: write the boxes drawn on the image (PNG).")] = None,
    dpi: Annotated[int, typer.Option(min=50, max=600, help="lab-extract: PDF render resolution.")] = 150,
    token_budget: Annotated[int, typer.Option(min=200, help="ehr-qa: token budget of the summary.")] = 6000,
    reasoner: Annotated[str | None, typer.Option(help="differential: text model of stage 2.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="json, or a task's own format (csv for lab-extract).")] = "json",
    magnification: MagnificationOpt = None,
    max_patches: MaxPatchesOpt = 126,
    min_tissue: MinTissueOpt = 0.5,
    seed: SeedOpt = 0,
    tissue: TissueOpt = None,
    procedure: ProcedureOpt = None,
    mpp: MppOpt = None,
    workers: WorkersOpt = None,
    slide_backend: SlideBackendOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Run a task on your files with MedGemma; prints the result envelope as JSON (or --format)."""
    from medlens.api import ask as ask_api
    from medlens.tasks import get_task

    chosen = get_task(task)
    inputs, question = split_inputs(args)
    result = ask_api(
        inputs,
        question,
        model,
        task=task,
        engine=engine,
        reporter=_reporter(quiet),
        recipe=recipe,
        series=series,
        modality=modality,
        instruction=instruction,
        thinking=think,
        max_new_tokens=max_new_tokens,
        overlay=overlay,
        dpi=dpi,
        token_budget=token_budget,
        reasoner=reasoner,
        slide=_slide_options(
            magnification=magnification,
            max_patches=max_patches,
            min_tissue=min_tissue,
            seed=seed,
            tissue=tissue,
            procedure=procedure,
            mpp=mpp,
            workers=workers,
            backend=slide_backend,
        ),
    )
    _emit(chosen, result, fmt, quiet)


@app.command()
def parse(
    task: Annotated[str, typer.Argument(help="Task whose parser to use.")],
    image_size: Annotated[
        str | None, typer.Option(help="localize: WxH of the original image, for pixel boxes.")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="json or a task's own format.")] = "json",
) -> None:
    """Parse a model's raw output (stdin) with a task's parser, e.g. output from a hosted endpoint."""
    from medlens.tasks import get_task
    from medlens.tasks.runner import parse_output

    chosen = get_task(task)
    context = chosen.parse_context(image_size=image_size)
    parsed = parse_output(chosen, sys.stdin.read(), context)
    result = {
        "task": chosen.name,
        "final_answer": parsed.final_answer,
        "payload": parsed.payload,
        "parse_error": parsed.error,
        "warnings": parsed.warnings,
        "disclaimer": DISCLAIMER,
    }
    _emit(chosen, result, fmt, quiet=False)


@app.command()
def tasks() -> None:
    """List the tasks."""
    from medlens.tasks import TASKS, get_task

    for name in TASKS:
        task = get_task(name)
        typer.echo(f"{name:<14} {task.description}")


@app.command(name="eval")
def eval_command(
    benchmark: Annotated[str | None, typer.Option("--benchmark", "-b", help="Benchmark name or YAML file.")] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="Model (as for ask).")] = "test-tiny",
    list_: Annotated[bool, typer.Option("--list", help="List the benchmarks.")] = False,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N items.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run folder (default runs/BENCHMARK-MODEL).")] = None,
    data: Annotated[Path | None, typer.Option(help="Data root (default $MEDLENS_DATA or ~/medlens-data).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Requests per generate call.")] = 8,
    engine: Annotated[str, typer.Option(help="Backend engine.")] = "transformers",
    resamples: Annotated[int, typer.Option(min=100, help="Bootstrap resamples for the intervals.")] = 1000,
    judge: Annotated[str | None, typer.Option(help="A model that also grades free-text answers (MedPix).")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Run a benchmark (resumable: rerun the same command after a crash), or --list them."""
    if list_:
        _list_benchmarks()
        return
    if not benchmark:
        raise MedlensError("give --benchmark NAME (see medlens eval --list)")
    from medlens.eval.runner import run_benchmark

    run_dir = out or Path("runs") / f"{Path(benchmark).stem}-{_slug(model)}"
    results = run_benchmark(
        benchmark,
        model,
        out_dir=run_dir,
        data=data,
        limit=limit,
        batch_size=batch_size,
        engine=engine,
        n_resamples=resamples,
        judge=judge,
        reporter=_reporter(quiet),
    )
    published = results["published"]
    for name, m in results["metrics"].items():
        if m["value"] is None:
            typer.echo(f"{results['benchmark']} {name}: undefined on these items (n={m['n']})")
            continue
        line = (
            f"{results['benchmark']} {name}: {100 * m['value']:.1f} "
            f"(95% CI {100 * m['ci_low']:.1f}-{100 * m['ci_high']:.1f}, n={m['n']})"
        )
        if published.get("value") is not None and published.get("metric") == name:
            line += f"; published {published['model']}: {published['value']}"
        typer.echo(line)
    _note(
        [f"{results['n_reused']} of {results['n_items']} outputs reused from the journal; run folder {run_dir}"], quiet
    )


@app.command()
def compare(
    run_a: Annotated[Path, typer.Argument(help="First run folder.")],
    run_b: Annotated[Path, typer.Argument(help="Second run folder (same benchmark).")],
    resamples: Annotated[int, typer.Option(min=100, help="Bootstrap resamples.")] = 2000,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Compare two runs on the same items: paired bootstrap, McNemar's exact test, items needed."""
    from medlens.eval.compare import compare_runs, format_comparison

    result = compare_runs(run_a, run_b, n_resamples=resamples)
    typer.echo(json.dumps(result, indent=2) if as_json else format_comparison(result))


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (several are shown side by side).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="HTML file to write.")] = Path("report.html"),
) -> None:
    """Write a self-contained HTML report of one or more evaluation runs."""
    from medlens.eval.report import write_report

    typer.echo(f"report written: {write_report(runs, out)}")


def _list_benchmarks() -> None:
    from medlens.eval.registry import benchmark_files
    from medlens.eval.spec import load_spec

    for name, path in benchmark_files().items():
        spec = load_spec(path)
        metrics = ", ".join(m.name for m in spec.metrics)
        published = spec.published
        pub = f"{published.metric} {published.value} ({published.model})" if published.value is not None else "-"
        typer.echo(f"{name:<22} {metrics:<34} published: {pub}")


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in Path(text).name or text)[:60]


def split_inputs(args: list[str]) -> tuple[list[str], str | None]:
    """INPUT... [QUESTION]: the last argument is the question when it is not an existing file or folder."""
    if len(args) > 1 and not Path(args[-1]).exists():
        return args[:-1], args[-1]
    return args, None


def _emit(task, result: dict, fmt: str, quiet: bool) -> None:
    """Print the result as JSON, or in the task's own format (warnings then go to stderr)."""
    if fmt == "json":
        typer.echo(json.dumps(result, indent=2, ensure_ascii=False))
        return
    rendered = task.render(result.get("payload") or {}, fmt)
    if rendered is None:
        raise MedlensError(f"task {task.name} has no {fmt!r} format (use json)")
    typer.echo(rendered, nl=False)
    _note(result.get("warnings", []), quiet)
    if result.get("parse_error"):
        raise MedlensError(f"could not parse the model output: {result['parse_error']}")


@app.command()
def inspect(input: InputArg, quiet: QuietOpt = False) -> None:
    """List the series of a DICOM input (UIDs shown as short hashes, usable with --series), or the pyramid of
    a whole slide (levels, mpp, magnifications; never its label or macro image)."""
    from medlens.io.dicom import list_series
    from medlens.io.discover import discover
    from medlens.io.slide import find_slide

    found = discover(input)
    spec = find_slide(input, None if input.is_file() and input.suffix.lower() != ".zip" else found)
    if spec is not None:
        with spec.open() as slide:
            info = slide.summary()
        typer.echo(
            f"slide ({info['backend']}): {info['width']}x{info['height']} px, mpp {info['mpp']}, "
            f"objective {info['objective_power']}"
        )
        for i, level in enumerate(info["levels"]):
            mag = f"{level['magnification']:.3g}x" if level["magnification"] else "magnification unknown"
            typer.echo(f"  level {i}: {level['width']}x{level['height']}, downsample {level['downsample']:g}, {mag}")
        return
    for cand in list_series(found.dicom, found.skipped):
        status = "ok" if not cand.problems else f"not usable: {cand.problems[0]}"
        typer.echo(f"{cand.summary()}  [{status}]")
    if found.skipped and not quiet:
        from medlens.io.dicom import skipped_summary

        typer.echo(skipped_summary(found.skipped), err=True)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo study and index.html.")] = Path(
        "demo-output"
    ),
    quiet: QuietOpt = False,
) -> None:
    """Write a synthetic CT study, prepare it, ask test-tiny about it, and write DIR/index.html."""
    from medlens.demo.run import run_demo

    page = run_demo(out, _reporter(quiet))
    _note([f"demo written: {page}"], quiet)


from medlens.cli_siglip import register as register_siglip  # noqa: E402

register_siglip(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point: typed medlens errors become one line on stderr and exit code 2."""
    try:
        code = app(args=argv, standalone_mode=False)
    except MedlensError as exc:
        typer.echo(f"medlens: error: {exc}".replace("\n", " "), err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("medlens: interrupted", err=True)
        sys.exit(130)
    except typer.exceptions.TyperException as exc:  # usage errors: typer prints them, exit code 2
        show = getattr(exc, "show", None)
        if show is None:
            raise
        show()
        sys.exit(getattr(exc, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
