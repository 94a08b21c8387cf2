"""`ask --html`: a self-contained page with the images sent, the answer (escaped), warnings, disclaimer and,
for localize, the boxes drawn; `parse localize --overlay` draws boxes on a given image; `prepare` of PDFs
and FHIR/notes writes what the model would get."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image
from scripted import ScriptedBackend

from medlens import DISCLAIMER
from medlens.api import ask
from medlens.cli.result_page import render_page
from medlens.tasks.localize import PALETTE

BOXES = '[{"box_2d": [300, 100, 700, 480], "label": "right lung"}]'


@pytest.fixture()
def landscape(tmp_path):
    path = tmp_path / "cxr.png"
    Image.fromarray(np.full((100, 200), 90, np.uint8)).save(path)
    return path


def _images(page: str) -> list[np.ndarray]:
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(u))).convert("RGB")) for u in uris]


def test_localize_page_draws_the_boxes_on_the_original_image(landscape):
    builds = []
    result = ask(landscape, None, ScriptedBackend(BOXES), task="localize", on_build=builds.append)
    page = render_page(result, builds)
    (image,) = _images(page)
    assert image.shape == (100, 200, 3)  # unpadded, not downscaled (under the page size)
    sent = builds[0].requests[0].messages[0]["content"][0]["image"]  # the padded square the model got
    pad = builds[0].requests[0].context["padding"]
    assert tuple(image[50, 20]) == PALETTE[0]  # left edge of the box, in the original image's pixels
    assert tuple(image[60, 60]) == tuple(sent[pad["y"] + 60, pad["x"] + 60])  # inside: the image as sent
    assert DISCLAIMER in page and "right lung" in page


def test_model_text_is_escaped(landscape):
    evil = "<script>alert(1)</script> Final Answer: yes"
    builds = []
    result = ask(landscape, "Is it <b>bad</b>?", ScriptedBackend(evil), on_build=builds.append)
    result["warnings"].append("<img src=x onerror=alert(2)>")
    page = render_page(result, builds)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(2)&gt;" in page


def test_many_images_are_thumbnails(tmp_path):
    from dicom_factory import write_series

    arrays = [np.full((300, 300), 1000 + i, np.int16) for i in range(5)]
    write_series(tmp_path / "ct", arrays, positions=[(0, 0, float(i)) for i in range(5)])
    builds = []
    result = ask(tmp_path / "ct", "What?", ScriptedBackend("no"), on_build=builds.append)
    images = _images(render_page(result, builds))
    assert len(images) == result["n_images"] == 5 and all(max(i.shape[:2]) == 256 for i in images)


def test_ask_html_through_the_cli(landscape, tmp_path, cli):
    page = tmp_path / "result.html"
    code, out, err = cli("ask", landscape, "-Q", "What is it?", "--max-new-tokens", "2", "--html", page)
    assert code == 0, err
    text = page.read_text()
    assert json.loads(out)["answer"] is not None and len(_images(text)) == 1 and "untrained test model" in text


def test_parse_localize_overlay(landscape, tmp_path, cli, monkeypatch):
    out = tmp_path / "drawn.png"
    monkeypatch.setattr("sys.stdin", io.StringIO(BOXES))
    code, stdout, err = cli("parse", "localize", "--overlay", landscape, "--out", out)
    assert code == 0, err
    assert json.loads(stdout)["payload"]["boxes"][0]["box_px"] == [20, 10, 96, 90]
    drawn = np.asarray(Image.open(out).convert("RGB"))
    assert drawn.shape == (100, 200, 3) and tuple(drawn[50, 20]) == PALETTE[0]


def test_parse_overlay_errors(landscape, tmp_path, cli, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(BOXES))
    assert cli("parse", "localize", "--overlay", landscape)[0] == 2  # no --out
    code, _, err = cli("parse", "localize", "--overlay", tmp_path / "none.png", "--out", tmp_path / "o.png")
    assert code == 2 and "none.png" in err
    code, _, err = cli("parse", "qa", "--overlay", landscape, "--out", tmp_path / "o.png")
    assert code == 2 and "localize" in err


def test_prepare_pdf_writes_the_pages_lab_extract_gets(tmp_path, cli):
    from test_task_lab import PAGES, write_report

    from medlens.io.pdf import render_pdf

    pdf = tmp_path / "report.pdf"
    write_report(pdf)
    code, _, err = cli("prepare", pdf, "--out", tmp_path / "p", "--dpi", "72")
    assert code == 0, err
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert [i["page"] for i in manifest["images"]] == list(range(1, len(PAGES) + 1)) and manifest["dpi"] == 72
    expected = render_pdf(pdf, dpi=72)
    for entry, page in zip(manifest["images"], expected, strict=True):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "p" / entry["file"]).convert("RGB")), page)


def test_prepare_fhir_writes_the_ehr_prompt_text(tmp_path, cli):
    from test_task_ehr import bundle_dict

    from medlens.tasks import TaskOptions, get_task

    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(bundle_dict()))
    code, _, err = cli("prepare", path, "--out", tmp_path / "s", "--token-budget", "400")
    assert code == 0, err
    summary = (tmp_path / "s" / "summary.txt").read_text()
    build = get_task("ehr-qa").build([path], "<your question>", TaskOptions(token_budget=400))
    assert summary == build.requests[0].messages[0]["content"][0]["text"] + "\n"
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["summary"] == "summary.txt" and manifest["token_budget"] == 400 and manifest["images"] == []
