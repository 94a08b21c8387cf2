"""The CLI package: option groups declared once, --device/--dtype/--model-arg on every model command."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import typer
from PIL import Image

from medlens.cli.options import OUTPUT, ModelChoice, Output, model_group, parse_model_args, uses

MODEL_COMMANDS = [
    ["ask"],
    ["eval"],
    ["embed"],
    ["zeroshot"],
    ["probe", "fit"],
    ["probe", "apply"],
    ["siglip", "finetune"],
    ["search", "add"],
    ["search", "query"],
]


def _command(path: list[str]):
    from medlens.cli import app

    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return command


@pytest.mark.parametrize("path", MODEL_COMMANDS, ids=" ".join)
def test_every_model_command_takes_device_dtype_and_model_args(path: list[str]) -> None:
    flags = {flag for param in _command(path).params for flag in param.opts}
    assert {"--model", "--device", "--dtype", "--model-arg"} <= flags


def test_a_group_arrives_as_one_object() -> None:
    seen: dict[str, object] = {}

    @uses(model_group("m0", "Model."), OUTPUT)
    def command(count: int = 1, *, model: ModelChoice, output: Output) -> None:
        seen.update(count=count, model=model, output=output)

    app = typer.Typer()
    app.command()(command)
    app.command("other")(lambda: None)
    typer.main.get_command(app).main(
        ["command", "--count", "3", "--device", "CPU", "--model-arg", "timeout=60", "--model-arg", "x=a b", "-q"],
        standalone_mode=False,
    )
    assert seen["count"] == 3 and seen["output"] == Output(quiet=True)
    assert seen["model"] == ModelChoice("m0", "transformers", "cpu", "auto", {"timeout": 60, "x": "a b"})


def test_model_args_are_json_when_they_can_be() -> None:
    assert parse_model_args(["a=1", "b=false", "c=null", "d=text", "share-prefix=true", "e="]) == {
        "a": 1,
        "b": False,
        "c": None,
        "d": "text",
        "share_prefix": True,
        "e": "",
    }


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["ask", "{png}", "Q?", "--dtype", "int8"], "unknown dtype 'int8'"),
        (["ask", "{png}", "Q?", "--device", "tpu"], "unknown device 'tpu'"),
        (["ask", "{png}", "Q?", "--model-arg", "share_prefix"], "KEY=VALUE"),
        (["ask", "{png}", "Q?", "--model-arg", "sharing=false"], "takes no option 'sharing'"),
        (["ask", "{png}", "Q?", "--model", "openai:m@http://127.0.0.1:9/v1", "--device", "cpu"], "takes no option"),
        (["embed", "{png}", "-o", "{out}", "--model-arg", "nope=1"], "MedSigLIP takes no option 'nope'"),
        (["eval", "-b", "medqa", "--dtype", "float64"], "unknown dtype 'float64'"),
        (["ask", "{png}", "Q?", "--dpi", "300"], "--dpi is an option of lab-extract, not of task qa"),
    ],
)
def test_bad_model_options_exit_2_with_one_line(cli, png, tmp_path, args, needle) -> None:
    code, _out, err = cli(*[a.format(png=png, out=tmp_path / "e.npz") for a in args], "-q")
    assert code == 2, err
    assert err.startswith("medlens: error: ") and err.count("\n") == 1 and needle in err


def test_cuda_asked_on_a_machine_without_one_is_an_error(cli, png) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    for args in (["ask", png, "Q?"], ["embed", png, "-o", png.with_suffix(".npz")]):
        code, _, err = cli(*args, "--device", "cuda", "-q")
        assert code == 2 and "no CUDA GPU is available" in err


def test_device_dtype_and_model_args_reach_the_models(cli, png, tmp_path) -> None:
    code, out, err = cli("ask", png, "Q?", "--device", "cpu", "--dtype", "float32", "--model-arg", "share_prefix=false")
    assert code == 0, err
    assert json.loads(out)["model"] == "test-tiny"
    code, out, err = cli("embed", png, "-o", tmp_path / "e.npz", "--device", "cpu", "--dtype", "fp32", "-q")
    assert code == 0, err
    assert json.loads(out)["dim"] == 32


def test_help_builds_without_model_libraries() -> None:
    code = (
        "import sys\n"
        "from medlens.cli import main\n"
        "try:\n    main(['ask', '--help'])\nexcept SystemExit as e:\n    assert not e.code\n"
        "heavy = {'torch', 'transformers', 'pydicom', 'scipy', 'sklearn', 'PIL'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--overlay" in proc.stdout and "--token-budget" in proc.stdout  # the tasks' own options
