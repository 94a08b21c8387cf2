"""Strict benchmark files: every shipped YAML loads; unknown keys (at every level), metric functions, kinds,
loaders and bad metric or kind options are refused at load time, before any data is read or any model
loaded, with one line naming the file, the key and the nearest valid name."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from scripted import ScriptedBackend

from medlens.errors import MedlensError
from medlens.eval.kinds import KINDS, task_settings_model
from medlens.eval.registry import benchmark_files, get_benchmark, make_kind
from medlens.eval.runner import run_benchmark
from medlens.eval.spec import Generation, load_spec
from medlens.metrics.functions import METRICS, metric_options

BASE = {
    "name": "mine",
    "description": "a test benchmark",
    "kind": "mcq",
    "data": {"path": "mine/test.jsonl", "source": "nowhere", "layout": "JSONL"},
    "prompt": "{question}\n\n{options}",
    "metrics": [{"name": "accuracy", "fn": "accuracy"}],
    "generation": {"max_new_tokens": 16},
    "published": {"value": 50.0, "metric": "accuracy"},
}


def spec_file(tmp_path: Path, change=None, text: str | None = None) -> Path:
    """BASE (changed in place by ``change``) or ``text`` as a YAML file."""
    spec = yaml.safe_load(yaml.safe_dump(BASE))
    if change is not None:
        change(spec)
    path = tmp_path / "mine.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(spec, sort_keys=False))
    return path


def refused(path: Path) -> str:
    with pytest.raises(MedlensError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message.removeprefix(f"{path}: ")


@pytest.mark.parametrize("name", sorted(benchmark_files()))
def test_every_shipped_benchmark_loads_and_builds_its_kind(name):
    spec, path = get_benchmark(name)
    kind = make_kind(spec, path, "medgemma-1.5")
    assert type(kind) is KINDS.get(spec.kind)
    assert isinstance(spec.generation, Generation) and spec.generation.max_new_tokens
    for metric in spec.metrics:
        metric_options(metric.fn).model_validate(metric.options)


def test_the_base_file_loads(tmp_path):
    spec = load_spec(spec_file(tmp_path))
    assert spec.generation == Generation(max_new_tokens=16, temperature=0.0, thinking=False, seed=0)


# ---------------------------------------------------------------- unknown keys, at every level


def _rename(where: tuple, old: str, new: str):
    def change(spec):
        node = spec
        for part in where:
            node = node[part]
        node[new] = node.pop(old)

    return change


@pytest.mark.parametrize(
    ("where", "old", "new", "message"),
    [
        ((), "prompt", "promt", "unknown key 'promt' (did you mean 'prompt'?)"),
        (("data",), "path", "pth", "unknown key 'data.pth' (did you mean 'path'?)"),
        (("metrics", 0), "fn", "fun", "unknown key 'metrics[0].fun' (did you mean 'fn'?)"),
        (("published",), "value", "vaule", "unknown key 'published.vaule' (did you mean 'value'?)"),
        (
            ("generation",),
            "max_new_tokens",
            "max_tokens",
            "unknown key 'generation.max_tokens' (did you mean 'max_new_tokens'?)",
        ),
    ],
)
def test_unknown_keys_are_refused_with_the_nearest_name(tmp_path, where, old, new, message):
    assert refused(spec_file(tmp_path, _rename(where, old, new))) == message


def test_unknown_key_far_from_any_lists_the_valid_ones(tmp_path):
    message = refused(spec_file(tmp_path, lambda s: s["generation"].update(zzz=1)))
    assert message == "unknown key 'generation.zzz' (valid: max_new_tokens, temperature, thinking, seed)"


def test_a_key_given_twice_is_refused(tmp_path):
    text = yaml.safe_dump(BASE, sort_keys=False) + "prompt: again\n"
    assert "key 'prompt' given twice" in refused(spec_file(tmp_path, text=text))


def test_a_missing_required_key_is_named(tmp_path):
    assert refused(spec_file(tmp_path, lambda s: s.pop("kind"))) == "missing key 'kind'"


# ---------------------------------------------------------------- names


def test_unknown_metric_function_names_the_nearest(tmp_path):
    message = refused(spec_file(tmp_path, lambda s: s["metrics"][0].update(fn="acuracy")))
    assert message.startswith("metrics[0].fn: unknown metric 'acuracy'; did you mean 'accuracy'")


def test_unknown_kind_names_the_nearest(tmp_path):
    message = refused(spec_file(tmp_path, lambda s: s.update(kind="mqc")))
    assert message.startswith("kind: unknown benchmark kind 'mqc'; did you mean 'mcq'")


def test_hook_kind_file_and_class_must_exist(tmp_path):
    assert "hook file" in refused(spec_file(tmp_path, lambda s: s.update(kind="hooks.py:Mine")))
    (tmp_path / "hooks.py").write_text(
        "from medlens.eval.kinds import MultipleChoice\n\nclass MyChoice(MultipleChoice):\n    pass\n"
    )
    message = refused(spec_file(tmp_path, lambda s: s.update(kind="hooks.py:MyChoise")))
    assert message == "kind: hooks.py has no class 'MyChoise' (did you mean 'MyChoice'?)"
    assert load_spec(spec_file(tmp_path, lambda s: s.update(kind="hooks.py:MyChoice"))).kind == "hooks.py:MyChoice"


def test_hook_kinds_declare_their_options_or_take_any(tmp_path):
    (tmp_path / "hooks.py").write_text(
        "from pydantic import BaseModel, ConfigDict\n"
        "from medlens.eval.kinds import Kind, MultipleChoice\n\n"
        "class Strict(BaseModel):\n"
        "    model_config = ConfigDict(extra='forbid', strict=True)\n"
        "    letters: str = 'ABCD'\n\n"
        "class Declared(MultipleChoice):\n"
        "    options_model = Strict\n\n"
        "class Open(Kind):\n"
        "    pass\n"
    )
    declared = lambda options: lambda s: s.update(kind="hooks.py:Declared", options=options)  # noqa: E731
    assert load_spec(spec_file(tmp_path, declared({"letters": "AB"}))).options == {"letters": "AB"}
    assert refused(spec_file(tmp_path, declared({"leters": "AB"}))) == (
        "unknown key 'options.leters' (did you mean 'letters'?)"
    )
    assert "options.letters: Input should be a valid string" in refused(spec_file(tmp_path, declared({"letters": 4})))
    anything = spec_file(tmp_path, lambda s: s.update(kind="hooks.py:Open", options={"whatever": [1, 2]}))
    spec = load_spec(anything)
    assert make_kind(spec, anything, "medgemma-1.5").options.whatever == [1, 2]


def test_unknown_loader_and_loader_options(tmp_path):
    def loader(name, **options):
        return lambda s: (s.update(data={"loader": name}), s.update(options={"loader_options": options}))

    assert refused(spec_file(tmp_path, loader("iu-cxr"))).startswith(
        "data.loader: unknown data loader 'iu-cxr'; did you mean 'iu-cxr-reports'"
    )
    assert refused(spec_file(tmp_path, loader("iu-cxr-reports", lables=["normal"]))) == (
        "unknown key 'options.loader_options.lables' (did you mean 'labels'?)"
    )
    assert refused(spec_file(tmp_path, lambda s: s.update(options={"loader_options": {"labels": []}}))) == (
        "options.loader_options: only for a data.loader"
    )
    both = lambda s: s["data"].update(loader="iu-cxr-reports")  # noqa: E731
    assert refused(spec_file(tmp_path, both)) == "data: give exactly one of 'path' and 'loader'"


def test_published_metric_must_be_one_of_the_metrics(tmp_path):
    message = refused(spec_file(tmp_path, lambda s: s["published"].update(metric="acuracy")))
    assert message == "published.metric: 'acuracy' is none of the metrics (did you mean 'accuracy'?)"


def test_metric_names_are_unique(tmp_path):
    message = refused(spec_file(tmp_path, lambda s: s["metrics"].append({"name": "accuracy", "fn": "macro_accuracy"})))
    assert message == "metrics[1].name: 'accuracy' is given twice"


# ---------------------------------------------------------------- metric options


def _metric(fn: str, **options):
    return lambda s: s.update(metrics=[{"name": "m", "fn": fn, "options": options}], published={})


@pytest.mark.parametrize(
    ("fn", "options", "message"),
    [
        ("mean_iou", {"by_label": "yes"}, "metrics[0].options.by_label: Input should be a valid boolean (got 'yes')"),
        ("multilabel_f1_macro", {"labels": 3}, "metrics[0].options.labels: Input should be a valid list (got 3)"),
        ("multilabel_f1_micro", {"labels": ["a", 1]}, "metrics[0].options.labels[1]: Input should be a valid string"),
        ("tokenized_f1", {"questions": "some"}, "metrics[0].options.questions: Input should be 'all' or 'open'"),
        ("mean_iou", {"key": "box"}, "metrics[0].options.key: Input should be 'box_2d' or 'box_px'"),
        ("lab_f1_micro", {"fields": ["name", "value"]}, "metrics[0].options.fields[1]: Input should be 'name'"),
        ("tokenized_f1", {"question": "open"}, "unknown key 'metrics[0].options.question' (did you mean 'questions'?)"),
        ("lab_f1_macro", {"field": ["name"]}, "unknown key 'metrics[0].options.field' (did you mean 'fields'?)"),
        ("accuracy", {"labels": ["a"]}, "unknown key 'metrics[0].options.labels' (metric accuracy takes no options)"),
    ],
)
def test_bad_metric_options_are_refused(tmp_path, fn, options, message):
    assert refused(spec_file(tmp_path, _metric(fn, **options))).startswith(message)


def test_every_registered_metric_has_an_options_model():
    for name in METRICS.names():
        model = metric_options(name)
        assert model.model_config.get("extra") == "forbid" and model().model_dump() is not None


# ---------------------------------------------------------------- kind options


def _kind(kind: str, **options):
    return lambda s: s.update(kind=kind, options=options)


@pytest.mark.parametrize(
    ("kind", "options", "message"),
    [
        ("mcq", {"labels": ["a"]}, "unknown key 'options.labels' (valid: loader_options, modality)"),
        ("condition", {"waht": "CT"}, "unknown key 'options.waht' (did you mean 'what'?)"),
        ("condition", {"what": 3}, "options.what: Input should be a valid string (got 3)"),
        ("open_diagnosis", {"judge": "yes"}, "options.judge: Input should be a valid boolean (got 'yes')"),
        ("closed_label", {"labels": "yes"}, "options.labels: Input should be a valid list (got 'yes')"),
        ("closed_label", {"labels": []}, "options.labels: List should have at least 1 item"),
        ("report_findings", {}, "missing key 'options.labels'"),
        ("vqa", {"modality": 1}, "options.modality: Input should be a valid string (got 1)"),
        ("task", {}, "missing key 'options.task'"),
        ("task", {"task": "localise"}, "options.task: unknown task 'localise'; did you mean 'localize'"),
        (
            "task",
            {"task": "localize", "predicton": "boxes"},
            "unknown key 'options.predicton' (did you mean 'prediction'",
        ),
        ("task", {"task": "localize", "inputs": "image"}, "options.inputs: Input should be a valid list"),
        ("task", {"task": "compare"}, "options.inputs: task compare takes 2 inputs, not 1"),
        (
            "task",
            {"task": "lab-extract", "task_options": {"dpi": 20}},
            "options.task_options.dpi: Input should be greater than or equal to 50 (got 20)",
        ),
        (
            "task",
            {"task": "lab-extract", "task_options": {"dpi": "high"}},
            "options.task_options.dpi: Input should be a valid integer (got 'high')",
        ),
        (
            "task",
            {"task": "lab-extract", "task_options": {"token_budget": 900}},
            "unknown key 'options.task_options.token_budget' (valid: series, modality, instruction, slide, dpi)",
        ),
        (
            "task",
            {"task": "ehr-qa", "inputs": ["record"], "task_options": {"thinking": True}},
            "unknown key 'options.task_options.thinking'",
        ),
        (
            "task",
            {"task": "localize", "task_options": {"slide": {"magnificaton": 20}}},
            "unknown key 'options.task_options.slide.magnificaton' (did you mean 'magnification'?)",
        ),
    ],
)
def test_bad_kind_options_are_refused(tmp_path, kind, options, message):
    assert refused(spec_file(tmp_path, _kind(kind, **options))).startswith(message)


def test_task_settings_are_the_general_ones_and_the_tasks_own():
    assert set(task_settings_model("ehr-qa").model_fields) == {
        "series",
        "modality",
        "instruction",
        "slide",
        "token_budget",
    }
    assert set(task_settings_model("qa").model_fields) == {"series", "modality", "instruction", "slide"}
    settings = task_settings_model("localize").model_validate({"overlay": "boxes.png", "slide": {"magnification": 10}})
    assert settings.overlay == Path("boxes.png") and settings.slide.magnification == 10.0


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize(
    ("generation", "message"),
    [
        ({"thinking": "yes"}, "generation.thinking: Input should be a valid boolean (got 'yes')"),
        ({"max_new_tokens": 0}, "generation.max_new_tokens: Input should be greater than or equal to 1 (got 0)"),
        ({"temperature": -0.5}, "generation.temperature: Input should be greater than or equal to 0"),
        ({"seed": "7"}, "generation.seed: Input should be a valid integer (got '7')"),
        ({"seed": 1.5}, "generation.seed: Input should be a valid integer"),
    ],
)
def test_generation_is_typed(tmp_path, generation, message):
    assert refused(spec_file(tmp_path, lambda s: s.update(generation=generation))).startswith(message)


def test_generation_defaults_and_resolution(tmp_path):
    spec = load_spec(spec_file(tmp_path, lambda s: s.pop("generation")))
    assert spec.generation == Generation() and spec.generation.temperature == 0.0 and not spec.generation.thinking
    assert spec.generation.resolved(512).max_new_tokens == 512
    warm = load_spec(spec_file(tmp_path, lambda s: s.update(generation={"temperature": 1, "seed": 3})))
    assert (warm.generation.temperature, warm.generation.seed, warm.generation.resolved(64).max_new_tokens) == (
        1.0,
        3,
        64,
    )


# ---------------------------------------------------------------- before data and models, quickly


def test_refused_before_any_data_is_read_or_model_loaded(tmp_path):
    path = spec_file(tmp_path, _rename((), "prompt", "promt"))
    missing = tmp_path / "no-data-here"
    backend = ScriptedBackend("Final Answer: B")
    start = time.perf_counter()
    with pytest.raises(MedlensError, match="unknown key 'promt'"):
        run_benchmark(str(path), backend, out_dir=tmp_path / "run", data=missing)
    with pytest.raises(MedlensError, match="unknown key 'promt'"):  # a model name that would fail to load
        run_benchmark(str(path), "no-such-model", out_dir=tmp_path / "run", data=missing)
    assert time.perf_counter() - start < 1.0
    assert backend.requests == [] and not missing.exists() and not (tmp_path / "run").exists()


def test_every_rejection_is_quick(tmp_path):
    start = time.perf_counter()
    for change in (_kind("task", task="lab-extract", task_options={"dpi": 1}), _metric("mean_iou", by_label="no")):
        refused(spec_file(tmp_path, change))
    assert time.perf_counter() - start < 1.0


def test_cli_exits_2_with_one_line_naming_the_key(tmp_path, cli):
    path = spec_file(tmp_path, _metric("mean_iou", by_label="yes"))
    code, out, err = cli("eval", "--benchmark", str(path), "--data", tmp_path / "none", "--out", tmp_path / "run", "-q")
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert str(path) in line and "metrics[0].options.by_label" in line and "valid boolean" in line
    path = spec_file(tmp_path, _rename((), "prompt", "promt"))
    code, _, err = cli("eval", "--benchmark", str(path), "--out", tmp_path / "run", "-q")
    assert code == 2 and err.strip().splitlines() == [
        f"medlens: error: {path}: unknown key 'promt' (did you mean 'prompt'?)"
    ]
