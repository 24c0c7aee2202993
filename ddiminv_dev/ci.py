"""What a test does when it cannot run here: outside CI it skips with its reason; under CI=true (as CI services
set it) a skip that would hide something the pack claims fails instead, so it cannot vanish from a green run."""
from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def skip_family(name: str, reason: str, claimed) -> None:
    """Skip a test of family ``name`` that this host cannot run; under CI=true fail instead when ``claimed``
    (``inversion.families.TESTED``) says the pack tested it: a claimed family must run on the CI host."""
    if name in claimed and in_ci():
        pytest.fail(f"CI=true: {name} is claimed as tested (inversion.families.TESTED) but cannot run here: "
                    f"{reason}; run CI on a host that has it, or stop claiming it", pytrace=False)
    pytest.skip(reason)
