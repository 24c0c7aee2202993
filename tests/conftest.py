"""Root conftest: the repository root on sys.path, so tests import the math core (``inversion``) and the
development package (``ddiminv_dev``). Tests import nothing from each other; shared code lives in
``ddiminv_dev``, shared fixtures in the conftest of each tier.

Torch runs one thread in the tests and in the servers they start (OMP_NUM_THREADS is inherited): the models
are tiny, and on a shared or small machine several threads per tiny op spend their time waiting on each
other (measured: a null-text test took 55 s with 2 threads beside another job, 7 s with 1).
Set DDIMINV_TEST_THREADS to change it.
"""
import os
import sys
from pathlib import Path

_THREADS = os.environ.get("DDIMINV_TEST_THREADS", "1")
os.environ["OMP_NUM_THREADS"] = _THREADS
os.environ.setdefault("MKL_NUM_THREADS", _THREADS)

import pytest  # noqa: E402
import torch  # noqa: E402  (after the thread settings)

torch.set_num_threads(int(_THREADS))

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`make test` runs pytest-xdist workers; ddiminv_dev.xdist_units says how the files are shared out."""
    from ddiminv_dev import xdist_units
    return xdist_units.make_scheduler(config, log)
