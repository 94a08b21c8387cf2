"""``python -m tests.fuzz TARGET|all --seconds N``: fuzz one target, or every target in subprocesses.

Exit status 0 when no finding, 1 when a target found one (its input is kept under ``--dir``/artifacts).
``make fuzz-ci`` runs every target briefly, ``make fuzz`` for ``FUZZ_SECONDS`` each.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:  # the factories (dicom_factory, slide_factory) live in tests/
    sys.path.insert(0, str(TESTS))

from .engine import cap_memory, have_atheris, run_atheris, run_mutations  # noqa: E402
from .targets import TARGETS, seed_env  # noqa: E402

_EXECS = (re.compile(r"stat::number_of_executed_units:\s*(\d+)"), re.compile(r"^execs: (\d+)", re.M))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    parser.add_argument("target", choices=[*TARGETS, "all"])
    parser.add_argument("--seconds", type=float, default=30, help="fuzzing time per target")
    parser.add_argument("--timeout", type=int, default=10, help="per-input time limit (s); longer is a hang")
    parser.add_argument("--rss-mb", type=int, default=3072, help="memory cap per target process (MB)")
    parser.add_argument("--engine", choices=("auto", "atheris", "mutate"), default="auto")
    parser.add_argument("--jobs", type=int, default=2, help="targets run at once (with 'all')")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "medlens-fuzz")
    args = parser.parse_args(argv)
    if args.target == "all":
        return _run_all(args)
    seed_env()
    warnings.simplefilter("ignore")  # library warnings on mangled input are expected, not findings
    logging.disable(logging.CRITICAL)
    target = TARGETS[args.target]
    seeds = target.seeds()
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if have_atheris() else "mutate"
    print(f"fuzz {target.name}: {engine} engine, {len(seeds)} seeds, {args.seconds:g} s", flush=True)
    if engine == "atheris":
        run_atheris(
            target, seeds, seconds=int(args.seconds), timeout=args.timeout, rss_mb=args.rss_mb, workdir=args.dir
        )
        return 0  # not reached: libFuzzer exits
    cap_memory(args.rss_mb)
    execs, findings = run_mutations(
        target, seeds, seconds=args.seconds, timeout=args.timeout, artifacts=args.dir / "artifacts"
    )
    print(f"execs: {execs}\nfindings: {len(findings)}", flush=True)
    for line in findings:
        print(f"  {line}")
    return 1 if findings else 0


def _run_all(args: argparse.Namespace) -> int:
    args.dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def one(name: str) -> tuple[str, int, str, float]:
        log = args.dir / f"{name}.log"
        limits = ["--timeout", str(args.timeout), "--rss-mb", str(args.rss_mb), "--engine", args.engine]
        cmd = [
            sys.executable,
            "-m",
            "tests.fuzz",
            name,
            "--seconds",
            str(args.seconds),
            *limits,
            "--dir",
            str(args.dir),
        ]
        t0 = time.monotonic()
        with open(log, "w") as fh:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=TESTS.parent, env=os.environ).returncode
        text = log.read_text(errors="replace")
        execs = next((m[-1] for p in _EXECS if (m := p.findall(text))), "?")
        return name, rc, execs, time.monotonic() - t0

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(one, TARGETS))
    failed = 0
    for name, rc, execs, took in results:
        status = "ok" if rc == 0 else f"FINDING (exit {rc}, see {args.dir / (name + '.log')})"
        failed += rc != 0
        print(f"{name:14s} {execs:>8s} execs {took:6.1f} s  {status}")
    print(f"{len(results)} targets in {time.monotonic() - started:.0f} s, {failed} with findings")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
