"""``medlens embed --format parquet`` and ``--ray``: an archive's MedSigLIP embeddings (test-tiny-siglip) as
Parquet shards with the documented schema, a bad study failing alone, the same vectors here and on the
session's local Ray (``ray_local``), and ``search add`` taking the folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from ray_cluster import ray_local  # noqa: F401

from medlens import DISCLAIMER
from medlens.demo.phantom import ct_phantom, write_ct_series
from medlens.files import sha256_of

pytest.importorskip("torch")
pytest.importorskip("transformers")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

N_SLICES = 6
DIM = 32


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Four PNGs, a 6-slice CT, a corrupt PNG and a CSV listing them all plus a file that is not there."""
    root = tmp_path_factory.mktemp("archive")
    rng = np.random.default_rng(0)
    names = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64 + 8 * i, 80, 3), dtype=np.uint8)).save(root / f"cxr{i}.png")
        names.append(f"cxr{i}.png")
    hu, _ = ct_phantom(n_slices=N_SLICES, size=32)
    write_ct_series(hu, root / "ct")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    rows = [f"{name},{'a' if k % 2 else 'b'}" for k, name in enumerate([*names[:2], "broken.png", "ct", *names[2:]])]
    rows.append("gone.png,a")
    (root / "archive.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    return root


#: studies of archive.csv in order, with their image counts; rows 2 (corrupt) and 6 (missing) fail
GOOD = [(0, "cxr0.png", 1), (1, "cxr1.png", 1), (3, "ct", N_SLICES), (4, "cxr2.png", 1), (5, "cxr3.png", 1)]


def _ok(result):
    code, out, err = result
    assert code == 0, err
    return json.loads(out)


def _rows(folder):
    table = pa.concat_tables(pq.read_table(p) for p in sorted(folder.glob("part-*.parquet")))
    return table, np.asarray(table.column("vector").to_pylist(), np.float32)


def test_local_parquet_shards_have_the_schema_and_the_embed_vectors(archive, tmp_path, cli):
    from medlens.models.siglip_encoder import SiglipEncoder
    from medlens.siglip.inputs import InputRef, embed_studies

    out = tmp_path / "emb"
    summary = _ok(cli("embed", archive / "archive.csv", "--format", "parquet", "--out", out, "-q"))
    assert (summary["n_studies"], summary["n_images"], summary["n_failed"]) == (5, 4 + N_SLICES, 2)
    assert summary["runner"] == "local" and summary["disclaimer"] == DISCLAIMER
    assert any("noise" in w for w in summary["warnings"])

    table, vectors = _rows(out)
    assert table.schema.names == ["row", "path", "image", "label", "input_sha256", "model", "fingerprint", "vector"]
    assert table.schema.field("vector").type == pa.list_(pa.float32(), DIM)
    assert table.schema.field("row").type == pa.int64() and table.schema.field("image").type == pa.int32()
    assert json.loads(table.schema.metadata[b"medlens"])["fingerprint"] == summary["fingerprint"]
    expected_rows = [(row, image) for row, _name, n in GOOD for image in range(1, n + 1)]
    assert list(zip(table.column("row").to_pylist(), table.column("image").to_pylist(), strict=True)) == expected_rows
    paths = [str((archive / name).resolve()) for _row, name, n in GOOD for _ in range(n)]
    assert table.column("path").to_pylist() == paths
    assert table.column("input_sha256").to_pylist() == [sha256_of(p) for p in paths]
    assert table.column("label").to_pylist()[:2] == ["b", "a"]
    assert set(table.column("fingerprint").to_pylist()) == {summary["fingerprint"]}

    encoder = SiglipEncoder("test-tiny-siglip")
    refs = [InputRef(archive / name) for _row, name, _n in GOOD]
    reference = np.concatenate([s.embeddings for s in embed_studies(encoder, refs)])
    np.testing.assert_allclose(vectors, reference, atol=1e-5)  # what `medlens embed` (.npz) gives

    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["row"] for e in errors] == [2, 6]
    assert errors[0]["path"] == str((archive / "broken.png").resolve()) and errors[0]["stage"] == "prepare"
    assert errors[1]["error"] == "NotFoundError" and "gone.png" in errors[1]["path"]
    assert not any(e.get("untyped") for e in errors)
    manifest = json.loads((out / "embeddings.json").read_text())
    assert manifest["n_images"] == len(table) and manifest["shards"][0]["rows"] == len(table)


def test_search_add_takes_the_parquet_folder_and_refuses_another_models(archive, tmp_path, cli):
    out = tmp_path / "emb"
    _ok(cli("embed", archive / "cxr0.png", archive / "ct", "--format", "parquet", "--out", out, "-q"))
    index = tmp_path / "idx"
    added = _ok(cli("search", "add", index, out, "--note", "from parquet", "-q"))
    assert added["added_images"] == 1 + N_SLICES and added["count"] == 1 + N_SLICES and added["search"] == "exact"
    again = _ok(cli("search", "add", index, out, "-q"))
    assert again["added_images"] == 0 and again["skipped_images"] == 1 + N_SLICES
    found = _ok(cli("search", "query", index, archive / "cxr0.png", "-k", "2", "-q"))
    top = found["results"][0]
    assert top["source"] == str((archive / "cxr0.png").resolve()) and top["note"] == "from parquet"
    assert top["score"] == pytest.approx(1.0, abs=1e-4) and found["method"] == "exact"

    removed = _ok(cli("search", "remove", index, archive / "ct"))
    assert (removed["removed_images"], removed["removed_studies"], removed["count"]) == (N_SLICES, 1, 1)
    left = _ok(cli("search", "query", index, "--text", "x", "-q"))["results"]
    assert len(left) == 1 and left[0]["source"].endswith("cxr0.png")

    other = tmp_path / "other-idx"
    _ok(cli("search", "add", other, archive / "cxr1.png", "-q"))
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "fingerprint": "f" * 16}))
    code, stdout, err = cli("search", "add", other, out, "-q")
    assert code == 2 and stdout == "" and err.count("\n") == 1 and str(other) in err and "f" * 16 in err


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--ray", "local", "--format", "npz", "--out", "{tmp}/e.npz"], "Parquet"),
        (["--replicas", "2", "--out", "{tmp}/e.npz"], "go with --ray"),
        (["--format", "parquet"], "needs --out DIR"),
        (["--format", "parquet", "--out", "{tmp}/d", "--text", "x"], "--text"),
        (["--format", "feather", "--out", "{tmp}/d"], "npz or parquet"),
        (["--format", "parquet", "--out", "{tmp}/done"], "already holds embeddings"),
        (["--format", "parquet", "--out", "{tmp}/busy"], "holds other files"),
    ],
)
def test_bad_archive_options_exit_2_with_one_line(archive, tmp_path, cli, args, reason):
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "embeddings.json").write_text("{}")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    code, out, err = cli("embed", archive / "cxr0.png", *[a.format(tmp=tmp_path) for a in args], "-q")
    assert code == 2 and out == "" and err.count("\n") == 1 and reason in err and "Traceback" not in err


def test_an_interrupted_folder_is_cleared_and_rewritten(archive, tmp_path, cli):
    out = tmp_path / "emb"
    out.mkdir()
    (out / "part-000000.parquet").write_bytes(b"half a shard")
    (out / ".part-000001.parquet.x.tmp").write_bytes(b"")
    summary = _ok(cli("embed", archive / "cxr0.png", "--format", "parquet", "--out", out, "-q"))
    assert summary["n_images"] == 1 and sorted(p.name for p in out.iterdir()) == [
        "embeddings.json",
        "errors.jsonl",
        "part-000000.parquet",
    ]


def test_ray_embeddings_equal_the_local_ones(archive, tmp_path, cli, ray_local):
    local, remote = tmp_path / "local", tmp_path / "ray"
    _ok(cli("embed", archive / "archive.csv", "--format", "parquet", "--out", local, "-q"))
    summary = _ok(cli("embed", archive / "archive.csv", "--ray", "local", "--out", remote, "--batch-size", "4", "-q"))
    assert summary["runner"] == "ray" and (summary["n_images"], summary["n_failed"]) == (4 + N_SLICES, 2)
    local_table, local_vectors = _rows(local)
    ray_table, ray_vectors = _rows(remote)
    for column in ("row", "path", "image", "label", "input_sha256", "model", "fingerprint"):
        assert ray_table.column(column).to_pylist() == local_table.column(column).to_pylist(), column
    np.testing.assert_allclose(ray_vectors, local_vectors, atol=1e-5)
    assert (remote / "errors.jsonl").read_text() == (local / "errors.jsonl").read_text()
