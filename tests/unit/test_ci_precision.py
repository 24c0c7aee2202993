""".ci/run runs the tests marked `precision` a second time on another MKL code path (`make test-precision`) after
`make test`, fails when that pass fails, and fails when no test is marked `precision` (a marker that vanished
must not leave a green CI that checks one path only). A narrowed PYTEST_ARGS may hold no such test."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tree(tmp_path):
    """.ci/run with a stub make on PATH: it logs its arguments and writes, for `test-precision`, the pytest exit
    code in $PRECISION_RC (0 by default) and exits non-zero when that is non-zero; `make test` passes."""
    (tmp_path / ".ci").mkdir()
    shutil.copy2(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    make = bin_dir / "make"
    make.write_text("#!/bin/sh\n"
                    'echo "make $*" >> "$STUB_LOG"\n'
                    'rc=0; [ "$1" = test-precision ] && rc="${PRECISION_RC:-0}"\n'
                    '[ -n "${PYTEST_RC_FILE:-}" ] && echo "$rc" > "$PYTEST_RC_FILE"\n'
                    '[ "$rc" = 0 ] || exit 2\n')
    make.chmod(0o755)
    return tmp_path


def run_ci(tree: Path, **env_over) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ARGS", "PRECISION_RC")}
    env.update(PATH=f"{tree / 'bin'}:{os.environ['PATH']}", STUB_LOG=str(tree / "stub.log"),
               DDIMINV_CI_NO_BROWSER="1")
    env.update(env_over)
    return subprocess.run(["bash", ".ci/run"], cwd=tree, env=env, capture_output=True, text=True, timeout=120)


def test_the_precision_tests_run_again_after_make_test(tree):
    r = run_ci(tree)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tree / "stub.log").read_text().splitlines() == ["make test", "make test-precision"]
    assert "MKL_CBWR=COMPATIBLE" in r.stdout


def test_a_failing_precision_pass_fails_ci(tree):
    r = run_ci(tree, PRECISION_RC="1")
    assert r.returncode != 0, r.stdout + r.stderr


def test_no_precision_test_fails_ci_unless_the_selection_is_narrowed(tree):
    r = run_ci(tree, PRECISION_RC="5")
    assert r.returncode == 1 and "no test is marked precision" in r.stderr, r.stdout + r.stderr
    narrowed = run_ci(tree, PRECISION_RC="5", PYTEST_ARGS="tests/unit/test_package.py")
    assert narrowed.returncode == 0, narrowed.stdout + narrowed.stderr
    assert "no test marked precision in PYTEST_ARGS=tests/unit/test_package.py" in narrowed.stdout


def test_tests_are_marked_precision():
    """The marker is registered and carried by the tests issue 30 named (the ones a BLAS path moved)."""
    ini = (ROOT / "pytest.ini").read_text()
    assert "\n    precision:" in ini
    for rel, name in [("tests/unit/test_methods.py", "def test_method_grid("),
                      ("tests/host/test_sampler_edits.py",
                       "def test_an_optimised_negative_with_source_drift_reconstructs_the_source("),
                      ("tests/host/test_invert_sampler.py", "def test_seam_matches_the_core_and_beats_flipsigmas("),
                      ("tests/host/test_scenes_model.py", "def test_rank_extension_keeps_the_model(")]:
        src = (ROOT / rel).read_text()
        head = src[: src.index(name)]
        decorators = head[head.rstrip().rfind("\n\n") :]
        assert "@pytest.mark.precision" in decorators, (rel, name)
