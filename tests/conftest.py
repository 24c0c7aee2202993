"""Root conftest: the repository root on sys.path, so tests import the math core (``inversion``) and the
development package (``ddiminv_dev``). Tests import nothing from each other; shared code lives in
``ddiminv_dev``, shared fixtures in the conftest of each tier."""
import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
