"""The training log (``train_log.jsonl``: step, loss, lr, tokens/s, memory per logging step) and the loss
plot (``loss.png`` with matplotlib when it is installed, else ``loss.svg`` written here: a polyline needs
no plotting library)."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

#: file names in the run folder
LOG_FILE = "train_log.jsonl"


def memory_gb() -> float:
    """Peak memory so far: CUDA's allocated peak when a GPU is in use, else this process's peak RSS."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 1024**3
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return peak / 1024**2


def log_callback(path: Path, tokens: Any) -> Any:
    """A transformers ``TrainerCallback`` appending a JSON line per log event to ``path``; ``tokens()`` gives
    the number of real tokens batched so far (for tokens/s)."""
    from transformers import TrainerCallback

    class TrainingLog(TrainerCallback):
        def __init__(self) -> None:
            self.last = (time.perf_counter(), 0.0)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if not logs or "loss" not in logs or not state.is_world_process_zero:
                return
            # SFTTrainer counts the tokens it trained on (``num_tokens``, cumulative); else the collator's count
            now, count = time.perf_counter(), float(logs.get("num_tokens") or tokens())
            seconds = max(now - self.last[0], 1e-9)
            row = {
                "step": state.global_step,
                "epoch": logs.get("epoch"),
                "loss": logs["loss"],
                "lr": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
                "tokens_per_s": (count - self.last[1]) / seconds,
                "memory_gb": memory_gb(),
            }
            self.last = (now, count)
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")

    return TrainingLog()


def read_log(path: Path) -> list[dict[str, Any]]:
    """The rows of a training log (none when it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss(rows: list[dict[str, Any]], folder: Path) -> Path | None:
    """The loss curve as ``loss.png`` (matplotlib) or ``loss.svg``; None without logged steps."""
    points = [(float(r["step"]), float(r["loss"])) for r in rows if r.get("loss") is not None]
    if not points:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _svg(points, folder / "loss.svg")
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(*zip(*points, strict=True))
    axes.set(xlabel="step", ylabel="training loss", title="training loss")
    figure.tight_layout()
    figure.savefig(folder / "loss.png", dpi=120)
    plt.close(figure)
    return folder / "loss.png"


def _svg(points: list[tuple[float, float]], path: Path, width: int = 600, height: int = 320) -> Path:
    margin = 48
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def at(x: float, y: float) -> str:
        px = margin + (x - x0) / (x1 - x0) * (width - 2 * margin)
        py = height - margin - (y - y0) / (y1 - y0) * (height - 2 * margin)
        return f"{px:.1f},{py:.1f}"

    line = " ".join(at(x, y) for x, y in points)
    bottom, right = height - margin, width - margin
    font = 'font-family="sans-serif" font-size="12"'
    text = f"""<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" {font}>
<rect width="100%" height="100%" fill="white"/>
<line x1="{margin}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="black"/>
<line x1="{margin}" y1="{margin}" x2="{margin}" y2="{bottom}" stroke="black"/>
<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{line}"/>
<text x="{width / 2}" y="20" text-anchor="middle">training loss</text>
<text x="{width / 2}" y="{height - 12}" text-anchor="middle">step {x0:g} to {x1:g}</text>
<text x="{margin - 4}" y="{margin}" text-anchor="end">{y1:.3g}</text>
<text x="{margin - 4}" y="{bottom}" text-anchor="end">{y0:.3g}</text>
</svg>
"""
    path.write_text(text, encoding="utf-8")
    return path


__all__ = ["LOG_FILE", "log_callback", "memory_gb", "plot_loss", "read_log"]
