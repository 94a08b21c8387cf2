"""The leakage guard (``medlens overlap`` / ``check_overlap``): planted duplicates are found, unrelated items are
not, the cleaned split holds none of them, and the command line exits 2 above ``--max-overlap``."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medlens.errors import CorruptFileError, InputError, MedlensError, NotFoundError
from medlens.finetune.manifest import TrainRow, read_manifest
from medlens.finetune.overlap import check_overlap
from medlens.finetune.overlap_images import HammingIndex
from medlens.finetune.overlap_text import normalise, text_keys

WORDS = tuple(f"term{i}" for i in range(60))  # a made-up vocabulary


def smooth_image(seed: int, size: int = 256) -> np.ndarray:
    """A grey image of smooth random structure (no patient data): a blurred, seeded noise field."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(np.random.default_rng(seed).normal(size=(size, size)), 12)
    return ((field - field.min()) / np.ptp(field) * 255).astype(np.uint8)


def report(seed: int, words: int = 40) -> str:
    """A synthetic 'report' of random words in sentences."""
    rng = random.Random(seed)
    chosen = [rng.choice(WORDS) for _ in range(words)]
    return ". ".join(" ".join(chosen[i : i + 8]).capitalize() for i in range(0, words, 8)) + "."


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def splits(tmp_path: Path) -> tuple[Path, Path]:
    """A training and a held-out manifest with three planted duplicates and one clean held-out row."""
    train_dir, held_dir = tmp_path / "train", tmp_path / "held"
    train_dir.mkdir()
    held_dir.mkdir()
    for seed in range(4):
        Image.fromarray(smooth_image(seed)).save(train_dir / f"img{seed}.png")
    (held_dir / "renamed.png").write_bytes((train_dir / "img0.png").read_bytes())  # exact copy, other name
    small = Image.fromarray(smooth_image(1)).resize((128, 128), Image.BILINEAR)  # resized and re-encoded
    small.save(held_dir / "small.jpg", quality=75)
    Image.fromarray(smooth_image(10)).save(held_dir / "other1.png")
    Image.fromarray(smooth_image(11)).save(held_dir / "other2.png")
    words = report(7).split(" ")
    words[20] = "zeppelin"  # one word changed
    train = [
        {"id": "t-copy", "inputs": ["img0.png"], "question": "Describe the image.", "answer": report(1)},
        {"id": "t-resized", "inputs": ["img1.png"], "question": "Describe the image.", "answer": report(2)},
        {"id": "t-report", "inputs": ["img2.png"], "question": "Describe the image.", "answer": report(7)},
        {"id": "t-clean", "inputs": ["img3.png"], "question": "Describe the image.", "answer": report(4)},
    ]
    held = [
        {"id": "h-copy", "inputs": ["renamed.png"], "question": "Describe the image.", "answer": report(11)},
        {"id": "h-resized", "inputs": ["small.jpg"], "question": "Describe the image.", "answer": report(12)},
        {"id": "h-report", "inputs": ["other1.png"], "question": "Describe the image.", "answer": " ".join(words)},
        {"id": "h-clean", "inputs": ["other2.png"], "question": "Describe the image.", "answer": report(14)},
    ]
    return write_jsonl(train_dir / "train.jsonl", train), write_jsonl(held_dir / "held.jsonl", held)


def pairs(matches) -> set[tuple[str, str]]:
    return {(m.train_id, m.held_out_id) for m in matches}


def test_planted_duplicates_are_found_and_unrelated_items_are_not(splits):
    report_ = check_overlap(read_manifest(splits[0]), read_manifest(splits[1]))
    assert pairs(report_.exact) == {("t-copy", "h-copy")}
    assert "img0.png == renamed.png" in report_.exact[0].detail
    near = {(m.train_id, m.held_out_id): m.score for m in report_.near_images}
    assert set(near) == {("t-copy", "h-copy"), ("t-resized", "h-resized")}
    assert near[("t-copy", "h-copy")] == 0 and near[("t-resized", "h-resized")] <= 10
    assert pairs(report_.text) == {("t-report", "h-report")}
    assert 0.2 < report_.text[0].score < 1.0  # the 13-grams around the changed word are lost
    assert report_.overlapping_held_out_ids == ["h-copy", "h-report", "h-resized"]
    assert report_.overlapping_train_ids == ["t-copy", "t-report", "t-resized"]
    assert report_.fraction == pytest.approx(0.75)
    assert "3 of 4 held-out rows (75.0%)" in report_.summary()
    assert report_.to_json()["disclaimer"]


def test_cleaned_split_holds_none_of_them(splits, tmp_path):
    train, held = read_manifest(splits[0]), read_manifest(splits[1])
    out = check_overlap(train, held).write_clean(train, tmp_path / "clean" / "train.jsonl")
    clean = read_manifest(out)  # inputs rewritten relative to the new folder, and they exist
    assert [row.id for row in clean] == ["t-clean"]
    assert clean[0].inputs == train[3].inputs
    assert check_overlap(clean, held).fraction == 0.0


def test_cli_lists_pairs_writes_clean_and_exits_2_above_the_limit(splits, tmp_path, cli):
    code, out, err = cli("overlap", *splits, "--max-overlap", "0.8", "--write-clean", tmp_path / "c.jsonl")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert any(line.startswith("exact\tt-copy\th-copy\t1") for line in lines)
    assert lines[-1].startswith("3 of 4 held-out rows (75.0%)") and "research use only" in lines[-1].lower()
    assert [row.id for row in read_manifest(tmp_path / "c.jsonl")] == ["t-clean"]
    code, out, err = cli("overlap", *splits, "--json", "--max-overlap", "0.5")
    assert code == 2
    assert json.loads(out)["overlapping_held_out_ids"] == ["h-copy", "h-report", "h-resized"]
    assert len(err.strip().splitlines()) == 1 and "more than --max-overlap 0.5" in err and "held.jsonl" in err


def test_unreadable_manifests_and_inputs_are_typed_errors(splits, tmp_path, cli):
    code, _, err = cli("overlap", tmp_path / "missing.jsonl", splits[1])
    assert code == 2 and "missing.jsonl" in err and len(err.strip().splitlines()) == 1
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    bad = [TrainRow("bad", [broken], answer="x", base=tmp_path)]
    with pytest.raises(InputError) as caught:
        check_overlap(bad, read_manifest(splits[1]))
    assert "broken.png" in str(caught.value) and "row 'bad'" in str(caught.value)
    (tmp_path / "notjson.jsonl").write_text("{not json\n")
    with pytest.raises(CorruptFileError, match=r"notjson\.jsonl:1"):
        read_manifest(tmp_path / "notjson.jsonl")
    gone = [TrainRow("gone", [tmp_path / "gone.png"], answer="x", base=tmp_path)]
    with pytest.raises(NotFoundError, match=r"gone\.png"):
        check_overlap(gone, [])
    with pytest.raises(MedlensError, match="image_hash_distance"):
        check_overlap([], [], image_hash_distance=64)


def test_medsiglip_cosine_path_with_the_tiny_model(splits):
    """test-tiny-siglip is random: a copy and a resized copy score >= 0.999, unrelated images below (pinned:
    0.62-0.98 on these images)."""
    train, held = read_manifest(splits[0]), read_manifest(splits[1])
    report_ = check_overlap(train, held, siglip_model="test-tiny-siglip", siglip_threshold=0.999, device="cpu")
    embedded = {(m.train_id, m.held_out_id): m.score for m in report_.near_images if m.kind == "embedding"}
    assert set(embedded) == {("t-copy", "h-copy"), ("t-resized", "h-resized")}
    assert embedded[("t-copy", "h-copy")] == pytest.approx(1.0, abs=1e-4)
    assert report_.settings["siglip_model"] == "test-tiny-siglip"


def test_text_rule_normalises_ignores_boilerplate_and_compares_short_texts_whole(tmp_path):
    assert normalise("The LUNGS, are clear!\n(no-effusion)") == ["the", "lungs", "are", "clear", "no", "effusion"]
    assert text_keys("Yes.") == text_keys("yes") and text_keys("yes", whole=False) == set()
    assert len(text_keys(" ".join(WORDS[:15]))) == 3  # 15 words: three 13-grams
    stock = "the heart is normal in size the mediastinum is unremarkable the lungs are clear"
    train = [TrainRow(f"t{i}", [], question=f"{stock} {report(i, 20)}", answer="none") for i in range(12)]
    held = [
        TrainRow("h-stock", [], question=f"{stock} {report(99, 20)}", answer="none"),  # only the stock sentence
        TrainRow("h-short", [], question="is this normal", answer="none"),
    ]
    train.append(TrainRow("t-short", [], question="Is this normal?", answer="None."))
    Image.fromarray(smooth_image(5)).save(tmp_path / "x.png")
    train.append(TrainRow("t-short-image", [tmp_path / "x.png"], question="Is this normal?", answer="None."))
    found = check_overlap(train, held)
    assert pairs(found.text) == {("t-short", "h-short")}  # text-only short rows compared whole
    assert found.text[0].detail == "same short text"
    strict = check_overlap(train[:2], held[:1])  # 2 training rows: the stock sentence is not boilerplate
    assert pairs(strict.text) == {("t0", "h-stock"), ("t1", "h-stock")}
    assert check_overlap(train[:2], held[:1], text_min_share=0.5).text == []


def test_hamming_index_finds_exactly_the_hashes_within_the_distance():
    rng = np.random.default_rng(0)
    values = [int(v) for v in rng.integers(0, 2**63, 300, dtype=np.int64)]
    flips = [values[i] ^ int(sum(1 << int(b) for b in rng.choice(64, i % 14, replace=False))) for i in range(300)]
    for distance in (0, 6, 10):
        index = HammingIndex(distance)
        for owner, value in enumerate(values):
            index.add(value, owner)
        for query in flips[:60]:
            expected = {o: (query ^ v).bit_count() for o, v in enumerate(values) if (query ^ v).bit_count() <= distance}
            assert index.near(query) == expected
