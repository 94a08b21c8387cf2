"""``medlens batch``: a manifest of studies or questions -> one result envelope per row, locally or on Ray.

:func:`run_batch` reads the manifest (:mod:`medlens.batch.manifest`), keys every row like the eval journal
(:mod:`medlens.batch.keys`), runs the rows the journal lacks through :mod:`medlens.pipeline` as the task's
build and answer halves (:mod:`medlens.batch.stages`) and writes the outputs (:mod:`medlens.batch.outputs`).
"""

from medlens.batch.run import run_batch

__all__ = ["run_batch"]
