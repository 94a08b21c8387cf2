"""localize: pad to square and back, the box parser on realistic outputs, IoU, the CLI end to end."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
from PIL import Image
from scripted import ScriptedBackend

from medlens.errors import MedlensError
from medlens.prep.boxes import iou, mean_iou
from medlens.prep.square import Padding, from_pixels, pad_to_square, padding_for, to_pixels
from medlens.tasks import TASKS, TaskOptions, get_task
from medlens.tasks.base import ParseError
from medlens.tasks.localize import ANSWER_FORMAT, PALETTE, LocalizeTask

# --- pad to square and back ---


def test_pad_portrait_puts_bars_left_and_right():
    image = np.arange(5 * 3 * 3, dtype=np.uint8).reshape(5, 3, 3) + 1
    square, padding = pad_to_square(image)
    assert padding == Padding(width=3, height=5, x=1, y=0, side=5)
    assert square.shape == (5, 5, 3) and square.dtype == np.uint8
    assert np.array_equal(square[:, 1:4], image)
    assert not square[:, 0].any() and not square[:, 4].any()


def test_pad_landscape_puts_bars_top_and_bottom_odd_row_last():
    image = np.full((2, 5, 3), 200, dtype=np.uint8)
    square, padding = pad_to_square(image)
    assert padding == Padding(width=5, height=2, x=0, y=1, side=5)
    assert np.array_equal(square[1:3], image)
    assert not square[0].any() and not square[3:].any()


def test_pad_square_and_grey_images():
    image = np.ones((4, 4, 3), dtype=np.uint8)
    square, padding = pad_to_square(image)
    assert square is image and padding == Padding(4, 4, 0, 0, 4)
    grey, padding = pad_to_square(np.ones((2, 4), dtype=np.uint8))
    assert grey.shape == (4, 4) and padding.y == 1
    with pytest.raises(ValueError):
        pad_to_square(np.ones((2, 2, 2, 3), dtype=np.uint8))


def test_to_pixels_landscape_and_portrait_exact():
    wide = padding_for(1000, 500)  # 250 black rows on top and bottom
    assert to_pixels([250, 0, 750, 1000], wide) == [0, 0, 1000, 500]
    assert to_pixels([300, 100, 700, 480], wide) == [100, 50, 480, 450]
    assert to_pixels([0, 0, 1000, 1000], wide) == [0, 0, 1000, 500]  # the padding is clipped away
    tall = padding_for(600, 1200)  # 300 black columns on each side
    assert tall == Padding(600, 1200, 300, 0, 1200)
    assert to_pixels([0, 250, 1000, 750], tall) == [0, 0, 600, 1200]
    assert to_pixels([100, 500, 200, 600], tall) == [300, 120, 420, 240]
    assert to_pixels([100, 0, 200, 100], tall) == [0, 120, 0, 240]  # wholly inside the padding


@pytest.mark.parametrize(("width", "height"), [(2000, 1000), (1000, 3000), (1841, 1955), (640, 480), (7, 13)])
def test_pixel_round_trip(width, height):
    padding = padding_for(width, height)
    rng = np.random.default_rng(width)
    tolerance = padding.side / 1000 / 2 + 0.5
    for _ in range(50):
        xs, ys = sorted(rng.integers(0, width + 1, 2)), sorted(rng.integers(0, height + 1, 2))
        box_px = [xs[0], ys[0], xs[1], ys[1]]
        back = to_pixels(from_pixels(box_px, padding), padding)
        assert max(abs(a - b) for a, b in zip(back, box_px, strict=True)) <= tolerance


def test_round_trip_exact_when_the_side_is_a_multiple_of_1000():
    padding = padding_for(2000, 1000)
    assert from_pixels([200, 100, 1800, 900], padding) == [300, 100, 700, 900]
    assert to_pixels([300, 100, 700, 900], padding) == [200, 100, 1800, 900]


def test_box_on_the_padded_square_lands_on_the_same_pixels_of_the_original():
    image = np.zeros((300, 500, 3), dtype=np.uint8)
    image[60:120, 100:250] = 255  # rows 60..119, columns 100..249
    square, padding = pad_to_square(image)
    rows, cols = np.nonzero(square[..., 0])
    box_2d = [
        rows.min() * 1000 / padding.side,
        cols.min() * 1000 / padding.side,
        (rows.max() + 1) * 1000 / padding.side,
        (cols.max() + 1) * 1000 / padding.side,
    ]
    assert to_pixels(box_2d, padding) == [100, 60, 250, 120]


# --- parser ---

RL = '{"box_2d": [300, 100, 700, 480], "label": "right lung"}'
LL = '{"box_2d": [300, 520, 700, 900], "label": "left lung"}'
HEART = '{"box_2d": [400, 350, 650, 650], "label": "heart"}'


def box(label, box_2d, box_px):
    return {"label": label, "box_2d": box_2d, "box_px": box_px}


RIGHT = box("right lung", [300, 100, 700, 480], [100, 50, 480, 450])
LEFT = box("left lung", [300, 520, 700, 900], [520, 50, 900, 450])
HEART_BOX = box("heart", [400, 350, 650, 650], [350, 150, 650, 400])

# (raw output, expected boxes, words every expected warning contains; [] means no warning)
CORPUS = [
    (f"```json\n[{RL}, {LL}]\n```", [RIGHT, LEFT], []),
    (f"Here are the boxes:\n[{HEART}]\nThe heart is normal in size.", [HEART_BOX], []),
    (f"```\n[\n  {RL},\n  {HEART}\n]\n```\nLet me know if you need more.", [RIGHT, HEART_BOX], []),
    (
        '<unused94>thought\nThe patient\'s left is on the image right. Try {"box_2d": [1, 2, 3, 4]}.\n'
        f"<unused95>```json\n[{LL}]\n```",
        [LEFT],
        [],
    ),
    (
        '[{"box_2d": [250, 0, 750, 1000], "label": "whole image"}]\nFinal Answer: whole image',
        [box("whole image", [250, 0, 750, 1000], [0, 0, 1000, 500])],
        [],
    ),
    (f'```json\n[{RL}, {{"box_2d": [300, 520, 7', [RIGHT], ["repaired", "cut off"]),
    (f'[{RL}, {{"box_2d": [300, 520, 700, 900], "label": "left lu', [RIGHT], ["repaired", "cut off"]),
    (f"[{RL}, {HEART}", [RIGHT, HEART_BOX], ["repaired"]),
    (
        '[{"label": "trachea", "confidence": 0.92, "box_2d": [260, 460, 420, 540], "note": "midline"}]',
        [box("trachea", [260, 460, 420, 540], [460, 10, 540, 170])],
        [],
    ),
    (
        'The nodule is here: {"box_2d": [500, 500, 600, 600], "label": "nodule"}',
        [box("nodule", [500, 500, 600, 600], [500, 250, 600, 350])],
        [],
    ),
    (
        '{"boxes": [{"bbox": [300, 100, 700, 480], "label": "right lung"}, '
        '{"Box2D": [400, 350, 650, 650], "name": "heart"}]}',
        [RIGHT, HEART_BOX],
        [],
    ),
    (
        '[{"box_2d": ["300", "100.4", " 700.6", 480.5], "label": "right lung"}, {"box": "400, 350, 650, 650", '
        '"label": "heart"}]',
        [box("right lung", [300, 100, 701, 481], [100, 50, 481, 451]), HEART_BOX],
        [],
    ),
    (
        '[{"box_2d": [-20, 950, 1100, 1040], "label": "left costophrenic angle"}]',
        [box("left costophrenic angle", [0, 950, 1000, 1000], [950, 0, 1000, 500])],
        ["clamped"],
    ),
    ('[{"box_2d": [700, 480, 300, 100], "label": "right lung"}]', [RIGHT], ["inverted"]),
    (
        f'[{{"box_2d": [1, 2, 3], "label": "aorta"}}, {RL}, {{"box_2d": [1, 2, 3, 4, 5], "label": "spine"}}, '
        '{"box_2d": [1, "two", 3, 4], "label": "rib"}, {"label": "carina"}, "heart"]',
        [RIGHT],
        ["dropped"],
    ),
    (
        '{"right lung": [300, 100, 700, 480], "heart": "[400, 350, 650, 650]"}',
        [RIGHT, HEART_BOX],
        [],
    ),
    ('[{"box_2d": [0.3, 0.1, 0.7, 0.48], "label": "right lung"}]', [RIGHT], ["fractions"]),
    (
        '[{"box_2d": [400, 350, 650, 650]}]',
        [box("", [400, 350, 650, 650], [350, 150, 650, 400])],
        ["no label"],
    ),
]

FAILURES = [
    "I cannot determine the location of the structures in this image.",
    '["right lung", "left lung"]',
    '[{"box_2d": [1, 2], "label": "heart"}]',
    "[]",
    '{"answer": "normal chest"}',
    "<unused94>thought\nFirst find [the lungs",
]


@pytest.fixture
def task():
    return LocalizeTask()


@pytest.mark.parametrize(("text", "boxes", "warned"), CORPUS)
def test_parser_corpus(task, text, boxes, warned):
    parsed = task.parse(text, task.parse_context(image_size="1000x500"))
    assert parsed.error is None
    assert parsed.payload == {"boxes": boxes, "image_size": [1000, 500]}
    assert parsed.final_answer == (", ".join(b["label"] for b in boxes if b["label"]) or None)
    if not warned:
        assert parsed.warnings == []
    for word in warned:
        assert any(word in w for w in parsed.warnings), (word, parsed.warnings)


def test_parser_counts_every_dropped_element(task):
    parsed = task.parse(CORPUS[14][0], {})
    assert len(parsed.warnings) == 5 and all("dropped" in w for w in parsed.warnings)


def test_parser_without_image_size_gives_no_pixel_boxes(task):
    parsed = task.parse(f"[{RL}]", {})
    assert parsed.payload == {"boxes": [{**RIGHT, "box_px": None}], "image_size": None}


@pytest.mark.parametrize("text", FAILURES)
def test_parser_reports_missing_boxes(task, text):
    with pytest.raises(ParseError, match=r"no JSON|no usable box|holds no boxes"):
        task.parse(text, {})


@pytest.mark.parametrize("size", ["1024", "x768", "0x10", "10x0", "1024*768", "big"])
def test_parse_context_rejects_bad_sizes(task, size):
    with pytest.raises(MedlensError, match="--image-size must look like 1024x768"):
        task.parse_context(image_size=size)


def test_parse_context(task):
    assert task.parse_context(image_size=None) == {}
    context = task.parse_context(image_size=" 600X1200 ")
    assert context == {
        "padding": {"width": 600, "height": 1200, "x": 300, "y": 0, "side": 1200},
        "image_size": [600, 1200],
    }


# --- IoU ---


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),  # identical
        ([0, 0, 10, 10], [20, 20, 30, 30], 0.0),  # disjoint
        ([0, 0, 10, 10], [0, 10, 10, 20], 0.0),  # touching edges
        ([0, 0, 10, 10], [0, 5, 10, 15], 50 / 150),  # half of each overlaps
        ([0, 0, 10, 10], [5, 0, 15, 10], 50 / 150),  # the same along the other axis
        ([0, 0, 10, 10], [2, 2, 7, 7], 25 / 100),  # contained
        ([0, 0, 10, 20], [5, 10, 15, 30], 50 / 350),  # corner overlap
        ([10, 10, 0, 0], [0, 0, 10, 10], 1.0),  # inverted corners
        ([5, 5, 5, 5], [5, 5, 5, 5], 0.0),  # no area
    ],
)
def test_iou(a, b, expected):
    assert iou(a, b) == pytest.approx(expected)
    assert iou(b, a) == pytest.approx(expected)
    assert iou(a[1::-1] + a[:1:-1], b[1::-1] + b[:1:-1]) == pytest.approx(expected)  # x/y swapped


def test_mean_iou_matches_by_label():
    pred = [
        {"label": "HEART", "box_2d": [0, 0, 10, 10]},
        {"label": "left lung", "box_2d": [0, 5, 10, 15]},
        {"label": "spine", "box_2d": [0, 0, 100, 100]},
    ]
    target = [{"label": "heart ", "box_2d": [0, 0, 10, 10]}, {"label": "right  lung", "box_2d": [0, 0, 10, 10]}]
    assert mean_iou(pred, target) == pytest.approx((1.0 + 0.0) / 2)
    assert mean_iou(pred, target, by_label=False) == pytest.approx((1.0 + 1.0) / 2)
    assert mean_iou([], target) == 0.0
    pixels = [{"label": "heart", "box_px": [0, 0, 10, 10]}]
    assert mean_iou(pixels, [{"label": "Heart", "box_px": [0, 5, 10, 15]}], key="box_px") == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        mean_iou(pred, [])


# --- build, overlay, CLI ---


@pytest.fixture
def landscape_png(tmp_path):
    """A 200 x 100 grey picture."""
    path = tmp_path / "wide.png"
    Image.fromarray(np.full((100, 200, 3), 90, dtype=np.uint8)).save(path)
    return path


def test_registered_and_listed(cli):
    assert TASKS.get("localize") == "medlens.tasks.localize:LocalizeTask"
    assert isinstance(get_task("localize"), LocalizeTask)
    code, out, _ = cli("tasks")
    assert code == 0 and "localize" in out


def test_build_pads_the_image_and_states_the_format(landscape_png):
    build = LocalizeTask().build([landscape_png], "Where is the heart?", TaskOptions(thinking=True))
    (request,) = build.requests
    (turn,) = request.messages
    image, text = turn["content"]
    assert image["type"] == "image" and image["image"].shape == (200, 200, 3)
    assert not image["image"][:50].any() and (image["image"][50:150] == 90).all()
    assert text["type"] == "text" and "Where is the heart?" in text["text"]
    assert text["text"].startswith("SYSTEM INSTRUCTION: think silently") and text["text"].endswith(ANSWER_FORMAT)
    for fact in ('"box_2d": [y0, x0, y1, x1]', '"label"', "0 to 1000", "patient's left", "square", "JSON list"):
        assert fact in text["text"]
    assert request.context == {
        "padding": {"width": 200, "height": 100, "x": 0, "y": 50, "side": 200},
        "image_size": [200, 100],
    }
    json.dumps(build.details)  # no arrays in the envelope
    assert build.details["image_size"] == [200, 100] and build.n_images == 1


def test_default_question_names_the_structures(landscape_png):
    from medlens.tasks.runner import check_inputs

    task = LocalizeTask()
    question = check_inputs(task, [landscape_png], None)
    text = task.build([landscape_png], question, TaskOptions()).requests[0].messages[0]["content"][1]["text"]
    assert all(s in text for s in ("right lung", "left lung", "heart"))


def test_overlay_is_drawn_on_the_original_image(landscape_png, tmp_path):
    from medlens.api import ask

    out = tmp_path / "overlay.png"
    answer = '[{"box_2d": [300, 100, 700, 480], "label": "right lung"}, {"box_2d": [250, 0, 750, 1000], "label": "x"}]'
    result = ask(landscape_png, None, ScriptedBackend(answer), task="localize", overlay=out)
    assert result["parse_error"] is None and result["final_answer"] == "right lung, x"
    assert result["payload"]["boxes"][0]["box_px"] == [20, 10, 96, 90]
    assert result["payload"]["image_size"] == [200, 100]
    drawn = np.asarray(Image.open(out).convert("RGB"))
    assert drawn.shape == (100, 200, 3)
    assert tuple(drawn[50, 20]) == PALETTE[0]  # left edge of box 1
    assert tuple(drawn[50, 199]) == PALETTE[1]  # right edge of box 2 (the whole image)
    assert tuple(drawn[60, 60]) == (90, 90, 90)  # inside: untouched


def test_localize_refuses_volumes(tmp_path, cli):
    from medlens.demo.phantom import ct_phantom, write_ct_series

    hu, _ = ct_phantom(n_slices=6, size=32)
    write_ct_series(hu, tmp_path / "ct")
    code, out, err = cli("ask", tmp_path / "ct", "--task", "localize", "-q")
    assert code == 2 and out == ""
    assert "localize takes one 2-D image" in err and "Traceback" not in err


def _check_noise_envelope(code, out, err, overlay):
    assert code == 0, err
    assert "Traceback" not in err
    result = json.loads(out)
    assert result["task"] == "localize" and result["n_images"] == 1
    assert result["payload"] is not None or result["parse_error"]
    if result["parse_error"]:
        assert result["payload"] is None and result["final_answer"] is None
        assert any(w.startswith("could not parse the model output:") for w in result["warnings"])
        assert any("overlay not written" in w for w in result["warnings"]) and not overlay.exists()
    return result


def test_cli_ask_localize_test_tiny_on_png(landscape_png, tmp_path, cli):
    overlay = tmp_path / "out.png"
    code, out, err = cli("ask", landscape_png, "--task", "localize", "--model", "test-tiny", "--overlay", overlay, "-q")
    result = _check_noise_envelope(code, out, err, overlay)
    assert result["details"]["image_size"] == [200, 100] and result["details"]["padded_side"] == 200


def test_cli_ask_localize_test_tiny_on_chest_radiograph(pydicom_file, tmp_path, cli):
    path = pydicom_file("RG1_UNCR.dcm")
    overlay = tmp_path / "out.png"
    code, out, err = cli(
        "ask", path, "Locate the heart.", "--task", "localize", "--model", "test-tiny", "--overlay", overlay, "-q"
    )
    result = _check_noise_envelope(code, out, err, overlay)
    assert result["details"]["image_size"] == [1841, 1955] and result["details"]["padded_side"] == 1955
    assert result["details"]["modality"] == "CR"


def test_cli_parse_with_image_size(monkeypatch, cli):
    raw = f"```json\n[{RL}, {LL}]\n```"
    monkeypatch.setattr(sys, "stdin", io.StringIO(raw))
    code, out, err = cli("parse", "localize", "--image-size", "1000x500")
    assert code == 0, err
    result = json.loads(out)
    assert result["payload"] == {"boxes": [RIGHT, LEFT], "image_size": [1000, 500]}
    assert result["final_answer"] == "right lung, left lung" and result["parse_error"] is None


def test_cli_parse_without_size_and_with_garbage(monkeypatch, cli):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"[{HEART}]"))
    code, out, _ = cli("parse", "localize")
    assert code == 0 and json.loads(out)["payload"]["boxes"][0]["box_px"] is None
    monkeypatch.setattr(sys, "stdin", io.StringIO("No abnormality seen."))
    code, out, err = cli("parse", "localize", "--image-size", "1000x500")
    assert code == 0 and "Traceback" not in err
    result = json.loads(out)
    assert result["payload"] is None and result["parse_error"] == "no JSON found in the model output"


def test_cli_parse_rejects_a_bad_size(monkeypatch, cli):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"[{HEART}]"))
    code, out, err = cli("parse", "localize", "--image-size", "1024by768")
    assert code == 2 and out == ""
    assert err.strip() == "medlens: error: --image-size must look like 1024x768"
