"""medlens.pipeline without a cluster: the local runner's per-row failure isolation, answers that do not depend
on how rows are batched, the rows and the crash ledger the Ray runner uses, and its refusals."""

from __future__ import annotations

import pickle
import sys
import threading
from typing import Any

import pytest
from pipeline_stages import ToyStages, toy_units

from medlens.errors import MedlensError
from medlens.pipeline import BackendSpec, Outcome, RaySettings, Unit, run_pipeline
from medlens.pipeline.ray_ledger import Ledger
from medlens.pipeline.ray_rows import ANSWER, BATCH, CRASHED, PREPARE, pack, prepare_row, unit_rows, unpack

pytest.importorskip("torch")

FAULTS = {
    "corrupt": {"fault": "corrupt", "path": "series/0001.dcm"},
    "untyped": {"fault": "untyped"},
    "bad_image": {"fault": "bad_image"},
    "parser": {"fault": "finish_fails"},
}


def _run(units: list[Unit], batch_size: int, spec: BackendSpec | None = None) -> dict[str, Outcome]:
    got: list[Outcome] = []
    run_pipeline(units, ToyStages(), spec or BackendSpec("test-tiny"), on_outcome=got.append, batch_size=batch_size)
    assert sorted(o.key for o in got) == sorted(u.key for u in units)  # every unit once
    return {o.key: o for o in got}


@pytest.fixture(scope="module")
def by_four() -> dict[str, Outcome]:
    return _run(toy_units(**FAULTS), batch_size=4)


def test_a_bad_row_fails_only_itself(by_four: dict[str, Outcome]) -> None:
    errors = {key: o.error for key, o in by_four.items() if not o.ok}
    assert errors == {
        "corrupt": {
            "error": "CorruptFileError",
            "reason": "series/0001.dcm: pixel data truncated at byte 4096",
            "stage": "prepare",
            "path": "series/0001.dcm",
        },
        "untyped": {"error": "ValueError", "reason": "a decoder bug", "stage": "prepare", "untyped": True},
        "bad_image": {
            "error": "MedlensError",
            "reason": "image parts must be RGB uint8 arrays (H x W x 3); got float32 with shape (32, 40, 3)",
            "stage": "answer",
        },
        "parser": {
            "error": "KeyError",
            "reason": "\"no 'Final Answer' in the output\"",
            "stage": "answer",
            "untyped": True,
        },
    }
    ok = [o for o in by_four.values() if o.ok]
    assert len(ok) == 8
    assert by_four["two"].result is not None and len(by_four["two"].result["answers"]) == 2
    assert all(o.result is not None and o.result["tokens"] == [6] * len(o.result["answers"]) for o in ok)


def test_answers_do_not_depend_on_the_batch(by_four: dict[str, Outcome]) -> None:
    """Greedy test-tiny answers alone, in batches of 4 (with the failing rows among them) and of 8 agree."""
    units = toy_units()
    alone = _run(units, batch_size=1)
    eight = _run(units, batch_size=8)
    for unit in units:
        assert alone[unit.key].result == by_four[unit.key].result == eight[unit.key].result, unit.key
    assert alone["short"].result == {  # pinned: test-tiny is random but fixed
        "answers": ["ananananan with"],
        "tokens": [6],
        "finish": ["length"],
        "backend": True,
    }


def test_the_model_loads_only_for_rows_left_to_answer() -> None:
    units = toy_units(corrupt=FAULTS["corrupt"])[-1:]
    got = _run(units, batch_size=4, spec=BackendSpec("no-such-model"))
    assert got["corrupt"].error is not None and got["corrupt"].error["error"] == "CorruptFileError"


# ---------------------------------------------------------------- what the Ray runner is built from


def test_rows_carry_the_prepared_object_once() -> None:
    units = toy_units()[:3]
    rows = unit_rows(units)
    assert [row["index"] for row in rows] == [0, 1, 2]
    assert pickle.loads(rows[2]["unit"]) == units[2]
    ledger = Ledger()
    out = prepare_row(rows[2], stages=ToyStages(), ledger=ledger, crash_attempts=2, decode_workers=1)
    prepared, error = unpack(out["payload"])
    assert error is None and prepared["image"].shape == (40, 56, 3) and prepared["questions"] == ["Is there a nodule?"]
    assert ledger.start(PREPARE, [2]) == [0]  # the attempt was closed


def test_an_unpicklable_prepared_object_fails_its_row() -> None:
    prepared, error = unpack(pack({"lock": threading.Lock()}, None))
    assert prepared is None and error is not None
    assert error["stage"] == "prepare" and error["reason"].startswith("the prepared row cannot be sent")


def test_a_row_that_keeps_killing_its_worker_is_not_tried_again() -> None:
    ledger = Ledger()
    row = unit_rows(toy_units()[:1])[0]
    assert ledger.start(PREPARE, [0]) == [0]  # two attempts that never finished (their worker died)
    assert ledger.start(PREPARE, [0]) == [1]
    out = prepare_row(row, stages=ToyStages(), ledger=ledger, crash_attempts=2, decode_workers=1)
    assert unpack(out["payload"]) == (
        None,
        {
            "error": CRASHED,
            "reason": "the worker process died 2 times while preparing this row (a native crash, an abort or "
            "running out of memory); it was not tried again",
            "stage": "prepare",
        },
    )


def test_a_replica_answers_a_crashed_batch_row_by_row(tiny_backend: Any) -> None:
    """After a batch took its replica down, the rows are answered one at a time (same answers), and a row
    whose lone attempts died ``crash_attempts`` times fails without running."""
    from medlens.pipeline.ray_replicas import Replica

    units = toy_units(corrupt=FAULTS["corrupt"])[-4:]  # fact, clear, mri and the corrupt row
    stages = ToyStages()
    payloads = [pack(*_prepare(stages, unit)) for unit in units]
    indices = list(range(len(units)))
    replica = Replica.__new__(Replica)  # the actor's state without Ray: the session's test-tiny
    replica.stages, replica.backend, replica.crash_attempts = stages, tiny_backend, 2
    replica.ledger = Ledger()
    together = replica.answer(indices, units, payloads)
    assert [index for index, _, _ in together] == [3, 0, 1, 2]  # the failed row passes through first
    replica.ledger.start(BATCH, [0, 1, 2])  # an attempt at this batch died
    replica.ledger.start(ANSWER, [1])  # ... twice while answering row 1 alone
    replica.ledger.start(ANSWER, [1])
    alone = replica.answer(indices, units, payloads)
    assert {i: (r, e) for i, r, e in alone if i != 1} == {i: (r, e) for i, r, e in together if i != 1}
    crashed = dict((i, e) for i, _, e in alone)[1]
    assert crashed is not None and crashed["error"] == CRASHED and crashed["stage"] == "answer"


def _prepare(stages: ToyStages, unit: Unit) -> tuple[Any, dict[str, Any] | None]:
    from medlens.pipeline.failures import prepare_one

    return prepare_one(stages, unit)


def test_ray_needs_a_backend_spec_and_says_how_to_install_ray(tiny_backend: Any, monkeypatch) -> None:
    from medlens.pipeline.ray_runner import run_ray

    with pytest.raises(MedlensError, match="give the runner a BackendSpec"):
        run_ray(toy_units()[:1], ToyStages(), tiny_backend, batch_size=1, on_outcome=print, settings=RaySettings())
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MedlensError, match=r"pip install 'medlens\[scale\]'"):
        run_ray(
            toy_units()[:1],
            ToyStages(),
            BackendSpec("test-tiny"),
            batch_size=1,
            on_outcome=print,
            settings=RaySettings(),
        )
