"""Fine-tuning configs and manifests: every shipped config validates, unknown keys and bad values fail with
one line naming the key and the file, the CLI exits 2 with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from medlens.errors import InputError, MedlensError, NotFoundError
from medlens.finetune.config import FinetuneConfig, load_config, shipped_configs
from medlens.finetune.manifest import read_manifest, write_manifest


@pytest.mark.parametrize("name", sorted(shipped_configs()))
def test_every_shipped_config_validates(name):
    config = load_config(name)
    assert isinstance(config, FinetuneConfig)
    assert (config.data.manifest is None) != (config.data.benchmark is None)


def test_medgemma_lora_has_the_notebook_defaults():
    config = load_config("medgemma-lora")
    lora, train = config.lora, config.train
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (16, 16, 0.05, "all-linear")
    assert (train.lr, train.epochs, train.batch_size, train.grad_accum) == (2e-4, 1, 4, 4)
    assert (train.max_grad_norm, train.warmup_ratio, train.bf16) == (0.3, 0.03, True)
    assert load_config("medgemma-qlora").model.quantization == "4bit"


def test_shipped_accelerate_configs_are_yaml_for_accelerate(cli):
    for name, kind in (("ddp", "MULTI_GPU"), ("fsdp", "FSDP")):
        code, out, _ = cli("finetune", "--accelerate-config", name)
        assert code == 0
        assert yaml.safe_load(Path(out.strip()).read_text())["distributed_type"] == kind


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: {manifest: m.jsonl}\ntrain: {lerning_rate: 1}\n")
    with pytest.raises(InputError) as caught:
        load_config(path)
    assert (
        str(caught.value)
        == f"{path}: unknown key 'train.lerning_rate' (valid: " + str(caught.value).split("(valid: ")[1]
    )
    path.write_text("data: {manifest: m.jsonl}\ntrain: {max_step: 3}\n")
    with pytest.raises(InputError, match=r"unknown key 'train.max_step' \(did you mean 'max_steps'\?\)"):
        load_config(path)


def test_overrides_are_validated_like_the_file():
    assert load_config("tiny-cpu", ["train.lr=1e-4", "data.limit=3"]).train.lr == 1e-4
    with pytest.raises(InputError, match=r"tiny-cpu.yaml: unknown key 'train.lrr' \(did you mean 'lr'\?\)"):
        load_config("tiny-cpu", ["train.lrr=1e-4"])
    with pytest.raises(InputError, match=r"train\.batch_size: Input should be greater than or equal to 1"):
        load_config("tiny-cpu", ["train.batch_size=0"])
    with pytest.raises(InputError, match="is not KEY=VALUE"):
        load_config("tiny-cpu", ["train.lr"])
    with pytest.raises(InputError, match="data: give exactly one of 'manifest' and 'benchmark'"):
        load_config("tiny-cpu", ["data.benchmark=iu-cxr-findings"])


def test_cli_bad_config_exits_2_with_one_line(cli, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: {manifest: m.jsonl}\nlora: {rank: 8}\n")
    code, _, err = cli("finetune", path)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"medlens: error: {path}: unknown key 'lora.rank'")
    code, _, err = cli("finetune", "tiny-cpux")
    assert code == 2 and "did you mean 'tiny-cpu'?" in err and err.count("\n") == 1
    code, out, _ = cli("finetune", "--list-configs")
    assert code == 0 and {line.split("\t")[0] for line in out.splitlines()} == set(shipped_configs())


def test_qlora_without_cuda_is_a_clear_error(tmp_path):
    pytest.importorskip("torch")
    from medlens.finetune.recipe import FinetuneRun

    config = load_config("medgemma-qlora", [f"output.dir={tmp_path}"])
    with pytest.raises(MedlensError, match=r"quantization=4bit \(QLoRA\) needs a CUDA GPU"):
        FinetuneRun(config).setup()


def test_manifest_rows_resolve_and_round_trip(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    lines = [
        {"id": "r1", "inputs": ["a.png", "dicomweb://pacs/1.2.3"], "question": "q?", "answer": "yes"},
        {"id": "r2", "inputs": ["a.png"], "task": "report", "answer": "text", "options": {"thinking": True}},
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + "\n")
    rows = read_manifest(tmp_path / "m.jsonl")
    assert rows[0].inputs == [tmp_path.resolve() / "a.png", "dicomweb://pacs/1.2.3"] and rows[0].task == "qa"
    assert rows[1].options == {"thinking": True} and rows[1].question is None
    write_manifest(rows, tmp_path / "copy.jsonl")
    assert read_manifest(tmp_path / "copy.jsonl") == rows


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": "r1", "inputs": ["a.png"], "anwser": "x"}', "m.jsonl:1: anwser: unknown key"),
        ('{"id": "r1", "inputs": ["a.png"]}', "m.jsonl:1: answer: field required"),
        ('{"id": "r1", "inputs": ["missing.png"], "answer": "x"}', "m.jsonl:1: input 'missing.png' does not exist"),
        ('{"id": 1, "inputs": [], "answer": "x"}', "m.jsonl:1: id: input should be a valid string"),
        ("[1, 2]", "m.jsonl:1: expected a JSON object, got list"),
        ('{"id": "r1", ', "m.jsonl:1: not a JSON object"),
    ],
)
def test_bad_manifest_lines_are_typed_errors_naming_the_line(tmp_path, line, message):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "m.jsonl").write_text(line + "\n")
    with pytest.raises(InputError) as caught:
        read_manifest(tmp_path / "m.jsonl")
    assert message in str(caught.value)


def test_duplicate_ids_and_missing_manifest(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"id": "a", "answer": "x"}\n{"id": "a", "answer": "y"}\n')
    with pytest.raises(InputError, match=r"m.jsonl:2: duplicate id 'a' \(first on line 1\)"):
        read_manifest(tmp_path / "m.jsonl")
    with pytest.raises(NotFoundError, match="training manifest not found"):
        read_manifest(tmp_path / "none.jsonl")
