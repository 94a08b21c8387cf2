"""A bounded load run against a medlens server on loopback: ``n`` analyze requests, ``concurrency`` in flight.

Used by tests/test_serve_load.py (a bounded run in the suite) and bench/serve_load.py (the figures in
docs/serve.md). Every request uploads the same small radiograph and asks one question; nothing but the given
loopback URL is contacted, and the run ends after ``n`` requests or ``deadline_s``, whichever comes first.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class LoadResult:
    """Latencies (s) of the requests that got a 200, and what the others got."""

    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def quantile(self, q: float) -> float:
        """The ``q`` quantile of the latencies (inclusive method; 0 when there are none)."""
        if len(self.latencies) < 2:
            return self.latencies[0] if self.latencies else 0.0
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[round(q * 100) - 1]

    def summary(self) -> str:
        ok = len(self.latencies)
        return (
            f"{ok} ok, {len(self.errors)} errors in {self.wall_s:.1f} s ({ok / max(self.wall_s, 1e-9):.1f} req/s); "
            f"latency p50 {self.quantile(0.5):.3f} s, p95 {self.quantile(0.95):.3f} s, max "
            f"{max(self.latencies, default=0):.3f} s"
        )


async def _run(url: str, image: Path, n: int, concurrency: int, deadline_s: float, api_key: str | None) -> LoadResult:
    import httpx

    result = LoadResult()
    body = image.read_bytes()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    stop_at = time.monotonic() + deadline_s

    async def worker(client: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at:
            try:
                queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            start = time.perf_counter()
            try:
                response = await client.post(
                    f"{url}/v1/analyze",
                    files={"files": (image.name, body, "image/png")},
                    data={"task": "qa", "question": "Is there an abnormality?", "options": '{"max_new_tokens": 4}'},
                    headers=headers,
                )
            except httpx.HTTPError as exc:
                result.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if response.status_code == 200:
                result.latencies.append(time.perf_counter() - start)
            else:
                result.errors.append(f"HTTP {response.status_code}: {response.text[:200]}")

    began = time.perf_counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(deadline_s)) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    result.wall_s = time.perf_counter() - began
    return result


def run_load(
    url: str, image: Path, n: int = 200, concurrency: int = 16, deadline_s: float = 300.0, api_key: str | None = None
) -> LoadResult:
    """``n`` POST /v1/analyze requests at ``concurrency``; stops early at ``deadline_s`` (then fewer are counted)."""
    if not url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        raise ValueError(f"load runs only against loopback servers, not {url}")
    return asyncio.run(_run(url, image, n, concurrency, deadline_s, api_key))
