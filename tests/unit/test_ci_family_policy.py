"""Under CI=true a skipped family the pack claims as tested (inversion.families.TESTED) fails instead of vanishing
from a green run, as the browser test does (tests/unit/test_ci_browser_policy.py); a family the pack does not
claim, or any skip outside CI, stays a skip with its reason."""
from __future__ import annotations

import pytest

from ddiminv_dev import ci


@pytest.mark.parametrize("env,want", [({"CI": "true"}, True), ({"CI": "1"}, True), ({"CI": "YES"}, True),
                                      ({"CI": "false"}, False), ({}, False)])
def test_in_ci(monkeypatch, env, want):
    monkeypatch.delenv("CI", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert ci.in_ci() is want


def test_a_claimed_family_that_cannot_run_fails_in_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true: SD99 is claimed as tested .*no SD99 here"):
        ci.skip_family("SD99", "no SD99 here", claimed={"SD99"})
    with pytest.raises(pytest.skip.Exception, match="no X here"):  # not claimed: a skip, even in CI
        ci.skip_family("X", "no X here", claimed={"SD99"})
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="no SD99 here"):
        ci.skip_family("SD99", "no SD99 here", claimed={"SD99"})
