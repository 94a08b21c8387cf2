"""``medlens overlap TRAIN EVAL``: the leakage guard between a training and a held-out manifest (docs/overlap.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medlens import DISCLAIMER
from medlens.cli.options import OUTPUT, Output, print_json, uses
from medlens.errors import InputError
from medlens.finetune.overlap_defaults import IMAGE_HASH_DISTANCE, NGRAM, SIGLIP_THRESHOLD

ManifestArg = Annotated[Path, typer.Argument(metavar="TRAIN", help="The JSONL training manifest.", show_default=False)]


@uses(OUTPUT)
def overlap(
    train: ManifestArg,
    held_out: Annotated[Path, typer.Argument(metavar="EVAL", help="The held-out manifest.", show_default=False)],
    write_clean: Annotated[
        Path | None,
        typer.Option("--write-clean", metavar="OUT.jsonl", help="Write the training rows that overlap nothing."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole report as JSON.")] = False,
    siglip_model: Annotated[
        str | None,
        typer.Option(help="Also compare MedSigLIP image embeddings (test-tiny-siglip or a local MedSigLIP folder)."),
    ] = None,
    siglip_threshold: Annotated[
        float, typer.Option(min=-1.0, max=1.0, help="Embedding cosine from which two images are near duplicates.")
    ] = SIGLIP_THRESHOLD,
    image_hash_distance: Annotated[
        int, typer.Option(min=0, max=63, help="Perceptual-hash distance (bits of 64) up to which images match.")
    ] = IMAGE_HASH_DISTANCE,
    ngram: Annotated[int, typer.Option(min=1, help="Words per n-gram of the text check.")] = NGRAM,
    text_min_share: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Count a text pair only when this share of the EVAL row's n-grams match."),
    ] = 0.0,
    max_overlap: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, metavar="F", help="Exit 2 when more than this share of EVAL rows overlap."),
    ] = None,
    device: Annotated[str, typer.Option(help="Device of the MedSigLIP model: auto, cpu, cuda ...")] = "auto",
    *,
    output: Output,
) -> None:
    """Find held-out rows that overlap the training split: identical input files, near-duplicate images
    (perceptual hash; MedSigLIP cosine with --siglip-model) and shared 13-grams of question + answer."""
    from medlens.finetune.manifest import read_manifest
    from medlens.finetune.overlap import check_overlap

    train_rows = read_manifest(train)
    held_rows = read_manifest(held_out)
    report = check_overlap(
        train_rows,
        held_rows,
        image_hash_distance=image_hash_distance,
        ngram=ngram,
        siglip_model=siglip_model,
        siglip_threshold=siglip_threshold,
        text_min_share=text_min_share,
        device=device,
    )
    notes = []
    if write_clean is not None:
        kept = report.clean(train_rows)
        report.write_clean(train_rows, write_clean)
        notes.append(f"wrote {len(kept)} of {len(train_rows)} training rows that overlap nothing to {write_clean}")
    if as_json:
        print_json({"train": str(train), "held_out": str(held_out), **report.to_json()})
    else:
        for match in report.matches:
            typer.echo(f"{match.kind}\t{match.train_id}\t{match.held_out_id}\t{match.score:g}\t{match.detail}")
        typer.echo(f"{report.summary()}. {DISCLAIMER}")
    output.note(notes)
    if max_overlap is not None and report.fraction > max_overlap:
        raise InputError(
            f"{len(report.overlapping_held_out_ids)} of {report.n_held_out} held-out rows ({report.fraction:.1%}) "
            f"overlap {train}, more than --max-overlap {max_overlap:g}",
            str(held_out),
        )


def register(app: typer.Typer) -> None:
    app.command()(overlap)
