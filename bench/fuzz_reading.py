"""Benchmark: seeded mutations of pydicom's own test files through ``prepare_study``, counted by outcome.

Run: ``.venv/bin/python bench/fuzz_reading.py [--mutations 1000] [--seed 0] [--timeout 30] [--json FILE]``

Each mutation takes one of pydicom's test files (those of at most 256 KB) and applies one to three edits:
flipped header bytes, a truncation, an absurd length (0xFFFFFFFF, 0x7FFFFFFF ... written over four header
bytes), flipped pixel bytes. Mutation ``i`` depends only on ``--seed`` and ``i``, so a run can restart after
any input. The mutations run through ``medlens.api.prepare_study`` in a child process, one after the other;
the parent reads one outcome per input:

- ``prepared``: images came back;
- ``typed``: a typed medlens error (``MedlensError``: exit 2 on the CLI);
- ``untyped``: any other exception (a traceback on the CLI);
- ``crash``: the child process died (a decoder's abort, segfault or panic took it down); restarted at the next;
- ``hang``: no outcome within ``--timeout`` seconds; the child is killed and restarted.

The targets: 0 crashes, 0 untyped, 0 hangs (issue 16). The exit status is 1 when one is missed. The child
sets ``MEDLENS_MAX_DECODED_MB=256`` (mutated sizes would otherwise be refused only at 4 GB) and a 10 s
per-task limit for the decode pool. Untyped errors and crashes are listed with their mutation index.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUTCOMES = ("prepared", "typed", "untyped", "crash", "hang")
MAX_SEED_BYTES = 256 * 1024
_ABSURD = (0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0x10000000)


def seed_files() -> list[Path]:
    """pydicom's test files holding pixel data, at most 256 KB, in name order."""
    import pydicom

    root = Path(pydicom.__file__).parent / "data" / "test_files"
    out = []
    for path in sorted(root.rglob("*.dcm")):
        if path.stat().st_size > MAX_SEED_BYTES:
            continue
        if b"\xe0\x7f\x10\x00" in path.read_bytes():  # the Pixel Data tag, little endian
            out.append(path)
    return out


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, list[str]]:
    """One to three edits; returns the bytes and the names of the edits."""
    buf = bytearray(data)
    pixels = data.rfind(b"\xe0\x7f\x10\x00")
    header_end = pixels if pixels > 132 else max(133, len(buf) // 4)
    done = []
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(("header", "truncate", "length", "pixels"))
        if op == "header" and len(buf) > 132:
            for _ in range(rng.randint(1, 8)):
                pos = rng.randrange(132, min(header_end, len(buf)))
                buf[pos] ^= 1 << rng.randrange(8)
        elif op == "truncate" and len(buf) > 1:
            del buf[rng.randrange(1, len(buf)) :]
        elif op == "length" and len(buf) > 140:
            pos = rng.randrange(132, max(133, min(header_end, len(buf)) - 4))
            buf[pos : pos + 4] = rng.choice(_ABSURD).to_bytes(4, "little")
        elif op == "pixels" and 0 < pixels < len(buf) - 16:
            for _ in range(rng.randint(1, 64)):
                pos = rng.randrange(pixels + 8, len(buf))
                buf[pos] ^= 1 << rng.randrange(8)
        else:
            continue
        done.append(op)
    return bytes(buf), done


def mutation(index: int, seed: int, seeds: list[Path]) -> tuple[bytes, str]:
    rng = random.Random(f"{seed}-{index}")
    source = rng.choice(seeds)
    data, ops = mutate(source.read_bytes(), rng)
    return data, f"{source.name} {'+'.join(ops) or 'unchanged'}"


def child(start: int, count: int, seed: int) -> None:
    """Prepare mutations ``start .. count-1``, one JSON line per input on stdout."""
    import logging
    import warnings

    from medlens.api import prepare_study
    from medlens.errors import MedlensError

    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    seeds = seed_files()
    scratch = Path(tempfile.mkdtemp(prefix="medlens-fuzz-reading-"))
    for index in range(start, count):
        data, what = mutation(index, seed, seeds)
        path = scratch / f"m{index:05d}.dcm"
        path.write_bytes(data)
        try:
            prepare_study(path)
            outcome, detail = "prepared", ""
        except MedlensError as exc:
            outcome, detail = "typed", type(exc).__name__
        except BaseException as exc:  # a finding: anything untyped (a Rust panic is a BaseException)
            outcome, detail = "untyped", f"{type(exc).__name__}: {str(exc)[:200]}"
        path.unlink()
        print(json.dumps({"index": index, "outcome": outcome, "detail": detail, "input": what}), flush=True)


def run(count: int, seed: int, timeout: float) -> tuple[collections.Counter, list[dict]]:
    counts: collections.Counter = collections.Counter()
    findings: list[dict] = []
    env = {**os.environ, "MEDLENS_MAX_DECODED_MB": "256", "MEDLENS_TASK_TIMEOUT_S": "10"}
    seeds = seed_files()
    index = 0
    while index < count:
        command = [sys.executable, str(Path(__file__).resolve()), "--child", str(index), "--mutations", str(count)]
        command += ["--seed", str(seed)]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
        assert proc.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(proc.stdout, selectors.EVENT_READ)
        while index < count:
            if not selector.select(timeout):
                proc.kill()
                outcome, detail = "hang", f"no outcome within {timeout:g} s"
            else:
                line = proc.stdout.readline()
                if line:
                    result = json.loads(line)
                    counts[result["outcome"]] += 1
                    if result["outcome"] == "untyped":
                        findings.append(result)
                    index += 1
                    continue
                proc.wait()
                outcome, detail = "crash", f"the process ended with {proc.returncode}"
            counts[outcome] += 1
            findings.append(
                {"index": index, "outcome": outcome, "detail": detail, "input": mutation(index, seed, seeds)[1]}
            )
            index += 1
            break
        proc.kill()
        proc.wait()
        selector.close()
    return counts, findings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutations", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per input before it is a hang")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child(args.child, args.mutations, args.seed)
        return 0
    started = time.perf_counter()
    counts, findings = run(args.mutations, args.seed, args.timeout)
    seconds = time.perf_counter() - started
    print(f"{args.mutations} mutations (seed {args.seed}) of {len(seed_files())} pydicom test files in {seconds:.0f} s")
    for outcome in OUTCOMES:
        print(f"  {outcome:9s} {counts[outcome]:5d}")
    for finding in findings:
        print(f"  #{finding['index']} {finding['outcome']}: {finding['detail']} ({finding['input']})")
    ok = all(counts[o] == 0 for o in ("untyped", "crash", "hang"))
    print(f"{'PASS' if ok else 'FAIL'}  0 crashes, 0 untyped, 0 hangs")
    if args.json:
        args.json.write_text(json.dumps({"counts": dict(counts), "findings": findings, "seconds": seconds}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
