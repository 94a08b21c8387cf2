"""``medlens report RUN_DIR [RUN_DIR ...]``: one self-contained HTML page (inline SVG and PNG, no network)
with metrics and intervals beside the published MedGemma numbers, per-condition bars with error bars,
confusion matrices, an IoU histogram, and the worst errors with the images the model saw."""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from medlens import DISCLAIMER
from medlens.errors import MedlensError
from medlens.eval.runner import RESULTS, SAMPLES

WORST = 6
BAR_RESAMPLES = 300


def load_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A run's results and samples; a clear error when the folder is not a finished run."""
    run_dir = Path(run_dir)
    try:
        results = json.loads((run_dir / RESULTS).read_text())
        samples = [json.loads(line) for line in (run_dir / SAMPLES).read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise MedlensError(f"not a finished run folder (no {RESULTS}/{SAMPLES})", str(run_dir)) from None
    except json.JSONDecodeError as exc:
        raise MedlensError(f"damaged run files ({exc.msg})", str(run_dir)) from None
    return results, samples


def write_report(run_dirs: list[Path], out: Path) -> Path:
    """Render the page for one or more runs (side by side) to ``out``."""
    import jinja2

    runs = []
    for run_dir in run_dirs:
        results, samples = load_run(run_dir)
        runs.append(
            {
                "dir": str(run_dir),
                "results": results,
                "groups": _group_bars(results, samples),
                "confusion": _confusion(samples),
                "iou_histogram": _iou_histogram(samples),
                "worst": _worst(results, samples),
            }
        )
    metric_names = list(dict.fromkeys(name for run in runs for name in run["results"]["metrics"]))
    from importlib.resources import files

    source = files("medlens.eval").joinpath("report.html.j2").read_text()
    template = jinja2.Environment(autoescape=True).from_string(source)
    page = template.render(runs=runs, metric_names=metric_names, disclaimer=DISCLAIMER)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out


def _group_bars(results: dict[str, Any], samples: list[dict[str, Any]]) -> str | None:
    """SVG bars of the first metric per group (condition), with 95% bootstrap error bars."""
    from medlens.metrics.functions import METRICS
    from medlens.metrics.stats import bootstrap_ci

    groups = sorted({s["group"] for s in samples if s.get("group") is not None})
    if len(groups) < 2 or not results.get("metric_specs"):
        return None
    spec = results["metric_specs"][0]
    fn = METRICS.get(spec["fn"])
    rows = []
    for group in groups:
        subset = [s for s in samples if s.get("group") == group]
        interval = bootstrap_ci(
            fn,
            [s["prediction"] for s in subset],
            [s["target"] for s in subset],
            [group] * len(subset),
            n_resamples=BAR_RESAMPLES,
            **spec.get("options", {}),
        )
        rows.append((str(group), interval.value, interval.low, interval.high, len(subset)))
    return _bars_svg(rows, f"{spec['name']} per condition")


def _bars_svg(rows: list[tuple[str, float, float, float, int]], title: str) -> str:
    width, label_w, row_h = 640, 200, 22
    plot_w = width - label_w - 60
    height = row_h * len(rows) + 40
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
        f'<text x="4" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>',
    ]
    for i, (label, value, low, high, n) in enumerate(rows):
        y = 28 + i * row_h
        v, lo, hi = (0.0 if np.isnan(x) else x for x in (value, low, high))
        parts += [
            f'<text x="4" y="{y + 14}" font-size="12">{html.escape(label[:28])} (n={n})</text>',
            f'<rect x="{label_w}" y="{y + 3}" width="{plot_w * v:.1f}" height="{row_h - 8}" fill="#4c78a8"/>',
            f'<line x1="{label_w + plot_w * lo:.1f}" x2="{label_w + plot_w * hi:.1f}" y1="{y + 10}" '
            f'y2="{y + 10}" stroke="#222" stroke-width="1.5"/>',
            f'<text x="{label_w + plot_w + 6}" y="{y + 14}" font-size="12">{100 * v:.1f}</text>',
        ]
    parts.append("</svg>")
    return "".join(parts)


def _confusion(samples: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Counts of (target, prediction) when both are single labels (classification benchmarks)."""
    pairs = [(s["target"], s["prediction"]) for s in samples]
    if not pairs or any(isinstance(t, list | dict) or isinstance(p, list | dict) for t, p in pairs):
        return None
    labels = sorted({str(t) for t, _ in pairs})
    if not 2 <= len(labels) <= 12:
        return None
    columns = [*labels, *sorted({str(p) for _, p in pairs if p is not None and str(p) not in labels})]
    if any(p is None for _, p in pairs):
        columns.append("unparsed")
    counts = Counter((str(t), "unparsed" if p is None else str(p)) for t, p in pairs)
    peak = max(counts.values())
    return {"rows": labels, "columns": columns, "counts": counts, "peak": peak}


def _iou_histogram(samples: list[dict[str, Any]]) -> str | None:
    values = [s["scores"].get("mean_iou") for s in samples if s.get("scores", {}).get("mean_iou") is not None]
    if not values:
        return None
    counts, edges = np.histogram(values, bins=10, range=(0.0, 1.0))
    width, height, bar_w = 420, 180, 36
    top = max(int(counts.max()), 1)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
        '<text x="4" y="14" font-size="13" font-weight="bold">IoU per item</text>',
    ]
    for i, count in enumerate(counts):
        h = 130 * count / top
        parts += [
            f'<rect x="{20 + i * bar_w}" y="{150 - h:.1f}" width="{bar_w - 4}" height="{h:.1f}" fill="#f58518"/>',
            f'<text x="{20 + i * bar_w}" y="166" font-size="10">{edges[i]:.1f}</text>',
            f'<text x="{22 + i * bar_w}" y="{146 - h:.1f}" font-size="10">{count}</text>',
        ]
    parts.append("</svg>")
    return "".join(parts)


def _worst(results: dict[str, Any], samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The lowest-scoring items (or the wrong ones), with thumbnails of the images the model saw."""
    first = results["metric_specs"][0]["name"] if results.get("metric_specs") else None

    def badness(sample: dict[str, Any]) -> float:
        score = sample.get("scores", {}).get(first) if first else None
        if score is not None:
            return float(score)
        return 1.0 if sample["prediction"] == sample["target"] else 0.0

    ranked = sorted(samples, key=badness)[:WORST]
    return [
        {
            "id": s["id"],
            "score": badness(s),
            "prediction": json.dumps(s["prediction"], ensure_ascii=False),
            "target": json.dumps(s["target"], ensure_ascii=False),
            "raw_output": s["raw_output"][:1500],
            "prompt": s["prompt"][-800:],
            "images": [img for path in s.get("inputs", {}) for img in _thumbnails(Path(path))][:6],
        }
        for s in ranked
        if badness(s) < 1.0
    ]


def _thumbnails(path: Path, size: int = 160, most: int = 4) -> list[str]:
    """PNG data URLs of what the model saw for ``path`` (a few slices of a volume); [] when unavailable."""
    from PIL import Image

    from medlens.errors import MedlensError as Error
    from medlens.prep import prepare_study

    if path.suffix.lower() in (".json", ".txt", ".md", ".pdf") or not path.exists():
        return []
    try:
        images = prepare_study(path).images
    except Error:
        return []
    step = max(1, len(images) // most)
    out = []
    for image in images[::step][:most]:
        thumb = Image.fromarray(image)
        thumb.thumbnail((size, size))
        buffer = io.BytesIO()
        thumb.save(buffer, format="PNG")
        out.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return out
