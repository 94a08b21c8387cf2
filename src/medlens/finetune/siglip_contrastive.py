"""Contrastive fine-tuning of MedSigLIP (or ``test-tiny-siglip``) on image-text pairs, as a readable recipe:
setup, data, train, save.

Images are prepared exactly as ``medlens embed`` prepares them (:meth:`SiglipEncoder.pixels`: 448 px, bilinear
without antialias, [-1, 1]); texts are padded to 64 tokens. The loss is SigLIP's sigmoid loss with the model's
own learnable temperature and bias (:mod:`medlens.finetune.siglip_contrastive_loss`). Both towers train, in
full or through LoRA adapters (merged into the weights before saving), with float32 master weights (bfloat16
autocast on a GPU when the dtype asks for it). The loop is a plain PyTorch loop (AdamW, a linear schedule with
warmup): pooled multi-image rows do not fit a stock Trainer's collator without more code than the
loop itself. The saved folder is a SigLIP model folder: ``--model OUT/model`` works in every MedSigLIP command.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from medlens import DISCLAIMER, __version__
from medlens.errors import InputError, NotFoundError, OutputFolderError
from medlens.finetune.siglip_contrastive_data import PairRow, read_pairs, row_images, same_text_mask
from medlens.finetune.siglip_contrastive_loss import pool_rows, sigmoid_loss
from medlens.models.cache import write_marker
from medlens.models.fingerprint import model_fingerprint
from medlens.models.siglip_encoder import SiglipEncoder, pooled_output
from medlens.prep import DEFAULT_RECIPE
from medlens.progress import Reporter
from medlens.registry import Registry

MODEL_DIR = "model"
LOG_FILE = "train_log.jsonl"
RUN_FILE = "run.json"
#: the Linear layers of both towers' transformer blocks (the pooling heads stay as they are)
LORA_TARGETS = r".*encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))"


@dataclass(frozen=True)
class ContrastiveConfig:
    """What the run does; ``lr=None`` takes the method's default."""

    steps: int = 100
    batch_size: int = 8
    lr: float | None = None
    method: str = "full"
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    seed: int = 0
    recipe: str = DEFAULT_RECIPE
    modality: str | None = None
    gradient_checkpointing: bool = False

    def check(self) -> None:
        if self.steps < 1 or self.batch_size < 2:
            raise InputError(f"need steps >= 1 and batch size >= 2 (got {self.steps}, {self.batch_size})")
        METHODS.get(self.method)


@dataclass(frozen=True)
class TuningMethod:
    """How the weights train: what to wrap before training, how to unwrap before saving, the default lr."""

    wrap: Callable[[Any, ContrastiveConfig], Any]
    unwrap: Callable[[Any], Any]
    default_lr: float


def _lora_wrap(model: Any, config: ContrastiveConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, target_modules=LORA_TARGETS
    )
    with warnings.catch_warnings():  # peft reads a transformers property deprecated in v5
        warnings.simplefilter("ignore", FutureWarning)
        wrapped = get_peft_model(model, lora)
    for parameter in (model.logit_scale, model.logit_bias):  # the temperature and bias always learn
        parameter.requires_grad_(True)
    return wrapped


#: tuning methods by ``--method`` name
METHODS: Registry[TuningMethod] = Registry("tuning method")
METHODS.add("full", TuningMethod(lambda model, config: model, lambda model: model, 1e-5))
METHODS.add("lora", TuningMethod(_lora_wrap, lambda model: model.merge_and_unload(), 1e-4))


def _batches(n_rows: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Row indices in seeded random order, epoch after epoch; a batch never repeats a row."""
    rng = np.random.default_rng(seed)
    size = min(batch_size, n_rows)
    pending: list[int] = []
    while True:
        if len(pending) < size:
            pending += [int(i) for i in rng.permutation(n_rows) if int(i) not in pending]
        yield pending[:size]
        pending = pending[size:]


def _check_out(out: Path, overwrite: bool) -> None:
    if (out / MODEL_DIR).exists() and not overwrite:
        raise OutputFolderError(f"{out / MODEL_DIR} exists; give another --out or --overwrite", str(out))
    if out.exists() and not out.is_dir():
        raise OutputFolderError("not a folder", str(out))


def _check_inputs(rows: list[PairRow]) -> None:
    missing = [(row.id, path) for row in rows for path in row.inputs if not path.exists()]
    if missing:
        row_id, path = missing[0]
        raise NotFoundError(f"no such file (row {row_id}; {len(missing)} missing in all)", str(path))


def finetune_siglip(
    manifest: str | Path,
    out: str | Path,
    model: str = "test-tiny-siglip",
    config: ContrastiveConfig | None = None,
    device: str = "auto",
    dtype: str = "auto",
    overwrite: bool = False,
    reporter: Reporter | None = None,
    model_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model`` on the pairs of ``manifest``; write ``OUT/model``, ``OUT/train_log.jsonl`` (loss per
    step) and ``OUT/run.json``. Returns the run summary. ``model_args`` go to the loader (``--model-arg``)."""
    import torch

    # ---- setup
    config = config or ContrastiveConfig()
    config.check()
    out, reporter = Path(out), reporter or Reporter(False)
    rows = read_pairs(manifest)
    _check_inputs(rows)
    _check_out(out, overwrite)
    method = METHODS.get(config.method)
    torch.manual_seed(config.seed)
    encoder = SiglipEncoder(model, device=device, dtype="float32", **(model_args or {}))
    base = encoder.model
    autocast_dtype = _autocast_dtype(torch, dtype, encoder.device)
    if config.gradient_checkpointing:  # transformers 5 renamed it; 4.x has only the old name
        enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
        enable()
    wrapped = method.wrap(base, config)
    base.train()
    trainable = [p for p in base.parameters() if p.requires_grad]
    lr = config.lr if config.lr is not None else method.default_lr
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=config.weight_decay)
    warmup = round(config.warmup_ratio * config.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: linear_schedule(step, warmup, config.steps))
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG_FILE
    log_path.write_text("")

    # ---- train
    losses: list[float] = []
    started = time.monotonic()
    batches = _batches(len(rows), config.batch_size, config.seed)
    with reporter.stage("Fine-tuning MedSigLIP", total=config.steps) as update, log_path.open("a") as log:
        for step in range(1, config.steps + 1):
            batch = [rows[i] for i in next(batches)]
            with torch.autocast(encoder.device.split(":")[0], autocast_dtype, enabled=autocast_dtype is not None):
                loss = _batch_loss(encoder, batch, config, torch)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm))
            step_lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            entry = {
                "step": step,
                "loss": round(losses[-1], 6),
                "lr": step_lr,
                "grad_norm": round(grad_norm, 6),
                "temperature": round(float(base.logit_scale.detach().exp()), 6),
                "bias": round(float(base.logit_bias.detach()), 6),
                "rows": [row.id for row in batch],
                "seconds": round(time.monotonic() - started, 3),
            }
            log.write(json.dumps(entry) + "\n")
            log.flush()
            update(step, config.steps)

    # ---- save
    with warnings.catch_warnings():  # as in _lora_wrap
        warnings.simplefilter("ignore", FutureWarning)
        trained = method.unwrap(wrapped).eval()
    model_dir = _save(out, trained, encoder, config, overwrite)
    summary = {
        "out": str(out),
        "model_dir": str(model_dir),
        "base_model": encoder.name,
        "base_fingerprint": encoder.fingerprint,
        "fingerprint": model_fingerprint(model_dir),
        "method": config.method,
        "lr": lr,
        "n_pairs": len(rows),
        "steps": config.steps,
        "first_loss": round(losses[0], 6),
        "last_loss": round(losses[-1], 6),
        "seconds": round(time.monotonic() - started, 3),
        "config": asdict(config),
        "log": str(log_path),
        "warnings": [encoder.warning] if encoder.warning else [],
        "disclaimer": DISCLAIMER,
    }
    (out / RUN_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    # ---- cleanup
    encoder.close()
    return summary


def linear_schedule(step: int, warmup: int, total: int) -> float:
    """The learning-rate factor at ``step``: linear warmup over ``warmup`` steps, then linear decay to 0 at
    ``total`` (the schedule of transformers' ``get_linear_schedule_with_warmup``, whose module takes seconds to
    import)."""
    if step < warmup:
        return step / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _autocast_dtype(torch: Any, dtype: str, device: str) -> Any:
    """bfloat16/float16 autocast when asked for (``auto`` on a GPU), None for float32 training."""
    from medlens.models.device import select_dtype

    chosen = select_dtype(torch, dtype, device)
    return None if chosen == torch.float32 else chosen


def _batch_loss(encoder: SiglipEncoder, batch: list[PairRow], config: ContrastiveConfig, torch: Any) -> Any:
    """The sigmoid loss of one batch: every row's images pooled to one vector against every row's text."""
    model = encoder.model
    images = [row_images(row, config.recipe, config.modality) for row in batch]
    pixels = torch.from_numpy(encoder.pixels([image for row in images for image in row])).to(encoder.device)
    tokens = {k: torch.from_numpy(v).to(encoder.device) for k, v in encoder.tokenize([r.text for r in batch]).items()}
    image_rows = pool_rows(
        pooled_output(model.get_image_features(pixel_values=pixels)).float(), [len(i) for i in images]
    )
    text_rows = torch.nn.functional.normalize(pooled_output(model.get_text_features(**tokens)).float(), dim=-1)
    positives = torch.from_numpy(same_text_mask([r.text for r in batch])).to(encoder.device)
    return sigmoid_loss(image_rows, text_rows, model.logit_scale.float(), model.logit_bias.float(), positives)


def _save(out: Path, trained: Any, encoder: SiglipEncoder, config: ContrastiveConfig, overwrite: bool) -> Path:
    """``save_pretrained`` model and tokenizer into a temporary folder, then rename it to ``OUT/model``."""
    from medlens.models.hf import hushed_warnings, progress_bars

    final, tmp = out / MODEL_DIR, out / f".{MODEL_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with progress_bars(False), hushed_warnings():
        trained.save_pretrained(tmp)
        encoder.tokenizer.save_pretrained(tmp)
    marker = {
        "name": f"{encoder.name} (fine-tuned)",
        "is_test_model": encoder.is_test_model,
        "warning": encoder.warning,
        "finetuned_from": encoder.name,
        "base_fingerprint": encoder.fingerprint,
        "recipe": "siglip-contrastive",
        "config": asdict(config),
        "medlens_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_marker(tmp, marker)
    if overwrite and final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final
