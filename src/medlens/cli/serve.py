"""``medlens serve``: the study-level HTTP API (see docs/serve.md). Secure by default: loopback unless
``--host`` says otherwise, and then only with an API key."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from medlens.cli.options import ModelChoice, model_group, uses
from medlens.errors import MedlensError
from medlens.interrupts import on_interrupt

if TYPE_CHECKING:
    from medlens.serve.settings import ServeSettings

MODEL_HELP = "test-tiny, a local model folder, a cached HF id, or ENGINE:MODEL@URL."


def read_api_key(path: Path | None) -> str | None:
    """The key from ``--api-key-file`` (its first line), else ``MEDLENS_API_KEY``, else None."""
    if path is None:
        key = os.environ.get("MEDLENS_API_KEY")
        return key.strip() if key is not None else None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MedlensError(f"cannot read the API key file ({exc.__class__.__name__})", str(path)) from None
    key = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not key:
        raise MedlensError("the API key file is empty", str(path))
    return key


def check_port(host: str, port: int) -> None:
    """Fail early, in one line, when the address cannot be listened on."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise MedlensError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None


@uses(model_group("test-tiny", MODEL_HELP))
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on (non-loopback needs an API key).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port.")] = 8080,
    api_key_file: Annotated[
        Path | None, typer.Option(help="File holding the API key (else env MEDLENS_API_KEY).")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Jobs database and upload area (default $MEDLENS_CACHE/serve).")
    ] = None,
    max_body_mb: Annotated[float, typer.Option(min=0.001, help="Largest request body (MB).")] = 512,
    max_files: Annotated[int, typer.Option(min=1, help="Most files per request.")] = 2000,
    max_images: Annotated[int, typer.Option(min=1, help="Most images sent to the model per request.")] = 200,
    max_decoded_mb: Annotated[float, typer.Option(min=0.001, help="Decoded pixels per input (MB).")] = 4096,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Cap on generated tokens per prompt.")] = 4096,
    max_queue: Annotated[int, typer.Option(min=1, help="Runs queued or running at once (then 429).")] = 32,
    timeout: Annotated[float, typer.Option(min=0.001, help="Seconds per request before 504.")] = 300,
    batch_size: Annotated[int, typer.Option(min=1, help="Most prompts per engine call.")] = 8,
    batch_wait_ms: Annotated[float, typer.Option(min=0, help="How long to gather a batch (ms).")] = 20,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    *,
    model: ModelChoice,
) -> None:
    """Serve the study-level HTTP API and its web page (research use only)."""
    from medlens.serve.settings import ServeSettings, check_settings

    if log_level.lower() not in ("debug", "info", "warning", "error"):
        raise MedlensError(f"--log-level must be debug, info, warning or error, got {log_level!r}")
    values = {
        "model": model.name or "test-tiny",
        "engine": model.engine,
        "engine_options": model.engine_options(),
        "host": host,
        "port": port,
        "api_key": read_api_key(api_key_file),
        "max_body_mb": max_body_mb,
        "max_files": max_files,
        "max_images": max_images,
        "max_decoded_mb": max_decoded_mb,
        "max_new_tokens": max_new_tokens,
        "max_queue": max_queue,
        "timeout_s": timeout,
        "batch_size": batch_size,
        "batch_wait_ms": batch_wait_ms,
    }
    if data_dir is not None:
        values["data_dir"] = data_dir
    settings = ServeSettings(**values)
    check_settings(settings)
    _run(settings, log_level.lower())


def _run(settings: ServeSettings, log_level: str) -> None:
    from medlens.backends import check_backend_options, identify_backend
    from medlens.serve.app import create_app
    from medlens.serve.observe import configure_logging

    # a missing model, a bad adapter folder, an option the engine does not take: exit 2 now
    check_backend_options(settings.model, settings.engine, **settings.engine_options)
    identify_backend(settings.model, settings.engine, **settings.engine_options)
    check_port(settings.host, settings.port)
    configure_logging(log_level)
    import uvicorn

    app = create_app(settings)
    adapter = f" with adapter {settings.adapter}" if settings.adapter else ""
    typer.echo(
        f"medlens: serving {settings.model}{adapter} on http://{settings.host}:{settings.port} "
        "(research use only; Ctrl-C stops)",
        err=True,
    )
    stopped = f"server stopped; finished jobs stay in {settings.jobs_db} (a restarted server answers for them)"
    with on_interrupt(lambda: stopped):  # uvicorn shuts down gracefully, then passes the signal on
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            log_level="warning" if log_level != "debug" else "info",
            access_log=False,
            server_header=False,
        )


def register(app: typer.Typer) -> None:
    app.command()(serve)
