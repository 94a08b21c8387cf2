"""Benchmark: the OpenAI-compatible backend against a slow, flaky loopback server, one request at a time and 8.

Run: ``.venv/bin/python bench/http_concurrency.py [--requests 64] [--latency 0.3] [--failure-rate 0.1]
[--concurrency 8] [--seed 0] [--backoff 0.1] [--json FILE]``

The server runs in its own process (so it does not share the client's interpreter lock): each attempt waits
``--latency`` seconds and answers with a completion that depends only on the prompt; a seeded choice per
(prompt, attempt) answers ``--failure-rate`` of the attempts with an immediate HTTP 503 instead, so both runs
meet the same failures. It counts the attempts it holds at once. In one process, the same requests go through
``medlens.backends.openai_backend.OpenAIBackend.generate``:

(a) concurrency 1  one request in flight at a time;
(b) concurrency N  ``--concurrency`` in flight (the backend's default is 8).

Both runs retry the 503s with the backend's own exponential backoff with full jitter (base ``--backoff``, 0.1 s
here; the backend's default is 0.5 s, with which one request that fails twice late in run (b) can sit in
backoff for up to 1.5 s on the critical path, so the ratio then varies with the jitter). Targets: (b) at least
6x faster than (a), every answer identical to the expected one and in request order. The exit status is 1
when a target is missed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import platform
import random
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

TARGET_SPEEDUP = 6.0


def expected_answer(prompt: str) -> str:
    return f"Final Answer: {'yes' if hashlib.sha256(prompt.encode()).digest()[0] % 2 else 'no'} ({prompt})"


def serve(ready: Any, latency: float, failure_rate: float, seed: int) -> None:
    """The flaky server (in a child process): POST /v1/chat/completions, GET /stats, POST /reset."""
    lock = threading.Lock()
    state = {"in_flight": 0, "max_in_flight": 0, "attempts": 0, "failures": 0}
    tries: dict[str, int] = {}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            with lock:
                self._send(200, dict(state))

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path == "/reset":
                with lock:
                    state.update(in_flight=0, max_in_flight=0, attempts=0, failures=0)
                    tries.clear()
                self._send(200, {})
                return
            prompt = json.loads(body)["messages"][0]["content"]
            with lock:
                attempt = tries.get(prompt, 0)
                tries[prompt] = attempt + 1
                state["attempts"] += 1
                if random.Random(f"{seed}:{prompt}:{attempt}").random() < failure_rate:
                    state["failures"] += 1
                    fail = True
                else:
                    fail = False
                    state["in_flight"] += 1
                    state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
            if fail:
                self._send(503, {"error": {"message": "injected overload", "type": "ServiceUnavailable"}})
                return
            time.sleep(latency)
            with lock:
                state["in_flight"] -= 1
            text = expected_answer(prompt)
            self._send(
                200,
                {
                    "choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split())},
                },
            )

        def _send(self, status: int, reply: dict[str, Any]) -> None:
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128

    httpd = Server(("127.0.0.1", 0), Handler)
    ready.put(httpd.server_address[1])
    httpd.serve_forever(poll_interval=0.05)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import httpx

    from medlens.backends import GenerationRequest
    from medlens.backends.openai_backend import OpenAIBackend

    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    server = context.Process(
        target=serve, args=(ready, args.latency, args.failure_rate, args.seed), daemon=True, name="flaky-server"
    )
    server.start()
    try:
        port = ready.get(timeout=30)
        root = f"http://127.0.0.1:{port}"
        prompts = [f"Is there finding {i} in the CT volume?" for i in range(args.requests)]
        requests = [GenerationRequest([{"role": "user", "content": p}], max_new_tokens=16) for p in prompts]
        expected = [expected_answer(p) for p in prompts]
        rows: dict[str, dict[str, Any]] = {}
        runs = (("(a) concurrency 1", 1), (f"(b) concurrency {args.concurrency}", args.concurrency))
        for label, concurrency in runs:
            backend = OpenAIBackend("flaky", base_url=root + "/v1", concurrency=concurrency, backoff=args.backoff)
            with backend:
                backend.generate(requests[:1])  # connect once before timing
                httpx.post(root + "/reset")
                start = time.perf_counter()
                outputs = backend.generate(requests)
                seconds = time.perf_counter() - start
            stats = httpx.get(root + "/stats").json()
            rows[label] = {
                "concurrency": concurrency,
                "seconds": seconds,
                "texts": [o.text for o in outputs],
                "retries": int(sum(o.timings["attempts"] - 1 for o in outputs)),
                **stats,
            }
    finally:
        server.terminate()
        server.join(5)

    (a, b) = rows.values()
    speedup = a["seconds"] / b["seconds"]
    identical = a["texts"] == expected and b["texts"] == expected
    ideal = args.requests * args.latency
    print(
        f"loopback server in its own process: {args.latency:g} s per request, {args.failure_rate:.0%} of attempts "
        f"answered 503 (seed {args.seed}); {args.requests} requests; backoff {args.backoff:g} s; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    print(f"{'row':<22}{'wall s':>9}{'req/s':>9}{'x ideal':>9}{'attempts':>10}{'503s':>6}{'max in flight':>15}")
    for label, row in rows.items():
        row_ideal = ideal / row["concurrency"]
        print(
            f"{label:<22}{row['seconds']:>9.2f}{args.requests / row['seconds']:>9.1f}"
            f"{row['seconds'] / row_ideal:>9.2f}{row['attempts']:>10}{row['failures']:>6}{row['max_in_flight']:>15}"
        )
    print(f"speed-up {speedup:.1f}x; results identical and in order: {identical}")
    checks = {
        f"concurrency {args.concurrency} at least {TARGET_SPEEDUP:g}x faster than 1": speedup >= TARGET_SPEEDUP,
        "results identical and in order": identical,
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if args.json:
        summary = {label: {k: v for k, v in row.items() if k != "texts"} for label, row in rows.items()}
        args.json.write_text(
            json.dumps(
                {
                    "requests": args.requests,
                    "latency_s": args.latency,
                    "failure_rate": args.failure_rate,
                    "seed": args.seed,
                    "backoff_s": args.backoff,
                    "cpus": os.cpu_count(),
                    "rows": summary,
                    "speedup": speedup,
                    "identical": identical,
                    "checks": checks,
                },
                indent=2,
            )
            + "\n"
        )
    return 0 if all(checks.values()) else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64, help="requests per run (default 64)")
    parser.add_argument("--latency", type=float, default=0.3, help="seconds the server takes per request (0.3)")
    parser.add_argument("--failure-rate", type=float, default=0.1, help="share of attempts answered 503 (0.1)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight in run (b) (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the injected failures (default 0)")
    parser.add_argument("--backoff", type=float, default=0.1, help="the backend's backoff base in s (default 0.1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
