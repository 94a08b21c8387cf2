"""Benchmark: a 300-slice CT study from a DICOMweb server (Orthanc on loopback), medlens's dicomweb:// input
against retrieving the whole series first and preparing the files locally.

Run: ``.venv/bin/python bench/dicomweb_fetch.py [--slices 300] [--size 512] [--repeat 3] [--parallel 4]``

Needs Debian's ``orthanc`` and ``orthanc-dicomweb`` (started here on a free 127.0.0.1 port with a generated
config and user, stopped at the end; tests/orthanc.py). The study is a synthetic CT written by
tests/dicom_factory.py (uncompressed, shuffled file order) and stored once through Orthanc's REST API.

(a) dicomweb://  ``prepare_study("dicomweb://orthanc/STUDY")``: QIDO-RS series list, WADO-RS metadata of the
                 series, then only the 85 sampled instances retrieved (``--parallel`` at once) and prepared.
(b) whole series WADO-RS ``retrieve_series`` of all instances (one multipart request, as a plain client does),
                 written as files, then ``prepare_study(folder)``.

Each approach runs ``--repeat`` times (alternating, after one untimed warm-up each); medians are printed
with the ratio (b)/(a). The prepared images of (a) and (b) are checked to be equal.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=4)
    args = parser.parse_args()

    import os

    from dicom_factory import write_series
    from orthanc import Orthanc, missing

    from medlens.io import dicomweb
    from medlens.io.dicomweb_config import ENV, get_server
    from medlens.prep import prepare_study

    if why := missing():
        sys.exit(f"cannot run: {why}")
    work = Path(tempfile.mkdtemp(prefix="medlens-bench-dicomweb-"))
    rng = np.random.default_rng(0)
    n, size = args.slices, args.size
    order = rng.permutation(n)
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.4 * size) ** 2).astype(np.int32)
    arrays = [(body * (1000 + 3 * i) + rng.integers(0, 50, (size, size))).astype(np.uint16) for i in range(n)]
    files = write_series(
        work / "ct",
        [arrays[i] for i in order],
        positions=[(0.0, 0.0, 1.25 * i) for i in order],
        instance_numbers=[int(i) + 1 for i in order],
        slice_thickness=1.25,
    )
    megabytes = sum(f.stat().st_size for f in files) / 2**20
    import pydicom

    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    server = Orthanc(work / "orthanc").start()
    try:
        t0 = time.perf_counter()
        server.upload(files)
        print(f"stored {n} instances ({megabytes:.0f} MB) in Orthanc in {time.perf_counter() - t0:.1f} s")
        config = work / "dicomweb.toml"
        config.write_text(server.config_toml("orthanc", parallel=args.parallel))
        os.environ[ENV] = str(config)
        source = f"dicomweb://orthanc/{study}"

        def remote() -> list[np.ndarray]:
            return prepare_study(source).images

        def whole() -> list[np.ndarray]:
            client = dicomweb.connect(get_server("orthanc"))
            series_uid = client.search_for_series(study_instance_uid=study)[0]["0020000E"]["Value"][0]
            with tempfile.TemporaryDirectory(dir=work) as folder:
                for i, ds in enumerate(client.retrieve_series(study, series_uid)):
                    ds.save_as(Path(folder) / f"{i:04d}.dcm", enforce_file_format=True)
                return prepare_study(folder).images

        a, b = remote(), whole()  # warm-up, and the correctness check
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)), "images differ"
        times: dict[str, list[float]] = {"dicomweb://": [], "whole series": []}
        for _ in range(args.repeat):
            for name, run in (("dicomweb://", remote), ("whole series", whole)):
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{n} slices of {size}x{size}, {len(a)} prepared, parallel {args.parallel}, median of {args.repeat}")
    for name, value in med.items():
        print(f"  {name:<13} {value:6.2f} s")
    print(f"  ratio whole/dicomweb:// {med['whole series'] / med['dicomweb://']:.2f}x (target >= 2.5x)")


if __name__ == "__main__":
    main()
