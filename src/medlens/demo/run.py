"""``medlens demo``: a synthetic CT study through prepare and ask with test-tiny, shown on one HTML page."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from medlens import DISCLAIMER
from medlens.progress import Reporter

DEMO_SLICES = 120  # more than 85, so the page shows the equidistant sampling at work
DEMO_SIZE = 256
DEMO_QUESTION = 'Is there "liver lesion" in the CT volume? Answer with "Final Answer: yes" or "Final Answer: no".'
THUMB = 96


def run_demo(out: Path, reporter: Reporter | None = None) -> Path:
    """Write ``out/study`` (DICOM), ``out/prepared`` (PNG + manifest), ``out/montage.png`` and ``out/index.html``."""
    from medlens.api import ask, prepare_study, write_prepared
    from medlens.demo.phantom import ct_phantom, write_ct_series
    from medlens.prompts import messages_for

    reporter = reporter or Reporter(False)
    out = Path(out)
    study = out / "study"
    if study.exists():
        shutil.rmtree(study)
    with reporter.stage("Writing synthetic CT series"):
        hu, lesion = ct_phantom(n_slices=DEMO_SLICES, size=DEMO_SIZE)
        write_ct_series(hu, study)
    prepared = prepare_study(study, reporter=reporter)
    write_prepared(prepared, out / "prepared")
    result = ask(study, DEMO_QUESTION, "test-tiny", reporter=reporter)
    _montage(prepared.images).save(out / "montage.png")
    messages = messages_for(prepared, DEMO_QUESTION)
    page = out / "index.html"
    page.write_text(
        _render(
            n_source=prepared.n_source_slices,
            n_images=len(prepared.images),
            lesion=lesion,
            prompt_outline=_outline(messages),
            result_json=json.dumps(result, indent=2, ensure_ascii=False),
            result=result,
            question=DEMO_QUESTION,
            disclaimer=DISCLAIMER,
        )
    )
    return page


def _montage(images: list[np.ndarray], columns: int = 10):
    """A grid of small copies of the prepared slices, in prompt order."""
    from PIL import Image

    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * THUMB, rows * THUMB), "black")
    for i, image in enumerate(images):
        thumb = Image.fromarray(image).resize((THUMB, THUMB), Image.Resampling.BILINEAR)
        sheet.paste(thumb, ((i % columns) * THUMB, (i // columns) * THUMB))
    return sheet


def _outline(messages: list[dict]) -> list[str]:
    """The prompt as lines, images shown as [image]; long runs of slices elided."""
    lines: list[str] = []
    content = messages[0]["content"]
    for part in content:
        lines.append("[image]" if part["type"] == "image" else part["text"])
    if len(lines) > 14:
        lines = [*lines[:7], f"... ({len(lines) - 11} more parts: image, SLICE n) ...", *lines[-4:]]
    return lines


def _render(**values: object) -> str:
    from importlib.resources import files

    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    template = env.from_string(files("medlens.demo").joinpath("index.html.j2").read_text())
    return template.render(**values)
