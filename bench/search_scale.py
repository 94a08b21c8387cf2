"""Benchmark: the similar-case index at archive scale, HNSW graph (usearch) against exact search.

Run: ``.venv/bin/python bench/search_scale.py [--n 250000] [--dim 1152] [--clusters 3000] [--queries 1000]
[--exact-queries 200] [--dtype i8] [--connectivity 16] [--expansion-add 64] [--sweep] [--workdir DIR] [--json FILE]``

Data: ``--n`` synthetic unit vectors of ``--dim`` in ``--clusters`` Gaussian clusters on the sphere (centres
uniform on the sphere, cluster sizes uniform at random, each cluster's spread drawn from 0.6..1.2 x 0.022
per coordinate, so a point's cosine to its centre is about 0.8, like near-duplicate images); queries are new
draws from the same mixture, not points of the index. Near neighbours in a cluster are almost equally far,
the hard case for a graph: the 10th and 11th best cosines of a query differ by about 0.0006 on average.

What runs is medlens's own index (``medlens.siglip.index.SiglipIndex``) in ``--workdir`` (default
``bench/out/search_scale``): the vectors added in shards of 50,000, then

- build: ``sync_graph()`` from the shards (every usable core), the graph saved next to them;
- ann: ``search(q, 10, method="ann")`` one query at a time: the graph proposes candidates, re-scored exactly
  from the memory-mapped float32 shards; recall@10 against exact search over ``--queries`` queries;
- exact: ``search(q, 10, method="exact")`` one query at a time (``--exact-queries`` of them, vectors in memory);
- exact by size: the same exact query over the first 5k .. n vectors, to place ``EXACT_LIMIT``;
- reopen: a fresh ``SiglipIndex.open`` and its first query (the graph file memory-mapped), what a CLI query pays.

``--sweep`` also measures query-time settings (``expansion_search`` x candidates per result) on the same graph.
Targets (exit 1 when one fails): recall@10 >= 0.95, p95 query < 20 ms. Figures: docs/siglip.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from medlens.siglip.ann import AnnSettings  # noqa: E402
from medlens.siglip.index import EXACT_LIMIT, IndexEntry, SiglipIndex  # noqa: E402

SHARD = 50_000
BASE_SPREAD = 0.022


def mixture(n: int, dim: int, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Cluster centres (unit) and per-cluster spreads of the mixture."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    return centres, rng.uniform(0.6, 1.2, clusters).astype(np.float32) * BASE_SPREAD


def draw(n: int, centres: np.ndarray, spreads: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(centres), n)
    out = np.empty((n, centres.shape[1]), np.float32)
    for start in range(0, n, 20_000):
        part = labels[start : start + 20_000]
        noisy = centres[part] + spreads[part, None] * rng.standard_normal((len(part), centres.shape[1]), np.float32)
        out[start : start + len(part)] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    return out


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3)}


def timed_queries(index: SiglipIndex, queries: np.ndarray, method: str) -> tuple[list[list[int]], list[float]]:
    ids, seconds = [], []
    for query in queries:
        start = time.perf_counter()
        hits = index.search(query, top_k=10, method=method)
        seconds.append(time.perf_counter() - start)
        ids.append([h.item.id for h in hits])
    return ids, seconds


def truth(vectors: np.ndarray, queries: np.ndarray, k: int = 10) -> list[set[int]]:
    """Exact top-k ids of every query (batched matrix product)."""
    out = []
    for start in range(0, len(queries), 100):
        scores = queries[start : start + 100] @ vectors.T
        out.extend(set(row.tolist()) for row in np.argpartition(-scores, k - 1, axis=1)[:, :k])
    return out


def recall(found: list[list[int]], expected: list[set[int]]) -> float:
    return float(np.mean([len(set(f) & e) / len(e) for f, e in zip(found, expected, strict=True)]))


def exact_by_size(vectors: np.ndarray, queries: np.ndarray, sizes: list[int]) -> list[dict[str, float]]:
    """The exact query of ``SiglipIndex`` (product, argpartition, sort) over the first ``size`` vectors."""
    rows = []
    for size in sizes:
        block = np.ascontiguousarray(vectors[:size])
        seconds = []
        for query in queries:
            start = time.perf_counter()
            scores = block @ query
            best = np.argpartition(-scores, 9)[:10]
            best[np.lexsort((best, -scores[best]))]
            seconds.append(time.perf_counter() - start)
        rows.append({"n": size, **percentiles(seconds)})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=250_000)
    parser.add_argument("--dim", type=int, default=1152)
    parser.add_argument("--clusters", type=int, default=3000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--exact-queries", type=int, default=200)
    defaults = AnnSettings()
    parser.add_argument("--dtype", default=defaults.dtype, choices=["f32", "f16", "i8"])
    parser.add_argument("--connectivity", type=int, default=defaults.connectivity)
    parser.add_argument("--expansion-add", type=int, default=defaults.expansion_add)
    parser.add_argument("--expansion-search", type=int, default=defaults.expansion_search)
    parser.add_argument("--candidates", type=int, default=defaults.candidates)
    parser.add_argument("--sweep", action="store_true", help="also try query-time settings on the same graph")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "search_scale")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    settings = AnnSettings(
        connectivity=args.connectivity,
        expansion_add=args.expansion_add,
        expansion_search=args.expansion_search,
        dtype=args.dtype,
        candidates=args.candidates,
    )
    report: dict = {"n": args.n, "dim": args.dim, "clusters": args.clusters, "settings": asdict(settings)}

    start = time.perf_counter()
    centres, spreads = mixture(args.n, args.dim, args.clusters, seed=0)
    vectors = draw(args.n, centres, spreads, seed=1)
    queries = draw(args.queries, centres, spreads, seed=2)
    report["generate_s"] = round(time.perf_counter() - start, 2)

    folder = args.workdir / "index"
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    index = SiglipIndex.create(folder, "synthetic", "synthetic", args.dim)
    index = SiglipIndex.open(folder, settings)
    for first in range(0, args.n, SHARD):
        part = vectors[first : first + SHARD]
        index.add(
            part, [IndexEntry(f"/archive/study{(first + i) // 10}", (first + i) % 10 + 1) for i in range(len(part))]
        )
    report["add_s"] = round(time.perf_counter() - start, 2)

    start = time.perf_counter()
    index.sync_graph()
    report["build_s"] = round(time.perf_counter() - start, 2)
    graph_file = next((folder / "ann").glob("*.usearch"))
    report["graph_mib"] = round(graph_file.stat().st_size / 2**20, 1)
    report["shards_mib"] = round(sum(p.stat().st_size for p in (folder / "shards").iterdir()) / 2**20, 1)

    start = time.perf_counter()
    expected = truth(vectors, queries)
    report["truth_s"] = round(time.perf_counter() - start, 2)

    found, seconds = timed_queries(index, queries, "ann")
    report["ann"] = {"recall_at_10": round(recall(found, expected), 4), **percentiles(seconds)}
    index.embeddings  # noqa: B018 - loaded once, outside the timings (what a server holds)
    exact_found, exact_seconds = timed_queries(index, queries[: args.exact_queries], "exact")
    report["exact"] = {
        "recall_at_10": round(recall(exact_found, expected[: args.exact_queries]), 4),
        **percentiles(exact_seconds),
    }

    start = time.perf_counter()
    fresh = SiglipIndex.open(folder, settings)
    fresh.search(queries[0], top_k=10, method="ann")
    report["reopen_first_query_ms"] = round((time.perf_counter() - start) * 1000, 1)

    sizes = sorted({s for s in (5_000, 10_000, EXACT_LIMIT, 50_000, 100_000, args.n) if s <= args.n})
    report["exact_by_size"] = exact_by_size(vectors, queries[:100], sizes)

    if args.sweep:
        report["sweep"] = []
        for expansion in (64, 96, 128, 192):
            for candidates in (2, 3, 4):
                index.ann_settings = replace(settings, expansion_search=expansion, candidates=candidates)
                index.graph().expansion_search = expansion
                found, seconds = timed_queries(index, queries, "ann")
                row = {"expansion_search": expansion, "candidates": candidates, "recall_at_10": recall(found, expected)}
                report["sweep"].append({**row, **percentiles(seconds)})

    print(json.dumps(report, indent=2))
    checks = [
        (f"recall@10 {report['ann']['recall_at_10']:.4f} >= 0.95", report["ann"]["recall_at_10"] >= 0.95),
        (f"p95 query {report['ann']['p95_ms']:.2f} ms < 20 ms", report["ann"]["p95_ms"] < 20),
    ]
    for text, ok in checks:
        print(("PASS " if ok else "FAIL ") + text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
