"""``medlens embed --ray``: the archive embedding of :mod:`.archive` as a Ray Data pipeline.

Studies are one block each; ``flat_map(PrepareStudy)`` reads and prepares them on CPU tasks
(``cpus_per_prepare`` each), one output row per image with the encoder's pixels, so the model replicas do
nothing but forward passes; ``map_batches(EmbedBatch)`` runs on an actor pool (``replicas`` actors, each
loading the encoder once, ``gpus_per_replica`` GPUs each); the driver streams the results, in input order,
into the Parquet shards. A study that fails to read fails alone (its error row); one whose worker process
dies on every retry is reported in ``errors.jsonl`` as well. Ray is imported here only.
"""

from __future__ import annotations

from typing import Any

from medlens.errors import MedlensError
from medlens.pipeline.ray_rows import CRASHED
from medlens.pipeline.ray_session import connect, import_ray, quiet_data, typed_error
from medlens.pipeline.spec import RaySettings
from medlens.progress import Reporter
from medlens.siglip.archive import Collector, EmbedBatch, EncoderSpec, PrepareStudy


def embed_ray(
    rows: list[dict[str, Any]],
    prepare: PrepareStudy,
    spec: EncoderSpec,
    collector: Collector,
    batch_size: int,
    settings: RaySettings,
    reporter: Reporter | None = None,
) -> None:
    """Every study on the Ray cluster of ``settings``; rows reach ``collector`` in input order."""
    if not rows:
        return
    reporter = reporter or Reporter(False)
    ray = import_ray()
    started = connect(settings)
    try:
        with quiet_data():
            context = ray.data.DataContext.get_current()
            keep_order, context.execution_options.preserve_order = context.execution_options.preserve_order, True
            try:
                _run(ray, rows, prepare, spec, collector, batch_size, settings, reporter)
            finally:
                context.execution_options.preserve_order = keep_order
    except MedlensError:
        raise
    except Exception as exc:  # a Ray failure: the typed error behind it (a model that cannot load), or one line
        raise typed_error(exc) from None
    finally:
        if started:
            ray.shutdown()


def _run(
    ray: Any,
    rows: list[dict[str, Any]],
    prepare: PrepareStudy,
    spec: EncoderSpec,
    collector: Collector,
    batch_size: int,
    settings: RaySettings,
    reporter: Reporter,
) -> None:
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
    dataset = dataset.flat_map(prepare, num_cpus=settings.cpus_per_prepare)
    gpus = {"num_gpus": settings.gpus_per_replica} if settings.gpus_per_replica else {}
    dataset = dataset.map_batches(
        EmbedBatch,
        fn_constructor_kwargs={"spec": spec, "batch_size": batch_size},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=settings.replicas),
        num_cpus=settings.cpus_per_replica,
        **gpus,
    )
    with reporter.stage("Embedding studies on Ray", total=len(rows)) as update:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            collector.take(batch)
            update(len(collector.studies_done), len(rows))
    for row in rows:  # a block Ray gave up on (its worker died on every attempt): the study fails alone
        if row["row"] not in collector.studies_done:
            collector.writer.error(
                {
                    "row": row["row"],
                    "error": CRASHED,
                    "reason": "the worker process preparing or embedding this study died on every attempt",
                    "stage": "prepare",
                    "path": row["path"],
                }
            )
