"""MedSigLIP commands: ``medlens embed``, ``zeroshot``, ``probe [fit]|apply``, ``search add|query|info`` and
``siglip finetune``.

Import-light on purpose (the ``medlens`` app imports this module): numpy, torch, transformers and
scikit-learn are imported inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from medlens import DISCLAIMER
from medlens.cli.groups import default_command_group
from medlens.cli.options import OUTPUT, STUDY, ModelChoice, Output, StudyChoice, model_group, print_json, uses
from medlens.errors import InputError, MedlensError

if TYPE_CHECKING:
    from medlens.siglip.encoder import SiglipEncoder
    from medlens.siglip.index import SiglipIndex
    from medlens.siglip.inputs import EmbeddedStudy, InputRef

DEFAULT_MODEL = "test-tiny-siglip"
#: studies embedded per committed shard in ``search add`` (an interruption loses at most these)
ADD_CHUNK = 64

INPUTS_HELP = "Studies: DICOM file/folder/.zip, NIfTI, PNG/JPEG; or a CSV with columns path,label."
InputsArg = Annotated[list[Path], typer.Argument(help=INPUTS_HELP)]
MODEL_HELP = "test-tiny-siglip, or a local MedSigLIP folder (google/medsiglip-448)."
MODEL = model_group(DEFAULT_MODEL, MODEL_HELP, engines=False)
BatchOpt = Annotated[int, typer.Option(min=1, help="Images per forward pass.")]


def _encoder(model: ModelChoice, name: str | None = None) -> SiglipEncoder:
    """The encoder of ``name`` (default: the command's ``--model``) on the chosen device and dtype."""
    from medlens.backends import check_engine_options
    from medlens.siglip.encoder import SiglipEncoder

    check_engine_options("MedSigLIP", SiglipEncoder, model.args)
    return SiglipEncoder(name or model.name or DEFAULT_MODEL, device=model.device, dtype=model.dtype, **model.args)


def _warnings(encoder: SiglipEncoder, *more: list[str]) -> list[str]:
    found = [encoder.warning] if encoder.warning else []
    for extra in more:
        found.extend(w for w in extra if w not in found)
    return found


def _studies(
    encoder: SiglipEncoder, refs: list[InputRef], batch_size: int, study: StudyChoice, output: Output
) -> list[EmbeddedStudy]:
    from medlens.siglip.inputs import embed_studies

    return list(embed_studies(encoder, refs, batch_size, study.recipe, study.series, study.modality, output.reporter))


RAY_PANEL = "Ray"
FORMATS = ("npz", "parquet")


@uses(MODEL, STUDY, OUTPUT)
def embed(
    inputs: Annotated[list[Path] | None, typer.Argument(help=INPUTS_HELP)] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="The .npz file (default embeddings.npz), or the Parquet folder to write."),
    ] = None,
    text: Annotated[list[str] | None, typer.Option("--text", "-t", help="Also embed this text (repeatable).")] = None,
    batch_size: BatchOpt = 8,
    fmt: Annotated[
        str | None,
        typer.Option("--format", help="npz (one file, default) or parquet (a folder of shards; default with --ray)."),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="Run on Ray: local (a private Ray here), auto (this machine's cluster) or host:port.",
            rich_help_panel=RAY_PANEL,
        ),
    ] = None,
    replicas: Annotated[
        int, typer.Option(min=1, help="Encoder replicas (actors), with --ray.", rich_help_panel=RAY_PANEL)
    ] = 1,
    gpus_per_replica: Annotated[
        float, typer.Option(min=0, help="GPUs per encoder replica, with --ray.", rich_help_panel=RAY_PANEL)
    ] = 0.0,
    cpus_per_prepare: Annotated[
        float, typer.Option(min=0.1, help="CPUs per study preparation task, with --ray.", rich_help_panel=RAY_PANEL)
    ] = 1.0,
    *,
    model: ModelChoice,
    study: StudyChoice,
    output: Output,
) -> None:
    """Write MedSigLIP embeddings (one per image, L2-normalised) of studies and texts to an .npz file, or of a
    whole archive to Parquet shards (--format parquet, --ray: a bad study fails alone, see errors.jsonl)."""
    from medlens.siglip.inputs import expand_inputs

    chosen = fmt or ("parquet" if ray is not None else "npz")
    if chosen not in FORMATS:
        raise MedlensError(f"--format must be npz or parquet, not {chosen!r}")
    settings = _ray_settings(ray, replicas, gpus_per_replica, cpus_per_prepare)
    refs = expand_inputs(inputs or [])
    if chosen == "parquet":
        if text:
            raise MedlensError("--text goes into an .npz (--format npz); Parquet folders hold image embeddings")
        if out is None:
            raise MedlensError("--format parquet needs --out DIR, the folder for the shards")
        _embed_archive(refs, out, batch_size, settings, model, study, output)
        return
    if settings is not None:
        raise MedlensError("--ray writes Parquet shards: use --format parquet (the default with --ray)")
    _embed_npz(refs, out or Path("embeddings.npz"), list(text or []), batch_size, model, study, output)


def _ray_settings(address: str | None, replicas: int, gpus: float, cpus_per_prepare: float) -> Any:
    """The :class:`~medlens.pipeline.RaySettings` of ``--ray``; None without it."""
    if address is None:
        if replicas != 1 or gpus or cpus_per_prepare != 1.0:
            raise MedlensError("--replicas, --gpus-per-replica and --cpus-per-prepare go with --ray ADDRESS")
        return None
    if not address.strip():
        raise MedlensError("--ray needs an address: local, auto or host:port")
    from medlens.pipeline import RaySettings

    return RaySettings(
        address=address.strip(), replicas=replicas, gpus_per_replica=gpus, cpus_per_prepare=cpus_per_prepare
    )


def _embed_npz(
    refs: list[InputRef],
    out: Path,
    texts: list[str],
    batch_size: int,
    model: ModelChoice,
    study: StudyChoice,
    output: Output,
) -> None:
    import numpy as np

    from medlens.siglip.embedding_file import EmbeddingFile

    if not refs and not texts:
        raise MedlensError("nothing to embed: give studies and/or --text")
    encoder = _encoder(model)
    studies = _studies(encoder, refs, batch_size, study, output)
    result = EmbeddingFile(
        embeddings=np.concatenate([np.zeros((0, encoder.dim), np.float32)] + [s.embeddings for s in studies]),
        sources=[s.ref.source for s in studies for _ in range(s.n_images)],
        images=[i for s in studies for i in range(1, s.n_images + 1)],
        labels=[s.ref.label or "" for s in studies for _ in range(s.n_images)],
        model=encoder.name,
        fingerprint=encoder.fingerprint,
        texts=texts,
        text_embeddings=encoder.embed_texts(texts),
    )
    path = result.save(out)
    print_json(
        {
            "out": str(path),
            **encoder.info(),
            "n_studies": len(studies),
            "n_images": len(result.sources),
            "n_texts": len(texts),
            "warnings": _warnings(encoder, *[s.warnings for s in studies]),
            "disclaimer": DISCLAIMER,
        }
    )


def _embed_archive(
    refs: list[InputRef],
    out: Path,
    batch_size: int,
    settings: Any,
    model: ModelChoice,
    study: StudyChoice,
    output: Output,
) -> None:
    """Studies -> Parquet shards in ``out``, here or on Ray; failed studies in ``out/errors.jsonl``."""
    import time

    from medlens.backends import check_engine_options
    from medlens.siglip.archive import Collector, EncoderSpec, PrepareStudy, embed_local, input_rows, model_info
    from medlens.siglip.embedding_shards import ShardWriter
    from medlens.siglip.encoder import SiglipEncoder

    if not refs:
        raise MedlensError("nothing to embed: give studies or a CSV of them")
    check_engine_options("MedSigLIP", SiglipEncoder, model.args)
    spec = EncoderSpec(model.name or DEFAULT_MODEL, model.device, model.dtype, dict(model.args))
    info = model_info(spec)
    spec = EncoderSpec(info.name, model.device, model.dtype, dict(model.args))
    prepare = PrepareStudy(info.image_size, study.recipe, study.series, study.modality)
    collector = Collector(ShardWriter(out, info.name, info.fingerprint, info.dim))
    rows = input_rows(refs)
    start = time.perf_counter()
    if settings is None:
        embed_local(rows, prepare, spec, collector, batch_size, output.reporter)
    else:
        from medlens.siglip.archive_ray import embed_ray

        embed_ray(rows, prepare, spec, collector, batch_size, settings, output.reporter)
    wall = round(time.perf_counter() - start, 3)
    runner = {"runner": "local"} if settings is None else {"runner": "ray", "ray": settings.address}
    manifest = collector.writer.close(recipe=study.recipe, wall_s=wall, **runner)
    warnings = [info.warning] if info.warning else []
    warnings.extend(w for w in collector.warnings if w not in warnings)
    print_json(
        {
            "out": str(out),
            "model": info.name,
            "fingerprint": info.fingerprint,
            "dim": info.dim,
            **{k: manifest[k] for k in ("n_studies", "n_images", "n_failed", "shards")},
            "errors": str(out / manifest["errors"]) if manifest["n_failed"] else None,
            **runner,
            "wall_s": wall,
            "warnings": warnings,
            "disclaimer": DISCLAIMER,
        }
    )


@uses(MODEL, STUDY, OUTPUT)
def zeroshot(
    inputs: InputsArg,
    label: Annotated[list[str], typer.Option("--label", "-l", help="A class label (repeat for each class).")],
    template: Annotated[
        str, typer.Option(help="Text prompt of a label, e.g. 'a chest X-ray showing {label}'.")
    ] = "{label}",
    per_image: Annotated[bool, typer.Option("--per-image", help="Also score every image of a study.")] = False,
    batch_size: BatchOpt = 8,
    *,
    model: ModelChoice,
    study: StudyChoice,
    output: Output,
) -> None:
    """Zero-shot classification of each study among the labels; prints one JSON object per study (JSON Lines)."""
    from medlens.siglip.inputs import embed_studies, expand_inputs
    from medlens.siglip.zeroshot import clean_labels, label_prompts, zero_shot_scores

    labels = clean_labels(label)
    prompts = label_prompts(labels, template)
    refs = expand_inputs(inputs)
    encoder = _encoder(model)
    text_embeddings = encoder.embed_texts(prompts)
    embedded = embed_studies(encoder, refs, batch_size, study.recipe, study.series, study.modality, output.reporter)
    for one in embedded:
        scores = zero_shot_scores(encoder.logits(one.pooled(), text_embeddings)[0], labels)
        result: dict[str, Any] = {
            "input": one.ref.source,
            "n_images": one.n_images,
            **scores.as_dict(),
            "prompts": dict(zip(labels, prompts, strict=True)),
        }
        if one.ref.label is not None:
            result["true_label"] = one.ref.label
        if per_image:
            logits = encoder.logits(one.embeddings, text_embeddings)
            result["images"] = [
                {"image": i, **zero_shot_scores(row, labels).as_dict()} for i, row in enumerate(logits, start=1)
            ]
        result.update(
            model=encoder.name,
            warnings=_warnings(encoder, one.warnings, scores.warnings),
            disclaimer=DISCLAIMER,
        )
        print_json(result, indent=None)


@uses(MODEL, STUDY, OUTPUT)
def probe(
    data: Annotated[
        Path, typer.Argument(help="CSV with columns path,label (paths relative to it), or an .npz of `medlens embed`.")
    ],
    folds: Annotated[int, typer.Option(min=2, help="Cross-validation folds (fewer when a class is small).")] = 5,
    c: Annotated[float, typer.Option("--c", min=1e-6, help="Inverse L2 regularisation strength.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the fold split and the bootstrap.")] = 0,
    resamples: Annotated[int, typer.Option(min=100, help="Bootstrap resamples for the intervals.")] = 2000,
    save: Annotated[
        Path | None, typer.Option(help="Write the probe fitted on all studies (.npz), for `medlens probe apply`.")
    ] = None,
    batch_size: BatchOpt = 8,
    *,
    model: ModelChoice,
    study: StudyChoice,
    output: Output,
) -> None:
    """Linear probe (logistic regression) on study embeddings, cross-validated; prints metrics with 95% CIs."""
    from medlens.siglip.probe import cross_validate, fit_probe

    features, labels, info, warnings = _probe_data(data, model, batch_size, study, output)
    report = cross_validate(features, labels, folds=folds, c=c, seed=seed, n_resamples=resamples)
    result: dict[str, Any] = {"data": str(data), **info, **report.as_dict()}
    if save is not None:
        recipe = info.get("recipe", "")
        fitted = fit_probe(features, labels, c=c, model=info["model"], fingerprint=info["fingerprint"], recipe=recipe)
        result["saved"] = str(fitted.save(save))
    result["warnings"] = [*warnings, *report.warnings]
    result["disclaimer"] = DISCLAIMER
    print_json(result)


def _probe_data(
    data: Path, model: ModelChoice, batch_size: int, study: StudyChoice, output: Output
) -> tuple[Any, list[str], dict[str, Any], list[str]]:
    """One pooled embedding and one label per study, from a CSV (embedded now) or an embed .npz."""
    import numpy as np

    if data.suffix.lower() == ".npz":
        from medlens.siglip.embedding_file import EmbeddingFile

        stored = EmbeddingFile.load(data)
        sources, features, labels = stored.per_study()
        unlabelled = [s for s, label in zip(sources, labels, strict=True) if not label]
        if unlabelled:
            raise InputError(
                f"{len(unlabelled)} of {len(sources)} studies have no label (embed a CSV with columns path,label)",
                str(data),
            )
        info = {"model": stored.model, "fingerprint": stored.fingerprint, "dim": stored.dim}
        return features, labels, info, []
    from medlens.siglip.inputs import read_label_csv

    refs = read_label_csv(data, require_label=True)
    encoder = _encoder(model)
    studies = _studies(encoder, refs, batch_size, study, output)
    features = np.stack([s.pooled() for s in studies])
    labels = [s.ref.label or "" for s in studies]
    info = {"model": encoder.name, "fingerprint": encoder.fingerprint, "dim": encoder.dim, "recipe": study.recipe}
    return features, labels, info, _warnings(encoder, *[s.warnings for s in studies])


probe_app = typer.Typer(
    cls=default_command_group("fit"),
    help="Linear probes on MedSigLIP embeddings: `medlens probe DATA` (= `probe fit`) trains and cross-validates, "
    f"`medlens probe apply PROBE INPUTS` applies a saved one. {DISCLAIMER}",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
probe_app.command("fit")(probe)
PROBE_MODEL = model_group(None, "Model (default: the one the probe was trained on; another one is refused).", False)


@probe_app.command("apply")
@uses(PROBE_MODEL, STUDY, OUTPUT)
def probe_apply(
    probe_file: Annotated[Path, typer.Argument(help="A probe written by `medlens probe DATA --save FILE`.")],
    inputs: InputsArg,
    batch_size: BatchOpt = 8,
    *,
    model: ModelChoice,
    study: StudyChoice,
    output: Output,
) -> None:
    """Apply a saved probe to studies: one JSON object per study (JSON Lines) with the label and probabilities."""
    from medlens.siglip.inputs import expand_inputs
    from medlens.siglip.probe import LinearProbe

    probe = LinearProbe.load(probe_file)
    refs = expand_inputs(inputs)
    encoder = _encoder(model, model.name or probe.model)
    probe.check_model(encoder.name, encoder.fingerprint, encoder.dim, probe_file)
    notes = []
    if probe.recipe and probe.recipe != study.recipe:
        notes.append(f"the probe was trained on studies prepared with recipe {probe.recipe!r}, not {study.recipe!r}")
    for one in _studies(encoder, refs, batch_size, study, output):
        (applied,) = probe.apply(one.pooled()[None])
        result: dict[str, Any] = {"input": one.ref.source, "n_images": one.n_images, **applied}
        if one.ref.label is not None:
            result["true_label"] = one.ref.label
        result.update(
            probe=str(probe_file),
            model=encoder.name,
            warnings=_warnings(encoder, notes, one.warnings),
            disclaimer=DISCLAIMER,
        )
        print_json(result, indent=None)


# ---------------------------------------------------------------- siglip finetune

siglip_app = typer.Typer(
    help=f"Adapt MedSigLIP to your data. {DISCLAIMER}",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@siglip_app.command("finetune")
@uses(MODEL, OUTPUT)
def siglip_finetune(
    manifest: Annotated[
        Path, typer.Argument(help='JSONL of {"inputs": [...], "text": "..."} per line, or a CSV path,text.')
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: model/, train_log.jsonl, run.json.")],
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 100,
    batch_size: Annotated[int, typer.Option(min=2, help="Pairs per step (the negatives of each other).")] = 8,
    lr: Annotated[float | None, typer.Option(min=0.0, help="Learning rate (default: 1e-5 full, 1e-4 lora).")] = None,
    method: Annotated[str, typer.Option(help="full (every weight) or lora (adapters merged on save).")] = "full",
    lora_r: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = 16,
    lora_alpha: Annotated[int, typer.Option(min=1, help="LoRA alpha.")] = 16,
    warmup_ratio: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of steps warming up.")] = 0.03,
    max_grad_norm: Annotated[float, typer.Option(min=0.0, help="Gradient clipping norm.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the data order and of the LoRA initialisation.")] = 0,
    recipe: Annotated[str | None, typer.Option(help="Preparation recipe of the studies.")] = None,
    modality: Annotated[str | None, typer.Option(help="CT, MR, CR ... for inputs without DICOM metadata.")] = None,
    gradient_checkpointing: Annotated[bool, typer.Option(help="Trade compute for activation memory.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT/model if it exists.")] = False,
    *,
    model: ModelChoice,
    output: Output,
) -> None:
    """Contrastive fine-tuning (SigLIP sigmoid loss) on image-text pairs; `--model OUT/model` then works in
    every MedSigLIP command."""
    from medlens.backends import check_engine_options
    from medlens.finetune.siglip_contrastive import ContrastiveConfig, finetune_siglip
    from medlens.models.siglip_encoder import SiglipEncoder
    from medlens.prep import DEFAULT_RECIPE

    check_engine_options("MedSigLIP", SiglipEncoder, model.args)

    config = ContrastiveConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        method=method,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        warmup_ratio=warmup_ratio,
        max_grad_norm=max_grad_norm,
        seed=seed,
        recipe=recipe or DEFAULT_RECIPE,
        modality=modality,
        gradient_checkpointing=gradient_checkpointing,
    )
    summary = finetune_siglip(
        manifest,
        out,
        model.name or DEFAULT_MODEL,
        config,
        device=model.device,
        dtype=model.dtype,
        overwrite=overwrite,
        reporter=output.reporter,
        model_args=model.args,
    )
    print_json(summary)


# ---------------------------------------------------------------- search

search_app = typer.Typer(
    help=f"A persistent 'find similar cases' index of MedSigLIP embeddings. {DISCLAIMER}",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
IndexArg = Annotated[Path, typer.Argument(help="Index folder.")]
INDEX_MODEL = model_group(None, f"Model (default: the index's own; {DEFAULT_MODEL} for a new index).", engines=False)


ADD_HELP = INPUTS_HELP + " Or embeddings made already: a `medlens embed` .npz or Parquet folder."


@search_app.command("add")
@uses(INDEX_MODEL, STUDY, OUTPUT)
def search_add(
    index: IndexArg,
    inputs: Annotated[list[Path], typer.Argument(help=ADD_HELP)],
    label: Annotated[str | None, typer.Option(help="Label of the studies (a CSV's own labels win).")] = None,
    note: Annotated[str | None, typer.Option(help="A note stored with the studies.")] = None,
    batch_size: BatchOpt = 8,
    *,
    model: ModelChoice,
    study: StudyChoice,
    output: Output,
) -> None:
    """Add studies (one embedding per image) to the index, creating it if needed; already indexed ones are skipped.
    Embeddings from `medlens embed` (.npz, or the Parquet folder of --format parquet / --ray) are added as they
    are, without the model, if they were made with the index's model."""
    from medlens.siglip.index import SiglipIndex
    from medlens.siglip.inputs import InputRef, expand_inputs

    stored = [p for p in inputs if _is_embeddings(p)]
    studies = [p for p in inputs if not _is_embeddings(p)]
    existing = _open_index(index)
    refs = [InputRef(r.path.resolve(), r.label if r.label is not None else label) for r in expand_inputs(studies)]
    added = skipped = already = 0
    notes: list[str] = []
    for path in stored:
        outcome = _add_stored(index, existing, path, label, note, model)
        added, skipped = added + outcome.added, skipped + outcome.skipped
        existing = existing or SiglipIndex.open(index)
    if refs:
        one_added, one_skipped, already, notes = _add_studies(
            index, existing, refs, note, batch_size, model, study, output
        )
        added, skipped = added + one_added, skipped + one_skipped
    store = SiglipIndex.open(index)
    if store.method_for("auto") == "ann":
        store.sync_graph()  # the next query finds the graph current
    print_json(
        {
            "index": str(index),
            "model": store.model,
            "added_images": added,
            "skipped_images": skipped,
            "skipped_studies_already_indexed": already,
            "count": len(store),
            "search": store.method_for("auto"),
            "warnings": notes,
            "disclaimer": DISCLAIMER,
        }
    )


def _is_embeddings(path: Path) -> bool:
    from medlens.siglip.embedding_shards import is_embedding_folder

    return path.suffix.lower() == ".npz" or is_embedding_folder(path)


def _add_stored(
    index: Path, existing: SiglipIndex | None, path: Path, label: str | None, note: str | None, model: ModelChoice
) -> Any:
    """Embeddings of a `medlens embed` .npz or Parquet folder, refused unless made with the index's model (or
    with ``--model`` when given)."""
    import numpy as np

    from medlens.siglip.index import IndexEntry, SiglipIndex

    if path.suffix.lower() == ".npz":
        from medlens.siglip.embedding_file import EmbeddingFile

        npz = EmbeddingFile.load(path)
        vectors, name, fingerprint, dim = npz.embeddings, npz.model, npz.fingerprint, npz.dim
        rows = [
            (str(Path(s).resolve()), i, lab or None)
            for s, i, lab in zip(npz.sources, npz.images, npz.labels, strict=True)
        ]
    else:
        from medlens.siglip.embedding_shards import EmbeddingFolder

        folder = EmbeddingFolder.open(path)
        vectors, fields = folder.read()
        name, fingerprint, dim = folder.model, folder.fingerprint, folder.dim
        rows = [(f["path"], int(f["image"]), f["label"] or None) for f in fields]
    if model.name is not None:
        wanted = _fingerprint_of(model.name)
        if wanted != fingerprint:
            raise MedlensError(
                f"these embeddings were made with model {name!r} (fingerprint {fingerprint}), not with --model "
                f"{model.name} (fingerprint {wanted})",
                str(path),
            )
    if existing is not None:
        existing.check_compatible(name, fingerprint, dim)
    entries = [IndexEntry(source, image, lab if lab is not None else label, note) for source, image, lab in rows]
    store = SiglipIndex.open_or_create(index, name, fingerprint, dim)
    return store.add(np.asarray(vectors, np.float32).reshape(len(entries), dim), entries)


def _fingerprint_of(name: str) -> str:
    from medlens.models.builtins import EMBED
    from medlens.models.fingerprint import model_fingerprint
    from medlens.models.resolve import resolve_model

    return model_fingerprint(resolve_model(name, EMBED).path)


def _add_studies(
    index: Path,
    existing: SiglipIndex | None,
    refs: list[InputRef],
    note: str | None,
    batch_size: int,
    model: ModelChoice,
    study: StudyChoice,
    output: Output,
) -> tuple[int, int, int, list[str]]:
    """Embed and add studies a chunk at a time: (added, skipped images, studies already indexed, warnings)."""
    import numpy as np

    from medlens.siglip.index import IndexEntry, SiglipIndex

    encoder = _encoder(model, model.name or (existing.model if existing else DEFAULT_MODEL))
    if existing is not None:
        existing.check_compatible(encoder.name, encoder.fingerprint, encoder.dim)
    indexed = existing.sources() if existing is not None else set()
    todo = [r for r in refs if r.source not in indexed]
    added = skipped = 0
    notes: list[str] = []
    for start in range(0, len(todo), ADD_CHUNK):
        studies = _studies(encoder, todo[start : start + ADD_CHUNK], batch_size, study, output)
        vectors = np.concatenate([s.embeddings for s in studies])
        entries = [IndexEntry(s.ref.source, i, s.ref.label, note) for s in studies for i in range(1, s.n_images + 1)]
        # created only once the first studies are read, so a bad input leaves no empty index behind
        store = SiglipIndex.open_or_create(index, encoder.name, encoder.fingerprint, encoder.dim)
        outcome = store.add(vectors, entries)
        added, skipped = added + outcome.added, skipped + outcome.skipped
        notes.extend(w for s in studies for w in s.warnings)
    if not todo:
        SiglipIndex.open_or_create(index, encoder.name, encoder.fingerprint, encoder.dim)
    return added, skipped, len(refs) - len(todo), _warnings(encoder, notes)


@search_app.command("remove")
def search_remove(
    index: IndexArg,
    studies: Annotated[
        list[Path] | None, typer.Argument(help="Studies to take out (every image of each), as they were added.")
    ] = None,
    item_id: Annotated[
        list[int] | None, typer.Option("--id", help="Also take out this image by its id (repeatable).")
    ] = None,
) -> None:
    """Take studies (or single images by id) out of the index; they are never found again, and adding them
    again indexes them anew."""
    from medlens.siglip.index import SiglipIndex

    if not studies and not item_id:
        raise MedlensError("give the studies to remove and/or --id N")
    store = SiglipIndex.open(index)
    outcome = store.remove(sources=[str(p.resolve()) for p in studies or []], ids=item_id or [])
    if store.method_for("auto") == "ann":
        store.sync_graph()
    print_json(
        {
            "index": str(index),
            "removed_images": outcome.removed,
            "removed_studies": outcome.studies,
            "not_in_index": outcome.not_found,
            "count": len(store),
            "disclaimer": DISCLAIMER,
        }
    )


@search_app.command("query")
@uses(INDEX_MODEL, STUDY, OUTPUT)
def search_query(
    index: IndexArg,
    input: Annotated[Path | None, typer.Argument(help="A study to find similar cases for.")] = None,
    text: Annotated[str | None, typer.Option("--text", help="Search by a text description instead.")] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="How many results.")] = 5,
    method: Annotated[
        str, typer.Option(help="auto (exact for small indexes, else the HNSW graph), exact or ann.")
    ] = "auto",
    *,
    model: ModelChoice,
    study: StudyChoice,
    output: Output,
) -> None:
    """The indexed images most similar (cosine) to a study (mean of its image embeddings) or to a text."""
    from medlens.siglip.index import SiglipIndex
    from medlens.siglip.inputs import InputRef, embed_studies

    if (input is None) == (text is None):
        raise MedlensError("give either a study to search with or --text, not both or neither")
    store = SiglipIndex.open(index)
    chosen = store.method_for(method)
    encoder = _encoder(model, model.name or store.model)
    store.check_compatible(encoder.name, encoder.fingerprint, encoder.dim)
    notes: list[str] = []
    if input is not None:
        (one,) = embed_studies(
            encoder, [InputRef(input)], recipe=study.recipe, series=study.series, modality=study.modality
        )
        vector, query = one.pooled(), {"input": str(input), "n_images": one.n_images}
        notes = one.warnings
    else:
        vector, query = encoder.embed_texts([text or ""])[0], {"text": text}
    hits = store.search(vector, top_k, method=chosen)
    print_json(
        {
            "index": str(index),
            "model": store.model,
            "query": query,
            "method": chosen,
            "results": [hit.as_dict() for hit in hits],
            "warnings": _warnings(encoder, notes),
            "disclaimer": DISCLAIMER,
        }
    )


@search_app.command("info")
def search_info(index: IndexArg) -> None:
    """What the index holds: model, dimension, number of images and studies, labels."""
    from medlens.siglip.index import SiglipIndex

    print_json(SiglipIndex.open(index).info())


def _open_index(index: Path) -> SiglipIndex | None:
    """The index at ``index`` when there is one, else None."""
    from medlens.siglip.index import META_FILE, SiglipIndex

    return SiglipIndex.open(index) if (index / META_FILE).is_file() else None


def register(app: typer.Typer) -> None:
    """Add the MedSigLIP commands to the ``medlens`` app."""
    app.command()(embed)
    app.command()(zeroshot)
    app.add_typer(probe_app, name="probe")
    app.add_typer(search_app, name="search")
    app.add_typer(siglip_app, name="siglip")
