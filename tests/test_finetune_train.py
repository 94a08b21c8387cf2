"""The fine-tuning recipe on test-tiny (CPU): label masking token by token (one image, a CT volume, two
images), loss going down, adapter save / reload / merge with identical greedy outputs, resume at the same
step with the same next batch, and the overlap guard refusing leaked held-out data."""

from __future__ import annotations

import json
import shutil

import pytest
from finetune_data import mixed_set, write_manifest

pytest.importorskip("peft")
pytest.importorskip("trl")

from medlens.backends import GenerationRequest, load_backend
from medlens.errors import InputError
from medlens.finetune.adapter import METADATA, attach, merge
from medlens.finetune.collator import IGNORE, Collator, ExampleEncoder, image_token_ids
from medlens.finetune.config import load_config
from medlens.finetune.examples import from_manifest
from medlens.finetune.manifest import read_manifest
from medlens.finetune.recipe import FinetuneRun, run


def tiny_config(manifest, out, *more):
    return load_config("tiny-cpu", [f"data.manifest={manifest}", f"output.dir={out}", *more])


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return mixed_set(tmp_path_factory.mktemp("ft-data"))


def test_labels_are_the_answer_tokens_only(manifest, tiny_backend):
    examples = {e.id: e for e in from_manifest(read_manifest(manifest), "medgemma-1.5")}
    encoder = ExampleEncoder(tiny_backend)
    images = image_token_ids(tiny_backend)
    assert images, "test-tiny has image tokens"
    for name, n_images in (("png0", 1), ("ct", 6), ("pair", 2)):
        example = examples[name]
        encoded = encoder.encode(example)
        prompt = tiny_backend.prepare(example.messages())["input_ids"][0].tolist()  # what generation is fed
        answer = encoder.answer_ids(example.answer).tolist()
        ids, labels = encoded.input_ids.tolist(), encoded.labels.tolist()
        assert ids == prompt + answer and encoded.pixel_values.shape[0] == n_images
        assert tiny_backend.tokenizer.decode(answer) == example.answer + "<end_of_turn>"
        for position, (token, label) in enumerate(zip(ids, labels, strict=True)):
            if position < len(prompt):
                assert label == IGNORE, (name, position)
            else:
                assert label == token and token not in images, (name, position)
        assert sum(token in images for token in ids) >= n_images  # image tokens are there, and masked
    batch = Collator(encoder, [examples["png0"], examples["ct"]])([{"index": 0}, {"index": 1}])
    short = encoder.encode(examples["png0"]).length
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[0] == 7
    assert batch["attention_mask"][0, short:].sum() == 0 and (batch["labels"][0, short:] == IGNORE).all()
    assert (batch["input_ids"][0, short:] == encoder.pad_id).all()


@pytest.fixture(scope="module")
def trained(manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft-run")
    config = tiny_config(manifest, out, "train.max_steps=8", "train.batch_size=6", "train.save_steps=100")
    return run(config)


def test_loss_decreases_on_images_a_volume_and_a_pair(trained):
    losses = trained.losses
    assert len(losses) == 8 and trained.steps == 8
    assert losses[-1] < losses[0] - 0.5, losses
    log = [json.loads(line) for line in (trained.run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, 9))
    assert all(row["tokens_per_s"] > 0 and row["memory_gb"] > 0 and row["lr"] > 0 for row in log)
    assert (trained.run_dir / "loss.svg").read_text().startswith("<svg")
    metadata = json.loads((trained.adapter_dir / METADATA).read_text())
    assert metadata["base_model"] == "test-tiny" and metadata["recipe"] == "medgemma-1.5"
    assert metadata["task"] == "compare,qa" and metadata["base_revision"]
    assert (trained.adapter_dir / "adapter_model.safetensors").is_file()


def _greedy(backend, manifest):
    examples = from_manifest(read_manifest(manifest), "medgemma-1.5")
    requests = [GenerationRequest(e.messages(), max_new_tokens=6) for e in examples[:2]]
    return [o.text for o in backend.generate(requests)]


def test_adapter_reloads_and_merges_with_identical_greedy_outputs(trained, manifest, tmp_path):
    base = load_backend("test-tiny", device="cpu", dtype="float32")
    before = _greedy(base, manifest)
    adapted = _greedy(attach(base, trained.adapter_dir), manifest)
    base.close()
    assert adapted != before  # the adapter changes what the model says
    again = load_backend("test-tiny", device="cpu", dtype="float32")
    assert _greedy(attach(again, trained.adapter_dir), manifest) == adapted
    again.close()
    merged = load_backend(str(merge(trained.adapter_dir, tmp_path / "merged")), device="cpu", dtype="float32")
    assert _greedy(merged, manifest) == adapted
    merged.close()


class _StopAt:
    """A trainer callback that stops the run after ``step`` (an interruption, as a crash would be)."""

    def __new__(cls, step):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step >= step:
                    control.should_training_stop = True

        return Stop()


def _stages(config, callbacks=()):
    recipe = FinetuneRun(config, callbacks=callbacks)
    recipe.setup()
    recipe.data()
    recipe.train()
    return recipe


def test_resume_continues_at_the_same_step_with_the_same_next_batch(manifest, tmp_path):
    settings = ("train.max_steps=4", "train.save_steps=2", "train.batch_size=2")
    whole = _stages(tiny_config(manifest, tmp_path / "whole", *settings))
    whole_log = [json.loads(line) for line in (tmp_path / "whole" / "train_log.jsonl").read_text().splitlines()]
    whole.cleanup()
    cut = _stages(tiny_config(manifest, tmp_path / "cut", *settings), callbacks=[_StopAt(2)])
    assert cut.trainer.state.global_step == 2
    cut.cleanup()
    resumed = _stages(tiny_config(manifest, tmp_path / "cut", *settings))
    assert resumed.resumed_from.endswith("checkpoint-2")
    assert resumed.collator.seen[0] == whole.collator.seen[2]  # the batch step 3 trains on
    assert resumed.trainer.state.global_step == 4
    log = [json.loads(line) for line in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3, 4]
    for mine, theirs in zip(log, whole_log, strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4) and mine["lr"] == theirs["lr"]
    resumed.cleanup()


def test_overlapping_held_out_data_refuses_to_start(manifest, tmp_path):
    held = tmp_path / "held"
    held.mkdir()
    shutil.copy(manifest.parent / "1.png", held / "copy.png")
    rows = [{"id": "h1", "inputs": ["copy.png"], "question": "Is there an effusion?", "answer": "Final Answer: yes"}]
    held_manifest = write_manifest(held / "held.jsonl", rows)
    config = tiny_config(manifest, tmp_path / "run", f"data.held_out.manifest={held_manifest}")
    recipe = FinetuneRun(config)
    recipe.setup()
    with pytest.raises(InputError) as caught:
        recipe.data()
    recipe.cleanup()
    message = str(caught.value)
    assert message.startswith(f"{held_manifest}: 1 of 1 held-out rows (100.0%) overlap 1 training rows of {manifest}")
    assert json.loads((tmp_path / "run" / "overlap.json").read_text())["exact"]


def test_memory_estimate_refuses_what_cannot_fit(manifest, tmp_path):
    from medlens.finetune.memory import MemoryEstimateError

    recipe = FinetuneRun(tiny_config(manifest, tmp_path / "run", "max_memory_gb=0.0001"))
    recipe.setup()
    with pytest.raises(MemoryEstimateError, match=r"the run needs about .* GiB but 0\.0 GiB \(max_memory_gb\)"):
        recipe.data()
    estimate = json.loads((tmp_path / "run" / "memory_estimate.json").read_text())
    recipe.cleanup()
    assert estimate["longest_tokens"] > 200 and estimate["longest_images"] == 6  # the CT volume row
