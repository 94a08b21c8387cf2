"""Every evaluation kind end to end through ``run_benchmark`` with scripted model outputs: the exact
predictions and the exact metric values, computed by hand in the comments; ``generation.thinking`` and
``generation.seed`` reach every request of every kind; the journal key follows them."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from eval_data import write_benchmark, write_jsonl, write_png
from scripted import ScriptedBackend

from medlens.eval.kinds import KINDS
from medlens.eval.runner import SAMPLES, run_benchmark
from medlens.prompts import THINKING_INSTRUCTION


@dataclass
class Case:
    """A tiny benchmark: its kind, metrics, YAML keys, items (written under ``data/NAME``) and the outputs."""

    kind: str
    metrics: list[dict]
    rows: Callable[[Path], list[dict]]
    outputs: list[str]
    keys: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    results: dict[str, Any]
    samples: list[dict[str, Any]]
    backend: ScriptedBackend

    def value(self, metric: str) -> float:
        return self.results["metrics"][metric]["value"]

    @property
    def predictions(self) -> list[Any]:
        return [s["prediction"] for s in self.samples]


def run_case(tmp_path: Path, name: str, case: Case, generation: dict | None = None, run_dir: str = "run") -> Run:
    data = tmp_path / "data"
    write_jsonl(data / name / "test.jsonl", case.rows(data / name))
    keys = {**case.keys, **({"generation": generation} if generation else {})}
    spec = write_benchmark(tmp_path / "specs", name, case.kind, case.metrics, **keys)
    backend = ScriptedBackend(*case.outputs)
    results = run_benchmark(str(spec), backend, out_dir=tmp_path / run_dir, data=data, n_resamples=100)
    samples = [json.loads(line) for line in (tmp_path / run_dir / SAMPLES).read_text().splitlines()]
    return Run(results, samples, backend)


def texts(request) -> str:
    """The text parts of a request's single user turn."""
    (message,) = request.messages
    return "\n".join(part["text"] for part in message["content"] if part["type"] == "text")


def n_images(request) -> int:
    return sum(part["type"] == "image" for part in request.messages[0]["content"])


# ---------------------------------------------------------------- the cases

OPTIONS = {"A": "liver", "B": "pancreas", "C": "spleen", "D": "kidney"}
MCQ_PROMPT = '{question}\n\n{options}\n\nAnswer as "Final Answer: X".'


def _mcq_rows(folder: Path) -> list[dict]:
    return [
        {"id": f"q{i}", "question": f"Which organ makes insulin? ({i})", "options": OPTIONS, "target": t}
        for i, t in enumerate("BBA")
    ]


def _mcq_image_rows(folder: Path) -> list[dict]:
    return [{**row, "image": write_png(folder / f"p{i}.png", i)} for i, row in enumerate(_mcq_rows(folder))]


MCQ = Case(
    "mcq",
    [{"name": "accuracy", "fn": "accuracy"}],
    _mcq_rows,
    ["Final Answer: B", "The answer is C.", "Not sure."],
    {"prompt": MCQ_PROMPT},
)
MCQ_IMAGE = Case("mcq", MCQ.metrics, _mcq_image_rows, MCQ.outputs, MCQ.keys)

CLOSED = Case(
    "closed_label",
    [{"name": "accuracy", "fn": "accuracy"}],
    lambda folder: [
        {"id": f"p{i}", "context": "Aspirin reduced events.", "question": "Does aspirin help?", "target": t}
        for i, t in enumerate(["maybe", "no", "yes"])
    ],
    ["Final Answer: maybe", "Yes, clearly.", "It is yes or no."],
    {"prompt": "{context}\nQuestion: {question}", "options": {"labels": ["yes", "no", "maybe"]}},
)


def _vqa_rows(folder: Path) -> list[dict]:
    pairs = [("Which organ?", "left lung"), ("Fracture?", "no"), ("Which organ?", "left lung"), ("Mass?", "yes")]
    return [
        {"id": f"v{i}", "image": write_png(folder / f"v{i}.png", 10 + i), "question": q, "target": a}
        for i, (q, a) in enumerate(pairs)
    ]


VQA = Case(
    "vqa",
    [
        {"name": "tokenized_f1", "fn": "tokenized_f1"},
        {"name": "open_f1", "fn": "tokenized_f1", "options": {"questions": "open"}},
        {"name": "closed_accuracy", "fn": "closed_accuracy"},
    ],
    _vqa_rows,
    ["Final Answer: left lung", "No.", "The right lung", "There is no mass."],
    {"prompt": "{question}\nAnswer briefly."},
)


def _condition_rows(folder: Path) -> list[dict]:
    images = {name: write_png(folder / f"{name}.png", 20 + i) for i, name in enumerate("abc")}
    rows = [
        ("a", "cardiomegaly", "yes"),
        ("a", "effusion", "no"),
        ("b", "cardiomegaly", "yes"),
        ("c", "cardiomegaly", "no"),
    ]
    return [{"id": f"{img}-{label}", "image": images[img], "label": label, "target": t} for img, label, t in rows]


CONDITION = Case(
    "condition",
    [
        {"name": "macro_f1", "fn": "binary_f1_macro_by_group"},
        {"name": "macro_accuracy", "fn": "macro_accuracy"},
        {"name": "accuracy", "fn": "accuracy"},
    ],
    _condition_rows,
    ["Final Answer: yes", "Final Answer: no", "I cannot tell.", "Final Answer: yes"],
    {
        "prompt": 'Is there "{label}" in the {what}? Answer "Final Answer: yes" or "Final Answer: no".',
        "options": {"what": "chest X-ray"},
    },
)


def _diagnosis_rows(folder: Path) -> list[dict]:
    cases = [("meningioma", ["meningeal tumour"]), ("glioblastoma", []), ("Pituitary adenoma", [])]
    return [
        {
            "id": f"m{i}",
            "image": write_png(folder / f"m{i}.png", 30 + i),
            "question": "Headache.",
            "target": t,
            "synonyms": s,
        }
        for i, (t, s) in enumerate(cases)
    ]


DIAGNOSIS = Case(
    "open_diagnosis",
    [{"name": "match", "fn": "normalized_match"}],
    _diagnosis_rows,
    [
        "Final Answer: A meningeal tumour.",
        "Most likely an astrocytoma.",
        "Considering the sella, final answer: a pituitary adenoma with haemorrhage",
    ],
    {"prompt": "{question}\nGive the single most likely diagnosis.", "options": {"judge": True}},
)


def _slide_rows(folder: Path) -> list[dict]:
    targets = ["invasive ductal carcinoma grade 2", "benign breast tissue"]
    return [
        {
            "id": f"w{i}",
            "images": [write_png(folder / f"w{i}-{j}.png", 40 + 3 * i + j) for j in range(1 + i)],
            "tissue": "breast",
            "procedure": "core needle biopsy",
            "target": t,
        }
        for i, t in enumerate(targets)
    ]


IMAGES_TEXT = Case(
    "images_text",
    [{"name": "rouge_l", "fn": "rouge_l"}],
    _slide_rows,
    ["Invasive carcinoma, ductal type.", "Benign breast tissue"],
    {"prompt": "These are patches of a {tissue} slide obtained by {procedure}. Describe it."},
)


def _localize_rows(folder: Path) -> list[dict]:
    boxes = [("heart", [400, 300, 800, 700]), ("right lung", [250, 250, 750, 750]), ("heart", [100, 100, 200, 200])]
    return [
        {
            "id": f"g{i}",
            "image": write_png(folder / f"g{i}.png", 50 + i),
            "question": f"Locate the {label}.",
            "target": [{"label": label, "box_2d": box}],
        }
        for i, (label, box) in enumerate(boxes)
    ]


TASK = Case(
    "task",
    [
        {"name": "mean_iou", "fn": "mean_iou"},
        {"name": "iou_any_label", "fn": "mean_iou", "options": {"by_label": False}},
    ],
    _localize_rows,
    [
        '[{"box_2d": [400, 300, 800, 700], "label": "heart"}]',
        '```json\n[{"box_2d": [0, 0, 500, 500], "label": "lung"}]\n```',
        "I cannot see a heart.",
    ],
    {"options": {"task": "localize", "prediction": "boxes", "task_options": {"instruction": "A chest X-ray."}}},
)

LABELS = ["cardiomegaly", "opacity", "nodule", "normal"]
FINDINGS = Case(
    "report_findings",
    [
        {"name": "macro_f1", "fn": "multilabel_f1_macro", "options": {"labels": LABELS}},
        {"name": "micro_f1", "fn": "multilabel_f1_micro", "options": {"labels": LABELS}},
    ],
    lambda folder: [
        {"id": "r0", "report": "The heart is enlarged.", "target": ["cardiomegaly"]},
        {"id": "r1", "report": "A small nodule.", "target": ["nodule"]},
        {"id": "r2", "report": "Nothing to report.", "target": []},
    ],
    ['["cardiomegaly", "Opacity"]', "No findings.", "[]"],
    {"prompt": "{report}\nWhich of {labels} are present? Reply with a JSON list.", "options": {"labels": LABELS}},
)

CASES = {
    "mcq": MCQ,
    "mcq-image": MCQ_IMAGE,
    "closed_label": CLOSED,
    "vqa": VQA,
    "condition": CONDITION,
    "open_diagnosis": DIAGNOSIS,
    "images_text": IMAGES_TEXT,
    "task": TASK,
    "report_findings": FINDINGS,
}


def test_every_registered_kind_has_a_known_answer_case():
    assert {case.kind for case in CASES.values()} == set(KINDS.names())


# ---------------------------------------------------------------- known answers


@pytest.mark.parametrize("name", ["mcq", "mcq-image"])
def test_mcq(name, tmp_path):
    run = run_case(tmp_path, name, CASES[name])
    # "Final Answer: B" -> B; "The answer is C." -> C; "Not sure." names no letter -> None
    assert run.predictions == ["B", "C", None]
    # targets B, B, A: only the first is right -> 1/3
    assert run.value("accuracy") == pytest.approx(1 / 3)
    assert run.results["n_unparsed"] == 1
    first = run.backend.requests[0]
    assert "A. liver\nB. pancreas\nC. spleen\nD. kidney" in texts(first)
    assert THINKING_INSTRUCTION not in texts(first)
    assert n_images(first) == (1 if name == "mcq-image" else 0)


def test_closed_label(tmp_path):
    run = run_case(tmp_path, "closed", CLOSED)
    # "Final Answer: maybe" -> maybe; "Yes, clearly." names one label -> yes; "yes or no" names two -> None
    assert run.predictions == ["maybe", "yes", None]
    # targets maybe, no, yes -> only the first is right
    assert run.value("accuracy") == pytest.approx(1 / 3)
    assert texts(run.backend.requests[0]) == "Aspirin reduced events.\nQuestion: Does aspirin help?"


def test_vqa(tmp_path):
    run = run_case(tmp_path, "vqa", VQA)
    assert run.predictions == ["left lung", "No.", "The right lung", "There is no mass."]
    # token F1: "left lung"/"left lung" 1; "no"/"no" 1; {right, lung} vs {left, lung}: P = R = 1/2 -> 1/2;
    # {there, is, no, mass} vs {yes}: 0 -> (1 + 1 + 0.5 + 0) / 4
    assert run.value("tokenized_f1") == pytest.approx(2.5 / 4)
    # open questions only (targets that are not yes/no): items 1 and 3 -> (1 + 0.5) / 2
    assert run.value("open_f1") == pytest.approx(0.75)
    # closed questions: "No." says no (target no, right); "There is no mass." says no (target yes, wrong)
    assert run.value("closed_accuracy") == pytest.approx(0.5)
    assert [s["scores"]["closed_accuracy"] for s in run.samples] == [None, 1.0, None, 0.0]
    assert n_images(run.backend.requests[0]) == 1 and texts(run.backend.requests[0]) == "Which organ?\nAnswer briefly."


def test_condition(tmp_path):
    run = run_case(tmp_path, "condition", CONDITION)
    assert run.predictions == ["yes", "no", None, "yes"]
    assert [s["group"] for s in run.samples] == ["cardiomegaly", "effusion", "cardiomegaly", "cardiomegaly"]
    # right: a-cardiomegaly, a-effusion; wrong: b-cardiomegaly (unparsed), c-cardiomegaly -> 2/4
    assert run.value("accuracy") == pytest.approx(0.5)
    # cardiomegaly 1 of 3 right, effusion 1 of 1 -> (1/3 + 1) / 2
    assert run.value("macro_accuracy") == pytest.approx(2 / 3)
    # cardiomegaly: tp a, fn b (unparsed counts as "no"), fp c -> 2 / (2 + 1 + 1) = 1/2;
    # effusion: no positive target or prediction -> 0 -> (1/2 + 0) / 2
    assert run.value("macro_f1") == pytest.approx(0.25)
    assert 'Is there "effusion" in the chest X-ray?' in texts(run.backend.requests[1])


def test_open_diagnosis(tmp_path):
    run = run_case(tmp_path, "diagnosis", DIAGNOSIS)
    assert run.predictions == [
        "A meningeal tumour.",
        "Most likely an astrocytoma.",
        "a pituitary adenoma with haemorrhage",
    ]
    assert [s["target"] for s in run.samples] == [
        ["meningioma", "meningeal tumour"],
        "glioblastoma",
        "Pituitary adenoma",
    ]
    # the synonym "meningeal tumour" is named; astrocytoma is not glioblastoma; "pituitary adenoma" is named
    assert run.value("match") == pytest.approx(2 / 3)


def test_images_text(tmp_path):
    run = run_case(tmp_path, "slides", IMAGES_TEXT)
    assert run.predictions == ["Invasive carcinoma, ductal type.", "Benign breast tissue"]
    # 1: words [invasive carcinoma ductal type] vs [invasive ductal carcinoma grade 2]: LCS 2 (invasive carcinoma),
    #    P = 2/4, R = 2/5, F = 2 PR / (P + R) = 0.4 / 0.9 = 4/9; 2: identical words -> 1; mean (4/9 + 1) / 2
    assert run.value("rouge_l") == pytest.approx(13 / 18)
    first, second = run.backend.requests
    assert (n_images(first), n_images(second)) == (1, 2)
    assert texts(second) == "These are patches of a breast slide obtained by core needle biopsy. Describe it."
    assert second.messages[0]["content"][-1]["type"] == "text"  # the images come first


def test_task(tmp_path):
    run = run_case(tmp_path, "localize", TASK)
    (heart,), (lung,), unparsed = run.predictions
    assert (heart["label"], heart["box_2d"]) == ("heart", [400, 300, 800, 700])
    assert (lung["label"], lung["box_2d"]) == ("lung", [0, 0, 500, 500]) and unparsed is None
    # by label: heart IoU 1; "lung" is not "right lung" -> 0; no prediction -> 0: 1/3
    assert run.value("mean_iou") == pytest.approx(1 / 3)
    # any label: [0,0,500,500] vs [250,250,750,750]: intersection 250*250, union 2*500*500 - 250*250 -> 1/7
    assert run.value("iou_any_label") == pytest.approx((1 + 1 / 7 + 0) / 3)
    text = texts(run.backend.requests[0])
    assert text.startswith("A chest X-ray.\n\nLocate the heart.") and "box_2d" in text


def test_report_findings(tmp_path):
    run = run_case(tmp_path, "findings", FINDINGS)
    # the labels of the JSON list (case ignored); "No findings." holds no list -> None; [] -> no finding
    assert run.predictions == [["cardiomegaly", "opacity"], None, []]
    # cardiomegaly tp 1 -> F1 1; opacity fp 1 -> 0; nodule fn 1 -> 0; normal never present -> 0: macro 1/4
    assert run.value("macro_f1") == pytest.approx(0.25)
    # pooled: tp 1, fp 1, fn 1 -> 2 / (2 + 1 + 1)
    assert run.value("micro_f1") == pytest.approx(0.5)
    assert "cardiomegaly, opacity, nodule, normal" in texts(run.backend.requests[0])


# ---------------------------------------------------------------- generation settings


@pytest.mark.parametrize("name", sorted(CASES))
def test_thinking_and_seed_reach_every_request(name, tmp_path):
    run = run_case(tmp_path, name, CASES[name], generation={"thinking": True, "seed": 7, "max_new_tokens": 64})
    assert len(run.backend.requests) == len(run.samples) > 0
    for request in run.backend.requests:
        assert THINKING_INSTRUCTION in texts(request)
        assert (request.seed, request.max_new_tokens, request.temperature) == (7, 64, 0.0)
    assert all(THINKING_INSTRUCTION in s["prompt"] for s in run.samples)
    assert run.results["config"]["generation"] == {
        "max_new_tokens": 64,
        "temperature": 0.0,
        "thinking": True,
        "seed": 7,
    }


def test_thinking_instruction_leads_the_text_after_the_images(tmp_path):
    run = run_case(tmp_path, "vqa", VQA, generation={"thinking": True})
    content = run.backend.requests[0].messages[0]["content"]
    assert [part["type"] for part in content] == ["image", "text"]
    assert content[1]["text"] == f"{THINKING_INSTRUCTION}\nWhich organ?\nAnswer briefly."


def test_the_task_kind_sets_thinking_in_its_task_options(tmp_path):
    from medlens.eval.registry import get_benchmark, make_kind

    write_benchmark(tmp_path, "loc", "task", TASK.metrics, options=TASK.keys["options"], generation={"thinking": True})
    spec, path = get_benchmark(str(tmp_path / "loc.yaml"))
    kind = make_kind(spec, path, "medgemma-1.5")
    assert kind.task_options.thinking is True and kind.task_options.instruction == "A chest X-ray."


def test_journal_key_follows_thinking_and_seed(tmp_path):
    first = run_case(tmp_path, "vqa", VQA)
    assert len(first.backend.requests) == 4
    assert len(run_case(tmp_path, "vqa", VQA).backend.requests) == 0  # same settings: all reused
    thinking = run_case(tmp_path, "vqa", VQA, generation={"thinking": True})
    assert len(thinking.backend.requests) == 4 and thinking.results["n_reused"] == 0
    seeded = run_case(tmp_path, "vqa", VQA, generation={"thinking": True, "seed": 1})
    assert len(seeded.backend.requests) == 4
    keys = {s["key"] for run in (first, thinking, seeded) for s in run.samples}
    assert len(keys) == 12
