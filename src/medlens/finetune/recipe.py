"""The LoRA / QLoRA fine-tuning recipe, top to bottom: setup, data, train, save, cleanup.

- setup: load the base model with the transformers engine exactly as ``medlens ask`` does, wrap it in a PEFT
  LoRA adapter; create the run folder (refusing one made from other base weights).
- data: examples from a manifest (each row through its task's ``build``) or a benchmark's split (given by the
  caller, see :func:`medlens.api.finetune`); the overlap guard against ``data.held_out``; every example encoded
  once (a bad input fails now, not hours in) to find the longest sequence; the memory estimate, refused when
  it cannot fit.
- train: TRL's ``SFTTrainer`` with the medlens collator (labels on answers only), checkpoints every
  ``train.save_steps`` and resume from the last one (step, optimizer, scheduler, RNG and data position).
- save: the adapter (+ ``medlens_adapter.json``), the loss plot, optionally the merged model.
- cleanup: free the model.
"""

from __future__ import annotations

import gc
import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medlens import DISCLAIMER
from medlens.errors import InputError, MedlensError
from medlens.files import write_json_atomic
from medlens.finetune.adapter import save_adapter
from medlens.finetune.collator import Collator, ExampleEncoder
from medlens.finetune.config import DataConfig, FinetuneConfig, dump
from medlens.finetune.examples import Example, from_manifest
from medlens.finetune.manifest import read_manifest
from medlens.finetune.memory import MemoryEstimate, check_fits, estimate
from medlens.finetune.trainlog import LOG_FILE, log_callback, plot_loss, read_log

#: examples of a benchmark's split: ``(data config, split name) -> examples`` (supplied by the API layer,
#: since the finetune package does not import eval)
BenchmarkExamples = Callable[[DataConfig, str], list[Example]]
#: the run's record of what it was made from (refuses a resume on other weights)
RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"


@dataclass
class FinetuneResult:
    """What a run produced."""

    run_dir: Path
    adapter_dir: Path
    steps: int
    resumed_from: str | None
    memory: MemoryEstimate
    losses: list[float]
    merged_dir: Path | None = None
    overlap: dict[str, Any] | None = None
    disclaimer: str = DISCLAIMER
    extra: dict[str, Any] = field(default_factory=dict)


class FinetuneRun:
    """One run of the recipe; the stages are methods so that tests (and curious readers) can run them one by one."""

    def __init__(
        self,
        config: FinetuneConfig,
        benchmark_examples: BenchmarkExamples | None = None,
        say: Callable[[str], None] = lambda line: None,
        callbacks: Sequence[Any] = (),
    ) -> None:
        self.config = config
        self.benchmark_examples = benchmark_examples
        self.say = say
        self.callbacks = list(callbacks)
        self.run_dir = Path(config.output.dir)
        self.backend: Any = None
        self.model: Any = None
        self.examples: list[Example] = []
        self.collator: Collator | None = None
        self.memory: MemoryEstimate | None = None
        self.overlap: dict[str, Any] | None = None
        self.trainer: Any = None
        self.resumed_from: str | None = None

    # -- setup ---------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Load the base model and wrap it in a LoRA adapter; create (or reopen) the run folder."""
        from peft import LoraConfig, get_peft_model

        from medlens.backends import engine_options, load_backend

        model = self.config.model
        model_args: dict[str, Any] = {}
        if model.attn_implementation:
            model_args["attn_implementation"] = model.attn_implementation
        if model.quantization == "4bit":
            check_qlora(model.device)
            model_args["quantization"] = "4bit"
        device = _rank_device(model.device)
        self.backend = load_backend(model.name, "transformers", **engine_options(device, model.dtype, model_args))
        self._check_run_dir()
        from transformers import set_seed

        set_seed(self.config.train.seed)  # the adapter's random initialisation is part of the run's seed
        lora = self.config.lora
        peft_config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            modules_to_save=lora.modules_to_save or None,
            bias="none",
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(self.backend.model, peft_config)
        trainable, total = self.model.get_nb_trainable_parameters()
        self.say(f"LoRA adapter: {trainable:,} trainable parameters ({100 * trainable / total:.2f}% of {total:,})")

    def _check_run_dir(self) -> None:
        record = {"base_model": self.config.model.name, "base_revision": self.backend.revision}
        path = self.run_dir / RUN_FILE
        if path.is_file():
            import json

            earlier = json.loads(path.read_text(encoding="utf-8"))
            if earlier.get("base_revision") != record["base_revision"]:
                raise InputError(
                    f"this run folder was made from other base weights ({earlier.get('base_model')}); "
                    "choose another output.dir",
                    str(self.run_dir),
                )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {**record, "config": dump(self.config), "disclaimer": DISCLAIMER})

    # -- data ----------------------------------------------------------------------------------------------
    def data(self) -> None:
        """Examples, the overlap guard, one encoding pass (longest sequence), the memory estimate."""
        data = self.config.data
        self.examples = self._examples(data, data.split)
        if data.limit:
            self.examples = self.examples[: data.limit]
        self.say(f"training examples: {len(self.examples)}")
        if data.held_out is not None:
            self._guard(data)
        encoder = ExampleEncoder(self.backend)
        longest, images = 0, 0
        for example in self.examples:
            encoded = encoder.encode(example)
            if encoded.length > longest:
                longest = encoded.length
                images = 0 if encoded.pixel_values is None else int(encoded.pixel_values.shape[0])
        self.collator = Collator(encoder, self.examples)
        trainable, _ = self.model.get_nb_trainable_parameters()
        self.memory = estimate(
            self.backend.model,
            trainable,
            longest,
            images,
            self.config.train.batch_size,
            self.config.train.gradient_checkpointing,
            vision_trained=_reaches_vision(self.model),
            limit_gb=self.config.max_memory_gb,
            device=str(self.backend.device),
        )
        self.say(self.memory.summary())
        write_json_atomic(self.run_dir / "memory_estimate.json", self.memory.to_json())
        check_fits(self.memory)

    def _examples(self, data: DataConfig, split: str) -> list[Example]:
        if data.manifest is not None:
            return from_manifest(read_manifest(data.manifest), data.recipe)
        if self.benchmark_examples is None:
            raise MedlensError("training on a benchmark split needs medlens.api.finetune (the CLI uses it)")
        return self.benchmark_examples(data, split)

    def _guard(self, data: DataConfig) -> None:
        from medlens.finetune.overlap import check_overlap

        held = data.held_out
        assert held is not None
        if held.manifest is not None:
            held_rows, held_name = read_manifest(held.manifest), str(held.manifest)
        else:
            held_rows = [e.row for e in self._examples(data, str(held.split))]
            held_name = f"{data.benchmark} split {held.split}"
        train_name = str(data.manifest) if data.manifest is not None else f"{data.benchmark} split {data.split}"
        settings = data.overlap
        report = check_overlap(
            [e.row for e in self.examples],
            held_rows,
            ngram=settings.ngram,
            text_min_share=settings.text_min_share,
            image_hash_distance=settings.image_hash_distance,
            siglip_model=settings.siglip_model,
        )
        self.overlap = report.to_json()
        write_json_atomic(self.run_dir / "overlap.json", self.overlap)
        self.say(f"overlap with the held-out data: {report.summary()}")
        if data.drop_overlapping and report.overlapping_train_ids:
            dropped = set(report.overlapping_train_ids)
            self.examples = [e for e in self.examples if e.id not in dropped]
            self.overlap["dropped_train_ids"] = sorted(dropped)
            write_json_atomic(self.run_dir / "overlap.json", self.overlap)
            left = len(self.examples)
            self.say(f"dropped {len(dropped)} overlapping training rows (data.drop_overlapping); {left} left")
            if not self.examples:
                raise InputError("every training row overlaps the held-out data", train_name)
            return
        if report.fraction > data.max_overlap:
            raise InputError(
                f"{len(report.overlapping_held_out_ids)} of {len(held_rows)} held-out rows ({report.fraction:.1%}) "
                f"overlap {len(report.overlapping_train_ids)} training rows of {train_name}, above data.max_overlap "
                f"{data.max_overlap:.1%}; clean the training data (medlens overlap --write-clean) or raise the limit",
                held_name,
            )

    # -- train ---------------------------------------------------------------------------------------------
    def train(self) -> None:
        """SFTTrainer over the examples; resumes from the last checkpoint of the run folder when asked."""
        from datasets import Dataset
        from transformers.trainer_utils import get_last_checkpoint
        from trl import SFTConfig, SFTTrainer

        assert self.collator is not None, "run data() first"
        train = self.config.train
        on_cpu = str(self.backend.device) == "cpu"
        args = SFTConfig(
            output_dir=str(self.run_dir / CHECKPOINTS),
            num_train_epochs=train.epochs,
            max_steps=train.max_steps or -1,
            per_device_train_batch_size=train.batch_size,
            gradient_accumulation_steps=train.grad_accum,
            learning_rate=train.lr,
            lr_scheduler_type=train.lr_scheduler,
            warmup_steps=train.warmup_ratio,
            weight_decay=train.weight_decay,
            max_grad_norm=train.max_grad_norm,
            bf16=train.bf16 and not on_cpu,
            gradient_checkpointing=train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False} if train.gradient_checkpointing else None,
            save_strategy="steps",
            save_steps=train.save_steps,
            save_total_limit=train.save_total_limit,
            logging_steps=train.logging_steps,
            seed=train.seed,
            data_seed=train.seed,
            use_cpu=on_cpu,
            report_to="none",
            remove_unused_columns=False,
            dataset_kwargs={"skip_prepare_dataset": True},
            max_length=None,
            dataloader_pin_memory=False,
            completion_only_loss=False,
        )
        dataset = Dataset.from_dict({"index": list(range(len(self.examples)))})
        collator = self.collator
        self.trainer = SFTTrainer(
            model=self.model,
            args=args,
            train_dataset=dataset,
            data_collator=collator,
            processing_class=self.backend.processor or self.backend.tokenizer,
            callbacks=[log_callback(self.run_dir / LOG_FILE, lambda: collator.tokens), *self.callbacks],
        )
        checkpoints = self.run_dir / CHECKPOINTS
        last = get_last_checkpoint(str(checkpoints)) if train.resume and checkpoints.is_dir() else None
        if last:
            self.resumed_from = last
            self.say(f"resuming from {last}")
        self.trainer.train(resume_from_checkpoint=last)

    # -- save ----------------------------------------------------------------------------------------------
    def save(self) -> FinetuneResult:
        """The adapter, its metadata, the loss plot; the merged model when ``output.merge``."""
        assert self.memory is not None and self.trainer is not None
        adapter_dir = self.run_dir / ADAPTER
        tasks = sorted({str(e.meta.get("task", "qa")) for e in self.examples})
        task = self.config.task or ",".join(tasks)
        model = self.trainer.model
        save_adapter(model, adapter_dir, self.config.model.name, self.backend.revision, self.config.data.recipe, task)
        rows = read_log(self.run_dir / LOG_FILE)
        plot = plot_loss(rows, self.run_dir)
        merged = None
        if self.config.output.merge:
            merged = self.run_dir / "merged"
            merged_model = model.merge_and_unload()
            merged_model.save_pretrained(str(merged))
            (self.backend.processor or self.backend.tokenizer).save_pretrained(str(merged))
        result = FinetuneResult(
            self.run_dir,
            adapter_dir,
            int(self.trainer.state.global_step),
            self.resumed_from,
            self.memory,
            [float(r["loss"]) for r in rows],
            merged,
            self.overlap,
            extra={"plot": str(plot) if plot else None},
        )
        summary = {
            "adapter": str(adapter_dir),
            "steps": result.steps,
            "resumed_from": result.resumed_from,
            "final_loss": result.losses[-1] if result.losses else None,
            "memory_estimate_gb": self.memory.total_gb,
            "merged": str(merged) if merged else None,
            "disclaimer": DISCLAIMER,
        }
        write_json_atomic(self.run_dir / "summary.json", summary)
        return result

    # -- cleanup -------------------------------------------------------------------------------------------
    def cleanup(self) -> None:
        """Free the model and the trainer."""
        self.trainer = None
        self.model = None
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        gc.collect()


def run(
    config: FinetuneConfig,
    benchmark_examples: BenchmarkExamples | None = None,
    say: Callable[[str], None] = lambda line: None,
    callbacks: Sequence[Any] = (),
) -> FinetuneResult:
    """The whole recipe."""
    recipe = FinetuneRun(config, benchmark_examples, say, callbacks)
    try:
        recipe.setup()
        recipe.data()
        recipe.train()
        return recipe.save()
    finally:
        recipe.cleanup()


def check_qlora(device: str) -> None:
    """QLoRA needs a CUDA GPU and bitsandbytes; a clear error otherwise."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        raise MedlensError("model.quantization=4bit (QLoRA) needs a CUDA GPU; none is available here")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MedlensError("model.quantization=4bit (QLoRA) needs bitsandbytes: pip install bitsandbytes")


def _rank_device(device: str) -> str:
    """Under ``accelerate launch`` (DDP/FSDP), each process trains on its own GPU."""
    rank = os.environ.get("LOCAL_RANK")
    if rank is not None and device in ("auto", "cuda"):
        return f"cuda:{int(rank)}"
    return device


def _reaches_vision(model: Any) -> bool:
    """Whether any LoRA layer sits in a vision tower (its activations then count)."""
    return any("vision" in name and "lora_" in name for name, _ in model.named_parameters())


__all__ = ["ADAPTER", "CHECKPOINTS", "FinetuneResult", "FinetuneRun", "check_qlora", "run"]
