"""Minimal root conftest: put the repo root on sys.path so ``tests.support`` imports. Fixtures live in
tests/support (and tier conftests)."""
import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
