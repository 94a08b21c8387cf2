"""Fuzz engines: atheris (coverage-guided libFuzzer) when installed, else a seeded byte-mutation loop.

Both bound every input: a per-input time limit (a hang is a finding) and a memory cap (libFuzzer's
``-rss_limit_mb``; an address-space limit for the mutation loop), on top of the decoded-pixel budget of
``medlens.io.limits`` that the targets set low (``MEDLENS_MAX_DECODED_MB``).
"""

from __future__ import annotations

import hashlib
import random
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .targets import Target, check_one

#: libFuzzer-style "interesting" values written over bytes, little and big endian
_INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]


class Hang(BaseException):
    """One input ran past the per-input time limit (BaseException: readers' ``except Exception`` miss it)."""


def mutate(data: bytes, rng: random.Random, corpus: list[bytes]) -> bytes:
    """One to four random byte-level edits: flips, overwrites, inserts, deletes, truncation, splices."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        pos = rng.randrange(len(buf)) if buf else 0
        if op == 0 and buf:
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[pos] = rng.randrange(256)
        elif op == 2:
            value = rng.choice(_INTERESTING)
            width = rng.choice((1, 2, 4))
            blob = (value & (2 ** (8 * width) - 1)).to_bytes(width, rng.choice(("little", "big")))
            buf[pos : pos + width] = blob
        elif op == 3:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == 4 and buf:
            del buf[pos : pos + rng.randint(1, max(1, len(buf) // 8))]
        elif op == 5 and buf:
            del buf[rng.randrange(len(buf)) :]  # truncation
        elif op == 6 and corpus:
            other = rng.choice(corpus)
            cut = rng.randrange(len(other) + 1)
            buf[pos:] = other[cut:]
        elif op == 7 and len(buf) > 1:  # copy a chunk elsewhere (repeats headers and tags)
            start = rng.randrange(len(buf))
            chunk = buf[start : start + rng.randint(1, 64)]
            buf[pos:pos] = chunk
    return bytes(buf)


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`Hang` in the main thread when the block runs longer than ``seconds``."""

    def on_alarm(signum: int, frame: object) -> None:
        raise Hang(f"input ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def cap_memory(extra_mb: int) -> None:
    """Limit this process's address space to its current size plus ``extra_mb``."""
    import resource

    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[0])
    limit = pages * resource.getpagesize() + extra_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run_mutations(
    target: Target,
    seeds: list[bytes],
    *,
    seconds: float,
    timeout: float,
    artifacts: Path | None = None,
    max_execs: int | None = None,
    seed: int = 0,
) -> tuple[int, list[str]]:
    """Run seeds, then mutations of them, for ``seconds`` (or ``max_execs``); return (executions, findings).

    A finding is described by its exception and innermost frame; each distinct one is kept once, its input
    written to ``artifacts`` when given."""
    rng = random.Random(seed)
    corpus = list(seeds) or [b""]
    findings: dict[str, str] = {}
    execs = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and (max_execs is None or execs < max_execs):
        data = seeds[execs] if execs < len(seeds) else mutate(rng.choice(corpus), rng, corpus)
        execs += 1
        try:
            with time_limit(timeout):
                check_one(target, data)
        except (Exception, Hang) as exc:  # a finding: anything but a typed error
            tb = traceback.extract_tb(exc.__traceback__)
            where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else "?"
            key = f"{type(exc).__name__} at {where}"
            if key not in findings:
                digest = hashlib.sha1(data).hexdigest()[:12]
                if artifacts is not None:
                    artifacts.mkdir(parents=True, exist_ok=True)
                    (artifacts / f"{target.name}-crash-{digest}").write_bytes(data)
                findings[key] = f"{key}: {exc!r:.300} (input {digest}, {len(data)} bytes)"
                print(f"FINDING {target.name}: {findings[key]}", file=sys.stderr)
                traceback.print_exception(exc, file=sys.stderr)
            continue
        if rng.random() < 0.05 and len(corpus) < 512:  # keep some mutants as new parents
            corpus.append(data)
    return execs, list(findings.values())


def run_atheris(target: Target, seeds: list[bytes], *, seconds: int, timeout: int, rss_mb: int, workdir: Path) -> None:
    """Coverage-guided fuzzing with atheris (libFuzzer); does not return (libFuzzer exits the process)."""
    import atheris

    corpus = workdir / "corpus" / target.name
    corpus.mkdir(parents=True, exist_ok=True)
    for blob in seeds:
        (corpus / f"seed-{hashlib.sha1(blob).hexdigest()[:16]}").write_bytes(blob)
    artifacts = workdir / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    with atheris.instrument_imports(include=["medlens"]):
        for blob in seeds:  # imports the target's (lazily imported) medlens modules under instrumentation
            check_one(target, blob)
    args = [
        sys.argv[0],
        f"-max_total_time={seconds}",
        f"-timeout={timeout}",
        f"-rss_limit_mb={rss_mb}",
        f"-artifact_prefix={artifacts}/{target.name}-",
        f"-max_len={max(4096, max(map(len, seeds), default=0) * 2)}",
        "-print_final_stats=1",
        str(corpus),
    ]
    atheris.Setup(args, lambda data: check_one(target, data))
    atheris.Fuzz()


def have_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True
