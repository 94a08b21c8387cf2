"""lab-extract: PDF pages rendered to images, page images accepted, typed errors for bad files, the parser on
realistic model outputs, page combination, CSV, and the command line end to end."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scripted import ScriptedBackend

from medlens.errors import CorruptFileError, MedlensError, NotFoundError, TooLargeError, UnsupportedInputError
from medlens.io.pdf import read_pages, render_pdf
from medlens.tasks import TaskOptions, get_task
from medlens.tasks.base import Parsed
from medlens.tasks.lab import EXTRACTION_PROMPT, FIELDS, LabExtractTask, LabTest, normalise_time, to_csv
from medlens.tasks.runner import parse_output, run_task

MM_PER_INCH = 25.4
TITLE = "Riverside Clinical Laboratory"
# (page orientation, table rows); the first row is the header
PAGES = [
    ("P", [("Test", "Result", "Unit", "Reference range"), ("Haemoglobin", "13.5", "g/dL", "12.0-16.0"),
           ("WBC count", "7.2", "10^9/L", "4.0-11.0"), ("Platelets", "250", "10^9/L", "150-400")]),
    ("P", [("Test", "Result", "Unit", "Reference range"), ("Glucose, fasting", "5.1", "mmol/L", "3.9-5.5"),
           ("Creatinine", "88", "umol/L", "60-110")]),
    ("L", [("Test", "Result", "Unit", "Reference range"), ("TSH", "2.1", "mIU/L", "0.4-4.0")]),
]  # fmt: skip
COL_WIDTHS = (70, 30, 30, 50)


def write_report(path: Path, pages: Sequence = PAGES, encrypt: bool = False) -> list[tuple[float, float]]:
    """A lab report: a title, a collection line and a ruled table per page; returns each table's (top, bottom)
    in mm."""
    from fpdf import FPDF
    from fpdf.fonts import FontFace

    pdf = FPDF(format="A4")
    if encrypt:
        pdf.set_encryption(owner_password="owner", user_password="secret")
    boxes = []
    for orientation, rows in pages:
        pdf.add_page(orientation=orientation)
        pdf.set_font("helvetica", style="B", size=16)
        pdf.cell(text=TITLE, new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("helvetica", size=10)
        pdf.cell(text="Specimen: Serum    Collected: 05-03-2024 08:30:00", new_x="LMARGIN", new_y="NEXT")
        pdf.ln(8)
        top = pdf.get_y()
        bold = FontFace(emphasis="BOLD")
        with pdf.table(col_widths=COL_WIDTHS, width=sum(COL_WIDTHS), align="LEFT", headings_style=bold) as table:
            for row in rows:
                cells = table.row()
                for text in row:
                    cells.cell(text)
        boxes.append((top, pdf.get_y()))
    pdf.output(str(path))
    return boxes


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, list[tuple[float, float]]]:
    path = tmp_path_factory.mktemp("lab") / "report.pdf"
    return path, write_report(path)


# ----------------------------------------------------------------------------------------------- rendering


def _px(mm: float, dpi: int) -> int:
    return round(mm / MM_PER_INCH * dpi)


def _line_rows(region: np.ndarray) -> int:
    """Horizontal rules in a region: runs of pixel rows that are dark across most of the width."""
    ruled = (region.mean(axis=2) < 160).mean(axis=1) > 0.9
    return int(np.count_nonzero(ruled[1:] & ~ruled[:-1]) + ruled[0])


@pytest.mark.parametrize("dpi", [72, 150])
def test_pdf_pages_are_rendered_at_the_requested_dpi(report, dpi):
    path, _ = report
    pages = render_pdf(path, dpi=dpi)
    assert len(pages) == 3
    for page, (orientation, _) in zip(pages, PAGES, strict=True):
        width_mm, height_mm = (210, 297) if orientation == "P" else (297, 210)
        assert page.dtype == np.uint8 and page.ndim == 3 and page.shape[2] == 3
        assert abs(page.shape[0] - height_mm / MM_PER_INCH * dpi) <= 1
        assert abs(page.shape[1] - width_mm / MM_PER_INCH * dpi) <= 1
        assert (page[:5, :5] == 255).all()  # white paper


def test_the_table_is_where_the_pdf_put_it(report):
    path, boxes = report
    dpi = 150
    pages = render_pdf(path, dpi=dpi)
    left, right = _px(10, dpi), _px(10 + sum(COL_WIDTHS), dpi)
    for page, (top, bottom), (_, rows) in zip(pages, boxes, PAGES, strict=True):
        table = page[_px(top, dpi) - 2 : _px(bottom, dpi) + 3, left - 2 : right + 3]
        dark = (table.mean(axis=2) < 128).mean()
        assert 0.02 < dark < 0.5  # text and rules, not a filled block
        assert _line_rows(table) == len(rows) + 1  # a rule above every row and one below the last
        below = page[_px(bottom, dpi) + 20 : _px(bottom, dpi) + 200, left:right]
        assert (below.mean(axis=2) < 128).mean() == 0  # blank paper under the table
        title = page[_px(10, dpi) : _px(top, dpi), left:right]
        assert (title.mean(axis=2) < 128).mean() > 0.005  # the title and collection lines
        assert len(np.unique(page[..., 0])) > 2 and np.array_equal(page[..., 0], page[..., 2])  # grey anti-aliasing
    assert not np.array_equal(pages[0], pages[1])


def scanned(page: np.ndarray, seed: int = 0) -> Image.Image:
    """A page as a scanner would give it: slightly rotated, noisy."""
    image = Image.fromarray(page).rotate(1.5, resample=Image.Resampling.BILINEAR, expand=True, fillcolor="white")
    noise = np.random.default_rng(seed).normal(0, 12, (image.height, image.width, 1))
    noisy = np.asarray(image, dtype=np.float32) + noise
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@pytest.mark.parametrize(("name", "mode"), [("scan.jpg", "RGB"), ("scan.png", "RGB"), ("scan-grey.png", "L")])
def test_a_scanned_page_image_is_accepted(report, tmp_path, name, mode):
    path, _ = report
    image = scanned(render_pdf(path, dpi=100)[0]).convert(mode)
    image.save(tmp_path / name, **({"quality": 70} if name.endswith(".jpg") else {}))
    pages = read_pages(tmp_path / name)
    assert len(pages) == 1
    page = pages[0]
    assert page.shape == (image.height, image.width, 3) and page.dtype == np.uint8
    if mode == "L":
        assert np.array_equal(page[..., 0], np.asarray(image)) and np.array_equal(page[..., 1], page[..., 2])
    build = LabExtractTask().build([tmp_path / name], "", TaskOptions())
    assert len(build.requests) == 1 and build.n_images == 1
    assert build.details == {"source": "image", "pages": 1, "dpi": None}


@pytest.fixture
def bad_files(report, tmp_path) -> dict[str, Path]:
    path, _ = report
    data = path.read_bytes()
    files = {
        "text": tmp_path / "notes.pdf",
        "empty": tmp_path / "empty.pdf",
        "truncated": tmp_path / "truncated.pdf",
        "no-trailer": tmp_path / "no-trailer.pdf",
        "encrypted": tmp_path / "locked.pdf",
        "docx": tmp_path / "report.docx",
    }
    files["text"].write_text("Haemoglobin 13.5 g/dL\n")
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["no-trailer"].write_bytes(data[:-10])
    write_report(files["encrypted"], PAGES[:1], encrypt=True)
    files["docx"].write_bytes(b"PK\x03\x04 not a document medlens reads")
    return files


BAD = [
    ("text", UnsupportedInputError, "not a PDF"),
    ("empty", CorruptFileError, "empty file"),
    ("truncated", CorruptFileError, "truncated PDF"),
    ("no-trailer", CorruptFileError, "truncated PDF"),
    ("encrypted", UnsupportedInputError, "encrypted"),
    ("docx", UnsupportedInputError, "not a PDF"),
]


@pytest.mark.parametrize(("kind", "error", "needle"), BAD)
def test_bad_files_raise_typed_errors_naming_the_file(bad_files, kind, error, needle):
    with pytest.raises(error, match=needle) as info:
        read_pages(bad_files[kind])
    assert info.value.path == str(bad_files[kind])


@pytest.mark.parametrize(("kind", "error", "needle"), BAD)
def test_bad_files_exit_2_through_the_cli(bad_files, cli, kind, error, needle):
    code, out, err = cli("ask", bad_files[kind], "--task", "lab-extract", "-q")
    assert code == 2 and out == ""
    assert err.startswith("medlens: error: ") and err.count("\n") == 1
    assert needle in err and str(bad_files[kind]) in err


def test_limits_pages_and_pixels(report, monkeypatch, tmp_path):
    path, _ = report
    with pytest.raises(TooLargeError, match="3 pages; at most 2"):
        render_pdf(path, max_pages=2)
    monkeypatch.setenv("MEDLENS_MAX_DECODED_MB", "10")  # one A4 page at 300 dpi is ~26 MB
    with pytest.raises(TooLargeError, match="MB decoded"):
        render_pdf(path, dpi=300)
    assert len(render_pdf(path, dpi=72)) == 3  # 3 x 1.5 MB fit
    with pytest.raises(NotFoundError):
        read_pages(tmp_path / "missing.pdf")
    with pytest.raises(MedlensError, match="dpi"):
        render_pdf(path, dpi=0)


# ------------------------------------------------------------------------------------------------- parser


def row(*values: str | None, page: int = 1) -> dict:
    """A payload row from the eight fields in order (missing trailing ones are None)."""
    padded = list(values) + [None] * (len(FIELDS) - len(values))
    return {**dict(zip(FIELDS, padded, strict=True)), "page": page}


T = "05-03-2024 08:30:00"
HB = row("Haemoglobin", "13.5", "g/dL", "12.0-16.0", "Complete blood count", "Photometry", "Whole blood", T)
WBC = row("WBC count", "7.2", "10^9/L", "4.0-11.0", "Complete blood count", "Impedance", "Whole blood", T)
FULL = (
    '[{"name": "Haemoglobin", "result": "13.5", "unit": "g/dL", "range": "12.0-16.0", "panel": "Complete blood '
    'count", "method": "Photometry", "specimen": "Whole blood", "sample_collection_time": "05-03-2024 08:30:00"},\n'
    ' {"name": "WBC count", "result": "7.2", "unit": "10^9/L", "range": "4.0-11.0", "panel": "Complete blood '
    'count", "method": "Impedance", "specimen": "Whole blood", "sample_collection_time": "05-03-2024 08:30:00"}]'
)

CORPUS = [
    ("fenced", f"```json\n{FULL}\n```", [HB, WBC], []),
    ("unfenced", FULL, [HB, WBC], []),
    ("prose", f"Here are the results from the report:\n\n{FULL}\n\nLet me know if you need more.", [HB, WBC], []),
    (
        "thinking",
        "<unused94>thought\nThe table has [4 columns]; the header {Test, Result} ...<unused95>" + FULL,
        [HB, WBC],
        [],
    ),
    (
        "truncated-last-row",
        FULL[: FULL.index('"Impedance"')],
        [HB],
        ["malformed and has been repaired", "cut off; the unfinished last entry was dropped"],
    ),
    (
        "key-order-and-case",
        '[{"Sample_Collection_Time": "05-03-2024 08:30:00", "Unit": "g/dL", "RESULT": "13.5", "Name": "Haemoglobin", '
        '"Specimen": "Whole blood", "Range": "12.0-16.0", "Method": "Photometry", "Panel": "Complete blood count"}]',
        [HB],
        [],
    ),
    (
        "synonyms",
        '[{"Test Name": "Sodium", "Value": "140", "Units": "mmol/L", "Reference Range": "135-145", '
        '"Collection Time": "2024-03-05T08:30", "Sample Type": "Serum", "Methodology": "ISE"},'
        ' {"test": "Potassium", "value": "4.1", "uom": "mmol/L", "ref_range": "3.5-5.1",'
        ' "collected": "2024-03-05 08:30:15"},'
        ' {"analyte": "Chloride", "result": "101", "normal_range": "98-107", "Bio. Ref. Interval": "ignored twin"}]',
        [
            row("Sodium", "140", "mmol/L", "135-145", None, "ISE", "Serum", T),
            row("Potassium", "4.1", "mmol/L", "3.5-5.1", None, None, None, "05-03-2024 08:30:15"),
            row("Chloride", "101", None, "98-107"),
        ],
        [],
    ),
    (
        "extra-keys",
        '[{"name": "CRP", "result": "12", "unit": "mg/L", "range": "<5", "flag": "H", "comment": "repeat advised"}]',
        [row("CRP", "12", "mg/L", "<5")],
        ["ignored keys: comment, flag"],
    ),
    (
        "numbers",
        '[{"name": "Glucose", "result": 5.1, "unit": "mmol/L", "range": [3.9, 5.5]},'
        ' {"name": "Platelets", "result": 250, "range": {"low": 150, "high": 400}},'
        ' {"name": "Urine protein", "result": "Negative", "range": null, "unit": ""}]',
        [
            row("Glucose", "5.1", "mmol/L", "3.9-5.5"),
            row("Platelets", "250", None, "150-400"),
            row("Urine protein", "Negative"),
        ],
        [],
    ),
    (
        "wrapped-dict",
        'Extracted:\n{"patient": "redacted", "specimen": "Whole blood",'
        ' "sample_collection_time": "05-03-2024 08:30:00",'
        ' "panel": "Complete blood count", "tests": [{"name": "Haemoglobin", "result": "13.5", "unit": "g/dL", '
        '"range": "12.0-16.0", "method": "Photometry"}, {"name": "WBC count", "result": "7.2", "unit": "10^9/L", '
        '"range": "4.0-11.0", "method": "Impedance"}]}',
        [HB, WBC],
        ["ignored keys: patient"],
    ),
    (
        "lab-tests-key",
        '{"lab_tests": [{"name": "HbA1c", "result": "6.1", "unit": "%", "range": "4.0-5.6"}]}',
        [row("HbA1c", "6.1", "%", "4.0-5.6")],
        [],
    ),
    (
        "panel-groups",
        '{"results": [{"panel": "Liver function", "specimen": "Serum", "tests": [{"name": "ALT", "result": "30"}]},'
        ' {"name": "Lipids", "tests": [{"name": "LDL", "result": "2.9", "specimen": "Plasma"}]}]}',
        [
            row("ALT", "30", None, None, "Liver function", None, "Serum"),
            row("LDL", "2.9", None, None, "Lipids", None, "Plasma"),
        ],
        [],
    ),
    (
        "single-object",
        '{"name": "Ferritin", "result": "45", "unit": "ug/L", "range": "30-400", "specimen": "Serum"}',
        [row("Ferritin", "45", "ug/L", "30-400", None, None, "Serum")],
        [],
    ),
    (
        "python-style",
        "[{'name': 'Hb', 'result': 13.5, 'unit': 'g/dL',},]",
        [row("Hb", "13.5", "g/dL")],
        ["malformed and has been repaired"],
    ),
    (
        "unnamed-and-repeated",
        '[{"name": "Hb", "result": "13.5"}, {"result": "99"}, {"name": "  "}, {"name": "Hb", "result": "13.5"}]',
        [row("Hb", "13.5")],
        ["dropped 2 entries without a test name", "removed 1 repeated row(s)"],
    ),
    (
        "times",
        '[{"name": "A", "sample_collection_time": "05/03/2024 08:30:00"}, {"name": "B", "collected": "2024-03-05"},'
        ' {"name": "C", "collection_time": "05-03-2024 08:30"},'
        ' {"name": "D", "collection_time": "31-02-2024 08:30:00"}]',
        [
            row("A", *[None] * 6, "05/03/2024 08:30:00"),
            row("B", *[None] * 6, "2024-03-05"),
            row("C", *[None] * 6, T),
            row("D", *[None] * 6, "31-02-2024 08:30:00"),
        ],
        ["'05/03/2024 08:30:00' is not DD-MM-YYYY HH:MM:SS", "'2024-03-05' is not", "'31-02-2024 08:30:00' is not"],
    ),
    ("empty-page", "[]", [], []),
]
FAILURES = [
    ("garbage", "tionnev need with2d need need", "no JSON found"),
    ("prose-only", "The report shows a normal full blood count.", "no JSON found"),
    ("boxes", '[{"box_2d": [120, 340, 560, 780], "label": "left lung"}]', "no test with a name"),
    ("list-of-strings", '["Haemoglobin 13.5 g/dL", "WBC 7.2"]', "no test with a name"),
    ("cut-in-first-row", '[{"name": "Haemoglobin", "res', "cut off before its first test"),
    ("unfinished-thinking", "<unused94>thought\nThe page shows [Hb 13.5]", "ended inside the thinking trace"),
]


@pytest.mark.parametrize(("text", "rows", "warnings"), [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_parser_corpus(text, rows, warnings):
    parsed = parse_output(LabExtractTask(), text, {"page": 1})
    assert parsed.error is None
    assert parsed.payload == {"tests": rows, "pages": 1}
    assert parsed.final_answer == f"{len(rows)} test{'' if len(rows) == 1 else 's'}"
    for needle in warnings:
        assert any(needle in w for w in parsed.warnings), (needle, parsed.warnings)
    if not warnings:
        assert parsed.warnings == []


@pytest.mark.parametrize(("text", "needle"), [c[1:] for c in FAILURES], ids=[c[0] for c in FAILURES])
def test_parser_failures_are_reported_not_raised(text, needle):
    parsed = parse_output(LabExtractTask(), text, {"page": 1})
    assert parsed.payload is None and needle in parsed.error


def test_page_number_and_time_normalisation():
    parsed = parse_output(LabExtractTask(), '[{"name": "Hb"}]', {"page": 4})
    assert parsed.payload["tests"][0]["page"] == 4
    assert normalise_time("2024-03-05T08:30:00.123+01:00") == T
    assert normalise_time("2024-03-05 08:30Z") == T
    assert normalise_time("03/05/2024 08:30") == "03/05/2024 08:30"  # day or month first: left as written
    assert LabTest(name="x", sample_collection_time="2024-03-05T08:30").sample_collection_time == T
    assert not LabTest(name="x", sample_collection_time="5 March 2024").time_is_valid


# ------------------------------------------------------------------------------------------ combine, csv


def _parsed(text: str, page: int) -> Parsed:
    return parse_output(LabExtractTask(), text, {"page": page})


def test_combine_merges_pages_in_order_and_reports_failed_pages():
    task = LabExtractTask()
    pages = [
        _parsed(FULL, 1),
        _parsed("I cannot read this page.", 2),
        _parsed('[{"name": "TSH", "result": "2.1", "extra": 1}, ' + FULL[1:], 3),
    ]
    combined = task.combine(pages)
    assert combined.error is None
    assert combined.payload == {"tests": [HB, WBC, row("TSH", "2.1", page=3)], "pages": 3}
    assert combined.final_answer == "3 tests"
    assert combined.warnings == [
        "page 3: ignored keys: extra",
        "could not parse page 2: no JSON found in the model output",
        "removed 2 row(s) repeated across pages",
    ]
    failed = task.combine([_parsed("noise", 1), _parsed("more noise", 2)])
    assert failed.payload is None
    assert failed.error == (
        "no page could be parsed (page 1: no JSON found in the model output; page 2: no JSON found in the model output)"
    )
    single = _parsed(FULL, 1)
    assert task.combine([single]) is single


CSV = (
    "page,name,result,unit,range,panel,method,specimen,sample_collection_time\n"
    "1,Haemoglobin,13.5,g/dL,12.0-16.0,Complete blood count,Photometry,Whole blood,05-03-2024 08:30:00\n"
    '2,"Glucose, fasting",<5.6,mmol/L,,,,"Plasma ""fluoride""",\n'
)


def test_csv_is_exact():
    task = LabExtractTask()
    payload = {"tests": [HB, row("Glucose, fasting", "<5.6", "mmol/L", None, None, None, 'Plasma "fluoride"', page=2)]}
    assert task.render(payload, "csv") == CSV == to_csv(payload)
    assert task.render({}, "csv") == CSV.splitlines()[0] + "\n"
    assert task.render(payload, "xml") is None


# ------------------------------------------------------------------------------------------ end to end


def test_requests_put_each_page_image_before_the_prompt(report):
    path, _ = report
    backend = ScriptedBackend(FULL, "no table here", '```json\n[{"name": "TSH", "result": "2.1"}]\n```')
    options = TaskOptions(dpi=72)
    envelope = run_task(get_task("lab-extract"), [path], "Leave out the units.", backend, options)
    assert len(backend.requests) == 3
    for request, shape in zip(backend.requests, [(842, 596), (842, 596), (596, 842)], strict=True):
        (turn,) = request.messages
        image, text = turn["content"]
        assert image["type"] == "image" and image["image"].shape == (*shape, 3)
        assert text == {"type": "text", "text": f"{EXTRACTION_PROMPT}\n\nAdditional instructions: Leave out the units."}
    assert envelope.task == "lab-extract" and envelope.n_images == 3
    assert envelope.details == {"source": "pdf", "pages": 3, "dpi": 72}
    assert envelope.payload == {"tests": [HB, WBC, row("TSH", "2.1", page=3)], "pages": 3}
    assert envelope.parse_error is None
    assert "could not parse page 2: no JSON found in the model output" in envelope.warnings


def test_prompt_and_thinking_options(report):
    path, _ = report
    build = LabExtractTask().build([path], "", TaskOptions(dpi=50, thinking=True, instruction="Only haematology."))
    texts = [r.messages[0]["content"][-1]["text"] for r in build.requests]
    assert texts == ["SYSTEM INSTRUCTION: think silently if needed.\nOnly haematology."] * 3
    assert [r.context for r in build.requests] == [{"page": 1}, {"page": 2}, {"page": 3}]
    plain = LabExtractTask().build([path], "", TaskOptions(dpi=50)).requests[0].messages[0]["content"][-1]["text"]
    assert plain == EXTRACTION_PROMPT and "DD-MM-YYYY HH:MM:SS" in plain


def test_cli_ask_with_test_tiny_reports_the_parse_failure(report, cli):
    path, _ = report
    code, out, err = cli("ask", path, "--task", "lab-extract", "--model", "test-tiny", "--dpi", "72", "-q")
    assert code == 0, err
    result = json.loads(out)
    assert result["task"] == "lab-extract" and result["untrained_test_model"] is True
    assert result["n_images"] == 3 and len(result["raw_output"]) == 3 and result["recipe"] is None
    assert result["details"] == {"source": "pdf", "pages": 3, "dpi": 72}
    assert result["inputs"][0]["file"] == str(path) and len(result["inputs"][0]["sha256"]) == 64
    # test-tiny writes noise: every page fails to parse, which is reported, not raised
    assert result["payload"] is None and result["parse_error"].startswith("no page could be parsed (page 1: ")
    assert f"could not parse the model output: {result['parse_error']}" in result["warnings"]


def test_cli_csv_with_nothing_parsed_exits_2(report, cli):
    path, _ = report
    code, out, err = cli("ask", path, "--task", "lab-extract", "--dpi", "72", "--format", "csv", "-q")
    assert code == 2
    assert out == CSV.splitlines()[0] + "\n"  # the header row, then the error on stderr
    assert err.startswith("medlens: error: could not parse the model output: no page could be parsed")


def test_cli_parse_from_stdin(cli, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(f"```json\n{FULL}\n```"))
    code, out, err = cli("parse", "lab-extract")
    assert code == 0, err
    result = json.loads(out)
    assert result["task"] == "lab-extract" and result["parse_error"] is None
    assert result["payload"] == {"tests": [HB, WBC], "pages": 1} and result["final_answer"] == "2 tests"

    monkeypatch.setattr("sys.stdin", io.StringIO(FULL))
    code, out, _ = cli("parse", "lab-extract", "--format", "csv")
    assert code == 0 and out == CSV.splitlines(keepends=True)[0] + CSV.splitlines(keepends=True)[1] + (
        "1,WBC count,7.2,10^9/L,4.0-11.0,Complete blood count,Impedance,Whole blood,05-03-2024 08:30:00\n"
    )

    monkeypatch.setattr("sys.stdin", io.StringIO("not json at all"))
    code, out, _ = cli("parse", "lab-extract")
    assert code == 0 and json.loads(out)["parse_error"] == "no JSON found in the model output"

    monkeypatch.setattr("sys.stdin", io.StringIO("not json at all"))
    code, _, err = cli("parse", "lab-extract", "--format", "csv")
    assert code == 2 and "no JSON found in the model output" in err
