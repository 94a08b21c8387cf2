"""The similar-case index at archive scale: the HNSW graph (usearch) next to the shards, exact search for small
indexes, removals, a graph kept current incrementally and rebuilt when missing, stale or damaged; synthetic
clustered unit vectors (no model)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

import medlens.siglip.ann as ann_module
import medlens.siglip.index as index_module
from medlens.errors import CorruptFileError, MedlensError
from medlens.siglip.ann import AnnSettings, graph_files
from medlens.siglip.index import META_FILE, SHARD_DIR, IndexEntry, SiglipIndex

# not pytest.importorskip: usearch must load through medlens.siglip.ann (after Ray's core; see ann._usearch)
pytestmark = pytest.mark.skipif(importlib.util.find_spec("usearch") is None, reason="usearch is not installed")

DIM = 32


def _clustered(n: int, clusters: int = 60, seed: int = 0, spread: float = 0.25) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, DIM))
    points = centres[rng.integers(0, clusters, n)] + spread * rng.normal(size=(n, DIM))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def _entries(source: str, n: int, first: int = 1) -> list[IndexEntry]:
    return [IndexEntry(source, i) for i in range(first, first + n)]


def _exact_ids(vectors: np.ndarray, query: np.ndarray, k: int, removed: set[int] = frozenset()) -> list[int]:
    scores = vectors @ query
    order = [int(i) for i in np.lexsort((np.arange(len(scores)), -scores)) if int(i) not in removed]
    return order[:k]


@pytest.fixture
def big(tmp_path):
    """3,000 vectors in three adds (three shards)."""
    vectors = _clustered(3000)
    index = SiglipIndex.create(tmp_path / "idx", "m", "fp", DIM)
    for part in range(3):
        rows = slice(part * 1000, (part + 1) * 1000)
        index.add(vectors[rows], _entries(f"/s/{part}", 1000))
    return index, vectors


def test_graph_search_finds_what_exact_search_finds_and_scores_exactly(big):
    index, vectors = big
    queries = _clustered(100, seed=9)
    recall = 0.0
    for query in queries:
        hits = index.search(query, top_k=10, method="ann")
        assert [h.rank for h in hits] == list(range(1, 11))
        ids = [h.item.id for h in hits]
        recall += len(set(ids) & set(_exact_ids(vectors, query, 10))) / 10
        np.testing.assert_allclose([h.score for h in hits], vectors[ids] @ query, atol=1e-6)  # re-scored in f32
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert recall / len(queries) >= 0.95
    (graph,) = graph_files(index.directory)
    assert graph.state == index.state == 3 and graph.tag == AnnSettings().tag  # saved for the next process
    hit = index.search(vectors[1234], top_k=1, method="ann")[0]
    assert (hit.item.id, hit.item.source, hit.item.image) == (1234, "/s/1", 235)


def test_small_indexes_stay_exact_and_the_threshold_switches_to_the_graph(big, monkeypatch):
    index, vectors = big
    query = _clustered(1, seed=5)[0]
    assert index.method_for("auto") == "exact" and len(index) <= index_module.EXACT_LIMIT
    exact = index.search(query, top_k=25)
    assert [h.item.id for h in exact] == _exact_ids(vectors, query, 25)
    assert not graph_files(index.directory)  # no graph is built for an exact index
    monkeypatch.setattr(index_module, "EXACT_LIMIT", 2999)
    assert index.method_for("auto") == "ann"
    approximate = index.search(query, top_k=25)
    assert len(graph_files(index.directory)) == 1
    assert len({h.item.id for h in approximate} & {h.item.id for h in exact}) >= 23
    with pytest.raises(MedlensError, match="one of auto, exact, ann"):
        index.search(query, method="fast")


def test_adds_and_removes_bring_the_graph_up_to_date_without_a_rebuild(big, monkeypatch):
    index, vectors = big
    index.search(vectors[0], method="ann")  # graph of state 3
    more = _clustered(500, seed=3)
    index.add(more, _entries("/s/new", 500))
    removed = index.remove(sources=["/s/0"], ids=[1500, 1501, 99999])
    assert (removed.removed, removed.studies, removed.not_found) == (1002, 2, ["id 99999"])
    assert len(index) == 3500 - 1002 and index.state == 5

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the graph was rebuilt instead of updated")

    monkeypatch.setattr(ann_module, "new_graph", no_rebuild)
    reopened = SiglipIndex.open(index.directory)
    everything = np.concatenate([vectors, more])
    gone = set(range(1000)) | {1500, 1501}
    for query in (more[7], vectors[1500], vectors[10]):
        hits = reopened.search(query, top_k=10, method="ann")
        assert not gone & {h.item.id for h in hits}
        assert len({h.item.id for h in hits} & set(_exact_ids(everything, query, 10, gone))) >= 9
    assert reopened.search(more[7], top_k=1, method="ann")[0].item.id == 3007
    assert [g.state for g in graph_files(index.directory)] == [5]  # the old graph is gone
    exact = reopened.search(vectors[10], top_k=10, method="exact")
    assert [h.item.id for h in exact] == _exact_ids(everything, vectors[10], 10, gone)


def test_removed_studies_can_come_back_with_new_ids(tmp_path):
    vectors = _clustered(20)
    index = SiglipIndex.create(tmp_path / "idx", "m", "fp", DIM)
    index.add(vectors[:10], _entries("/a", 10))
    index.add(vectors[10:], _entries("/b", 10))
    assert index.remove(sources=["/a", "/nowhere"]).not_found == ["/nowhere"]
    assert index.sources() == {"/b"} and len(index) == 10
    assert all(h.item.source == "/b" for h in index.search(vectors[3], top_k=20))
    again = index.add(vectors[:10], _entries("/a", 10))
    assert (again.added, again.skipped) == (10, 0)
    reopened = SiglipIndex.open(tmp_path / "idx")
    top = reopened.search(vectors[3], top_k=1)[0]
    assert (top.item.source, top.item.id) == ("/a", 23)  # ids are never reused
    info = reopened.info()
    assert (info["count"], info["removed"], info["sources"], info["format_version"]) == (20, 10, 2, 2)
    assert reopened.remove(ids=[0]).not_found == ["id 0"]  # already removed


def test_an_interrupted_remove_leaves_the_index_as_it_was(tmp_path, monkeypatch):
    vectors = _clustered(10)
    index = SiglipIndex.create(tmp_path / "idx", "m", "fp", DIM)
    index.add(vectors, _entries("/a", 10))
    before = (tmp_path / "idx" / META_FILE).read_text()

    def crash_on_commit(path, value):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(index_module, "write_json_atomic", crash_on_commit)
        with pytest.raises(KeyboardInterrupt):
            index.remove(ids=[1, 2])
    assert (tmp_path / "idx" / META_FILE).read_text() == before
    survivor = SiglipIndex.open(tmp_path / "idx")
    assert len(survivor) == 10 and survivor.search(vectors[1])[0].item.id == 1
    survivor.add(vectors[:1], _entries("/b", 1))  # the uncommitted removal file is cleared
    assert sorted(p.name for p in (tmp_path / "idx" / SHARD_DIR).iterdir()) == [
        "000001.jsonl",
        "000001.npy",
        "000002.jsonl",
        "000002.npy",
    ]


@pytest.mark.parametrize("damage", ["missing", "garbage", "truncated", "other settings", "wrong count"])
def test_a_missing_or_unusable_graph_is_rebuilt(big, damage):
    index, vectors = big
    index.sync_graph()
    (graph,) = graph_files(index.directory)
    if damage == "missing":
        graph.path.unlink()
    elif damage == "garbage":
        graph.path.write_bytes(b"not a graph" * 100)
    elif damage == "truncated":
        graph.path.write_bytes(graph.path.read_bytes()[:-500])
    elif damage == "other settings":
        graph.path.rename(graph.path.with_name(f"{graph.state:06d}-00000000.usearch"))
    else:  # a graph saved by hand over a subset
        small = ann_module.new_graph(DIM)
        ann_module.add_vectors(small, np.arange(10), vectors[:10])
        ann_module.save_graph(small, graph.path)
    reopened = SiglipIndex.open(index.directory)
    assert reopened.search(vectors[2500], top_k=1, method="ann")[0].item.id == 2500
    (rebuilt,) = graph_files(index.directory)
    assert rebuilt.state == 3 and rebuilt.tag == AnnSettings().tag
    assert ann_module.open_graph(rebuilt.path, DIM, 3000, AnnSettings(), view=True) is not None


def test_a_graph_ahead_of_meta_json_is_ignored(big):
    """A graph saved for a commit another process has not made (or that was rolled back) is never used."""
    index, vectors = big
    index.sync_graph()
    (graph,) = graph_files(index.directory)
    graph.path.rename(graph.path.with_name(f"000009-{graph.tag}.usearch"))
    assert SiglipIndex.open(index.directory).search(vectors[5], top_k=1, method="ann")[0].item.id == 5
    assert sorted(g.state for g in graph_files(index.directory)) == [3]


def test_a_read_only_index_searches_with_a_graph_in_memory(big, monkeypatch):
    index, vectors = big

    def read_only(directory):
        raise PermissionError(13, "Permission denied", str(directory / index_module.LOCK_FILE))

    monkeypatch.setattr(index_module, "_locked", read_only)
    hits = SiglipIndex.open(index.directory).search(vectors[42], top_k=3, method="ann")
    assert hits[0].item.id == 42 and not graph_files(index.directory)


def test_a_version_1_index_is_read_and_upgraded(tmp_path):
    vectors = _clustered(6)
    index = SiglipIndex.create(tmp_path / "idx", "m", "fp", DIM)
    index.add(vectors[:3], _entries("/a", 3))
    meta_path = tmp_path / "idx" / META_FILE
    meta = json.loads(meta_path.read_text())
    for key in ("removed", "removals"):
        del meta[key]
    meta["format_version"] = 1
    meta_path.write_text(json.dumps(meta))
    old = SiglipIndex.open(tmp_path / "idx")
    assert len(old) == 3 and old.search(vectors[1])[0].item.id == 1
    old.add(vectors[3:], _entries("/b", 3))
    upgraded = json.loads(meta_path.read_text())
    assert upgraded["format_version"] == 2 and upgraded["removals"] == [] and upgraded["count"] == 6


def test_a_corrupt_removal_file_is_named(tmp_path):
    vectors = _clustered(4)
    index = SiglipIndex.create(tmp_path / "idx", "m", "fp", DIM)
    index.add(vectors, _entries("/a", 4))
    index.remove(ids=[0])
    removal = tmp_path / "idx" / SHARD_DIR / "000002.removed.npy"
    removal.write_bytes(b"broken")
    with pytest.raises(CorruptFileError, match="removal") as info:
        SiglipIndex.open(tmp_path / "idx").search(vectors[1])
    assert str(removal) in str(info.value)


def test_a_damaged_items_file_is_named_when_a_hit_needs_it(tmp_path):
    vectors = _clustered(4)
    index = SiglipIndex.create(tmp_path / "idx", "m", "fp", DIM)
    index.add(vectors, _entries("/a", 4))
    items = tmp_path / "idx" / SHARD_DIR / "000001.jsonl"
    lines = items.read_text().splitlines()
    items.write_text("\n".join([*lines[:2], "{broken", lines[3]]) + "\n")
    reopened = SiglipIndex.open(tmp_path / "idx")
    assert reopened.search(vectors[1], top_k=1)[0].item.id == 1  # only the hits' lines are read
    with pytest.raises(CorruptFileError, match="unreadable index shard") as info:
        reopened.search(vectors[2], top_k=1)
    assert str(items) in str(info.value)


def test_usearch_loaded_by_medlens_lets_ray_start_afterwards():
    """usearch's extension loaded before Ray's core makes ``ray.init`` abort the process (ann._usearch)."""
    pytest.importorskip("ray")
    code = (
        "import numpy as np\n"
        "from medlens.siglip import ann\n"
        "graph = ann.new_graph(8)\n"
        "ann.add_vectors(graph, np.arange(4), np.eye(4, 8, dtype=np.float32))\n"
        "import ray\n"
        "ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)\n"
        "assert ray.get(ray.put(7)) == 7\n"
        "ray.shutdown()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_importing_the_index_and_the_archive_modules_stays_light():
    code = (
        "import sys\n"
        "import medlens.siglip.index, medlens.siglip.ann, medlens.siglip.embedding_shards, medlens.cli\n"
        "heavy = [m for m in ('usearch', 'ray', 'pyarrow', 'torch') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
