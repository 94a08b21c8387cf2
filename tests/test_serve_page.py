"""The web page of ``medlens serve`` in a real headless Chromium (Debian's; never a downloaded browser),
against a real server on test-tiny (whose localize answers are fixed, so that the boxes are known).

Skips with the reason when Playwright or a Chromium executable is missing (CI: ``apt-get install chromium``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import write_series

pytest.register_assert_rewrite("medlens_server")  # the plugin below, imported here first
from medlens_server import LOCALIZE_ANSWER, TEST_KEY  # noqa: E402

pytest_plugins = ["medlens_server"]
TIMEOUT_MS = 60_000
# The page runs under the server's Content-Security-Policy (no eval): the tests wait with selectors and
# expect(), never with wait_for_function (Playwright evaluates its string in the page).


def expect(locator):
    """Playwright's ``expect`` (imported once the browser fixture found Playwright), waiting up to TIMEOUT_MS."""
    from playwright.sync_api import expect as playwright_expect

    playwright_expect.set_options(timeout=TIMEOUT_MS)
    return playwright_expect(locator)


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed: pip install playwright")
    executable = chromium_path()
    if executable is None:
        pytest.skip("no chromium executable on PATH (Debian: apt-get install chromium)")
    args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []  # root needs it
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, headless=True, args=args)
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    opened = context.new_page()
    opened.set_default_timeout(TIMEOUT_MS)
    problems: list[str] = []
    opened.on("pageerror", lambda exc: problems.append(str(exc)))
    yield opened
    context.close()
    assert not problems, f"JavaScript errors on the page: {problems}"


def ct_files(root: Path, slices: int = 5) -> list[Path]:
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 2000, (48, 48), dtype=np.int16) for _ in range(slices)]
    (root / "ct").mkdir()
    return write_series(root / "ct", arrays, slice_thickness=2.5)


def cxr_png(path: Path) -> Path:
    from PIL import Image

    yy, xx = np.mgrid[0:120, 0:160]
    Image.fromarray(((xx + yy) % 256).astype(np.uint8)).save(path)  # wider than tall: padded to a square
    return path


def open_page(page, server) -> None:
    page.goto(server.url + "/")
    tasks_loaded(page)


def tasks_loaded(page) -> None:
    """The task list came from GET /v1/tasks (the page starts with "qa" only)."""
    page.wait_for_selector("#task option[value=localize]", state="attached")


def finished(page, kind: str) -> None:
    """Wait until the status line says done or error; assert which (with the status text when wrong)."""
    status = page.wait_for_selector('#status[data-kind="done"], #status[data-kind="error"]', state="attached")
    assert status.get_attribute("data-kind") == kind, status.text_content()


def ask_and_wait(page) -> None:
    page.click("#ask")
    finished(page, "done")


def test_a_ct_series_shows_the_answer_and_a_slice_slider(page, medlens_server, tmp_path):
    files = ct_files(tmp_path)
    open_page(page, medlens_server)
    disclaimer = page.locator("header .disclaimer")
    assert disclaimer.is_visible() and "Research use only" in disclaimer.inner_text()
    assert "not for clinical decisions" in disclaimer.inner_text()
    page.set_input_files("#files", [str(f) for f in files])
    assert page.inner_text("#picked").startswith("5 files")
    page.fill("#question", "Is there a nodule?")
    page.fill("#max-tokens", "6")
    ask_and_wait(page)

    assert page.inner_text("#answer").strip()
    assert page.is_visible("#test-model")  # test-tiny says so
    slider = page.locator("#slice")
    assert slider.is_visible()
    n_images = int(slider.get_attribute("max"))
    envelope = page.text_content("#envelope")  # inside the closed <details>
    assert f'"n_images": {n_images}' in envelope and '"data_url"' not in envelope
    assert re.fullmatch(r"slice \d+ of \d+ \(\d+ of \d+\)", page.inner_text("#image-label"))
    first = page.inner_text("#image-label")
    page.focus("#figure")
    page.keyboard.press("ArrowRight")
    assert page.inner_text("#image-label") != first
    page.keyboard.press("Home")
    assert page.inner_text("#image-label").endswith(f"(1 of {n_images})")
    assert page.locator("#slice").input_value() == "1"
    assert page.locator("#boxes rect").count() == 0
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(tmp_path / "ct.png"), full_page=True)
    assert (tmp_path / "ct.png").stat().st_size > 10_000


def test_localize_draws_the_boxes_on_the_image_the_model_saw(page, medlens_server, tmp_path):
    png = cxr_png(tmp_path / "cxr.png")
    open_page(page, medlens_server)
    page.select_option("#task", "localize")
    assert "default question" in page.inner_text("#question-help")
    page.set_input_files("#files", str(png))
    ask_and_wait(page)

    expected = json.loads(LOCALIZE_ANSWER)
    rects = page.locator("#boxes rect")
    assert rects.count() == len(expected)
    for n, box in enumerate(expected):
        y0, x0, y1, x1 = box["box_2d"]
        geometry = [rects.nth(n).get_attribute(a) for a in ("x", "y", "width", "height")]
        assert geometry == [str(x0), str(y0), str(x1 - x0), str(y1 - y0)]
    labels = page.locator("#boxes text").all_text_contents()
    assert labels == [b["label"] for b in expected]
    assert page.locator("#box-list li").count() == len(expected)
    # the overlay covers the image exactly: the square the model saw (160 x 120 padded to 160 x 160)
    image, overlay = page.locator("#image").bounding_box(), page.locator("#boxes").bounding_box()
    assert abs(image["width"] - overlay["width"]) < 1 and abs(image["height"] - overlay["height"]) < 1
    assert abs(image["width"] - image["height"]) < 1
    assert page.locator("#slider-row").is_hidden()
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(tmp_path / "localize.png"), full_page=True)


def test_the_key_is_asked_for_kept_in_the_tab_and_sent(page, keyed_server, tmp_path):
    page.goto(keyed_server.url + "/")
    finished(page, "error")
    assert "API key" in page.inner_text("#status")
    assert page.locator("#task option").count() == 1
    page.fill("#api-key", "wrong")
    page.dispatch_event("#api-key", "change")
    expect(page.locator("#jobs-status")).to_contain_text("401")
    page.fill("#api-key", TEST_KEY)
    page.dispatch_event("#api-key", "change")
    tasks_loaded(page)
    assert page.evaluate("sessionStorage.getItem('medlens.apiKey')") == TEST_KEY
    page.reload()
    tasks_loaded(page)  # the key survived the reload
    assert page.input_value("#api-key") == TEST_KEY

    with keyed_server.client() as client:
        job_id = client.submit(cxr_png(tmp_path / "cxr.png"), question="Any effusion?", max_new_tokens=3)
        client.wait(job_id, timeout=60, poll=0.1)
    page.click("#refresh-jobs")
    expect(page.locator("#jobs tbody")).to_contain_text(job_id[:12])
    assert "succeeded" in page.inner_text("#jobs tbody")


def test_dropped_files_are_picked_and_errors_are_shown(page, medlens_server):
    open_page(page, medlens_server)
    page.evaluate(
        """() => {
        const data = new DataTransfer();
        data.items.add(new File(["not an image at all"], "broken.dcm"));
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true}));
        }"""
    )
    expect(page.locator("#picked")).to_contain_text("1 file (")
    page.fill("#question", "What is this?")
    page.click("#ask")
    finished(page, "error")
    status = page.inner_text("#status")
    assert "broken.dcm" in status and "HTTP 400" in status
    assert page.is_enabled("#ask")


def test_every_control_has_a_label_and_the_status_is_announced(page, medlens_server):
    open_page(page, medlens_server)
    unlabelled = page.evaluate(
        """() => Array.from(document.querySelectorAll('input, select, textarea'))
            .filter((el) => !el.labels || el.labels.length === 0).map((el) => el.id)"""
    )
    assert unlabelled == []
    assert page.get_attribute("#status", "aria-live") == "polite"
    page.keyboard.press("Tab")
    focused = page.evaluate("document.activeElement.id")
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert focused and outline != "none"


def test_compare_sends_one_input_per_picked_file_and_shows_a_strip(page, medlens_server, tmp_path):
    prior, current = cxr_png(tmp_path / "prior.png"), cxr_png(tmp_path / "current.png")
    open_page(page, medlens_server)
    page.select_option("#task", "compare")
    assert "Each top-level file or folder you pick is one input" in page.inner_text("#task-help")
    page.set_input_files("#files", [str(prior), str(current)])
    page.fill("#max-tokens", "4")
    ask_and_wait(page)
    envelope = json.loads(page.text_content("#envelope"))
    assert [i["file"] for i in envelope["inputs"]] == ["prior.png", "current.png"]
    thumbs = page.locator("#strip button")
    assert thumbs.count() == envelope["n_images"] >= 2
    thumbs.nth(1).click()
    assert thumbs.nth(1).get_attribute("aria-pressed") == "true"
    assert page.inner_text("#image-label").endswith(f"(2 of {envelope['n_images']})")
