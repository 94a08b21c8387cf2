"""A private local Ray for the tests (``ray.init(num_cpus=2)``), started once per session and shut down at
the end. Its workers share the tests' model cache and see the tests folder and the sources on ``PYTHONPATH``,
so test helpers (faulty decoders, test stages) import there by name. Skipped, with the reason shown, when Ray
is not installed; `.ci/run` installs it (the ``scale`` extra)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
SOURCES = TESTS.parent / "src"


@pytest.fixture(scope="session")
def ray_local():
    """The running local Ray (the ``ray`` module); runners given ``address="local"`` reuse it."""
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[scale]')")
    if not ray.is_initialized():
        path = os.pathsep.join([str(TESTS), str(SOURCES), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": path, "MEDLENS_CACHE": os.environ["MEDLENS_CACHE"]}},
        )
    yield ray
    ray.shutdown()
