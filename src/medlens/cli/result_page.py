"""``medlens ask --html FILE``: one self-contained HTML page of a result.

The page holds the images the model got (PNG data URIs, downscaled for the page), for localize the parsed
boxes drawn on the image, the answer, the warnings and the disclaimer. Every text from the model or the
input is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from medlens.tasks import TaskBuild

#: longest side of an image on the page: one image large, many as thumbnails
SINGLE_SIDE = 768
THUMB_SIDE = 256

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:70rem;margin:1.5rem auto;padding:0 1rem;color:#222}
h1{font-size:1.3rem} pre{white-space:pre-wrap;background:#f4f4f4;padding:.8rem;border-radius:4px}
.grid{display:flex;flex-wrap:wrap;gap:4px} .grid figure{margin:0} figcaption{font-size:.75rem;color:#666}
.warn li{color:#8a4b00} .disclaimer{font-size:.85rem;color:#555;border-top:1px solid #ccc;padding-top:.5rem}
"""


def sent_images(builds: Sequence[TaskBuild]) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """Every image of the builds' requests in prompt order, with its request's parse context."""
    found = []
    for build in builds:
        for request in build.requests:
            for message in request.messages:
                for part in message.get("content", []):
                    if isinstance(part, dict) and part.get("type") == "image":
                        found.append((part["image"], request.context))
    return found


def boxed_image(image: np.ndarray, context: dict[str, Any], boxes: list[dict[str, Any]]) -> Any:
    """The original (unpadded) image with the localize boxes drawn (their ``box_px`` are in its pixels)."""
    from medlens.tasks.localize import draw_overlay

    pad = context.get("padding")
    if pad:
        image = image[pad["y"] : pad["y"] + pad["height"], pad["x"] : pad["x"] + pad["width"]]
    return draw_overlay(image, boxes)


def data_uri(image: Any, side: int) -> str:
    """A PNG data URI of ``image`` (array or PIL image), its longest side at most ``side`` pixels."""
    import numpy as np
    from PIL import Image

    picture = Image.fromarray(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
    picture = picture.convert("RGB")
    picture.thumbnail((side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=False, compress_level=6)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def render_page(result: dict[str, Any], builds: Sequence[TaskBuild]) -> str:
    """The HTML text of the page for the envelope ``result`` and the task's builds."""
    esc = html.escape
    images = sent_images(builds)
    boxes = (result.get("payload") or {}).get("boxes") if result.get("task") == "localize" else None
    side = SINGLE_SIDE if len(images) <= 2 else THUMB_SIDE
    figures = []
    for n, (image, context) in enumerate(images, start=1):
        picture = boxed_image(image, context, boxes) if boxes and len(images) == 1 else image
        figures.append(
            f'<figure><img alt="image {n}" src="{data_uri(picture, side)}"><figcaption>{n}</figcaption></figure>'
        )
    inputs = ", ".join(esc(str(i.get("file", ""))) for i in result.get("inputs") or [])
    model = esc(str(result.get("model", "")))
    if result.get("untrained_test_model"):
        model += " <strong>(untrained test model: the answer means nothing)</strong>"
    rows = [
        ("Task", esc(str(result.get("task", "")))),
        ("Model", model),
        ("Inputs", inputs),
        ("Images sent", esc(str(result.get("n_images", len(images))))),
    ]
    if result.get("final_answer") is not None:
        rows.append(("Final answer", esc(str(result["final_answer"]))))
    table = "".join(f"<tr><th align=left>{k}</th><td>{v}</td></tr>" for k, v in rows)
    warnings = result.get("warnings") or []
    warn = (
        "<h2>Warnings</h2><ul class=warn>" + "".join(f"<li>{esc(str(w))}</li>" for w in warnings) + "</ul>"
        if warnings
        else ""
    )
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>medlens {esc(str(result.get('task', '')))} result</title><style>{_STYLE}</style></head><body>",
        f"<h1>medlens: {esc(str(result.get('task', '')))}</h1><table>{table}</table>",
        f"<h2>Images</h2><div class=grid>{''.join(figures)}</div>" if figures else "",
        f"<h2>Answer</h2><pre>{esc(str(result.get('answer') or ''))}</pre>",
        warn,
        f"<p class=disclaimer>{esc(str(result.get('disclaimer', '')))}</p></body></html>\n",
    ]
    return "".join(parts)


def write_page(path: str | Path, result: dict[str, Any], builds: Sequence[TaskBuild]) -> Path:
    """Write the page atomically; returns its path."""
    from medlens.files import write_text_atomic

    return write_text_atomic(path, render_page(result, builds))
