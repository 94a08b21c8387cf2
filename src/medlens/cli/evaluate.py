"""``medlens eval`` (run a benchmark), ``medlens compare`` (two runs, paired) and ``medlens report`` (HTML)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from medlens.cli.options import OUTPUT, ModelChoice, Output, model_group, uses
from medlens.errors import MedlensError

if TYPE_CHECKING:
    from medlens.pipeline import RaySettings


@uses(model_group("test-tiny", "Model (as for ask)."), OUTPUT)
def eval_command(
    benchmark: Annotated[str | None, typer.Option("--benchmark", "-b", help="Benchmark name or YAML file.")] = None,
    list_: Annotated[bool, typer.Option("--list", help="List the benchmarks.")] = False,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N items.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run folder (default runs/BENCHMARK-MODEL).")] = None,
    data: Annotated[Path | None, typer.Option(help="Data root (default $MEDLENS_DATA or ~/medlens-data).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Requests per generate call.")] = 8,
    resamples: Annotated[int, typer.Option(min=100, help="Bootstrap resamples for the intervals.")] = 1000,
    judge: Annotated[str | None, typer.Option(help="A model that also grades free-text answers (MedPix).")] = None,
    recipe: Annotated[
        str, typer.Option(help="Preparation recipe (medgemma-1.5, or a parity recipe: see docs/recipe.md).")
    ] = "medgemma-1.5",
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            metavar="ADDRESS",
            help="Run on Ray: local (a private Ray here), auto (this machine's cluster) or host:port.",
            rich_help_panel="Ray",
        ),
    ] = None,
    replicas: Annotated[int, typer.Option(min=1, help="Model replicas (with --ray).", rich_help_panel="Ray")] = 1,
    gpus_per_replica: Annotated[
        float, typer.Option(min=0, help="GPUs per model replica (with --ray).", rich_help_panel="Ray")
    ] = 0.0,
    *,
    model: ModelChoice,
    output: Output,
) -> None:
    """Run a benchmark (resumable: rerun the same command after a crash), or --list them. With --adapter the
    outputs are keyed by the adapter too (nothing of the base model is reused) and go to their own folder.
    With --ray the items are prepared and answered on a Ray cluster (same journal, same results)."""
    if list_:
        _list_benchmarks()
        return
    if not benchmark:
        raise MedlensError("give --benchmark NAME (see medlens eval --list)")
    settings = ray_settings(ray, replicas, gpus_per_replica)
    from medlens.eval.runner import run_benchmark

    name = model.name or "test-tiny"
    adapter = model.args.get("adapter")
    suffix = f"+{_slug(str(adapter))}" if adapter else ""  # base and adapted runs in their own folders
    run_dir = out or Path("runs") / f"{Path(benchmark).stem}-{_slug(name)}{suffix}"
    results = run_benchmark(
        benchmark,
        name,
        out_dir=run_dir,
        data=data,
        limit=limit,
        batch_size=batch_size,
        engine=model.engine,
        backend_options=model.engine_options(),
        n_resamples=resamples,
        judge=judge,
        recipe=recipe,
        reporter=output.reporter,
        ray=settings,
    )
    published = results["published"]
    for metric, m in results["metrics"].items():
        if m["value"] is None:
            typer.echo(f"{results['benchmark']} {metric}: undefined on these items (n={m['n']})")
            continue
        line = (
            f"{results['benchmark']} {metric}: {100 * m['value']:.1f} "
            f"(95% CI {100 * m['ci_low']:.1f}-{100 * m['ci_high']:.1f}, n={m['n']})"
        )
        if published.get("value") is not None and published.get("metric") == metric:
            line += f"; published {published['model']}: {published['value']}"
        typer.echo(line)
    typer.echo(summary_line(results, run_dir))
    output.note(results.get("warnings", []))


def ray_settings(address: str | None, replicas: int, gpus_per_replica: float) -> RaySettings | None:
    """The :class:`~medlens.pipeline.RaySettings` of ``--ray``; None without it (then --replicas and
    --gpus-per-replica, which mean nothing locally, are refused)."""
    if address is None:
        if replicas != 1 or gpus_per_replica:
            raise MedlensError("--replicas and --gpus-per-replica need --ray (local, auto or host:port)")
        return None
    if not address.strip():
        raise MedlensError("--ray needs an address: local, auto or host:port")
    from medlens.pipeline import RaySettings

    return RaySettings(address=address.strip(), replicas=replicas, gpus_per_replica=gpus_per_replica)


def summary_line(results: dict, run_dir: Path) -> str:
    """One line: outputs, how many the parser could not read, how many were reused, and a test model's flag."""
    line = (
        f"{results['benchmark']}: {results['n_items']} outputs, {results['n_unparsed']} unparsed, "
        f"{results['n_reused']} reused from the journal; run folder {run_dir}"
    )
    if results.get("adapter"):
        line += f"; adapter {results['adapter']['name']} ({results['adapter']['sha256'][:12]})"
    if results.get("test_model") or results.get("untrained_test_model"):
        line += f"; test model {results['model']}: scores mean nothing"
    return line


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


def register(app: typer.Typer) -> None:
    app.command(name="eval")(eval_command)
    app.command()(compare)
    app.command()(report)
