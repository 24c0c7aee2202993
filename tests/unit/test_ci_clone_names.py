"""`.ci/run` works whatever the clone's folder is called, and fails when pytest collects nothing.

The README tells users to clone into a folder named ``ddim-inversion``; CI clones into another name. A copy
of this working tree (the files git tracks plus untracked, non-ignored ones) is made under both names, with
this checkout's venv, host and model cache reused (no downloads), and `.ci/run` is run there on a few host
tests that reach the pack through ComfyUI's module (the ones that broke in a ``ddim-inversion`` folder).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# test_preview reaches the pack via host.pack_submodule
SUBSET = "tests/host/test_preview.py tests/unit/test_package.py"

pytestmark = pytest.mark.slow


def _copy_tree(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if not src.is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    # reuse what setup made here: the venv, the extracted host (relinked by setup), the model cache
    os.symlink(ROOT / ".venv", dest / ".venv")
    comfy = Path((ROOT / ".cache" / "comfyui_path").read_text().strip())
    if comfy != ROOT / ".comfyui":
        pytest.skip("this checkout uses $COMFYUI_PATH; the copy would relink the user's ComfyUI")
    # without the bytecode caches, which other workers' imports may be writing while this copies
    shutil.copytree(comfy, dest / ".comfyui", symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    (dest / ".cache").mkdir()
    for name in ("venv.stamp", "comfy-requirements.txt"):
        if (ROOT / ".cache" / name).exists():
            shutil.copy2(ROOT / ".cache" / name, dest / ".cache" / name)
    os.symlink(ROOT / ".cache" / "models", dest / ".cache" / "models")
    return dest


def _ci(tree: Path, pytest_args: str) -> subprocess.CompletedProcess:
    # the outer make's command-line settings travel in MAKEFLAGS and would beat PYTEST_ARGS/PYTEST_WORKERS below
    # (`make test PYTEST_ARGS=tests/unit` made the inner run collect this test again); xdist's worker variables
    # belong to the outer run
    drop = ("COMFYUI_PATH", "PYTEST_ADDOPTS", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("PYTEST_XDIST")}
    # one pytest process inside: this test already runs beside the outer run's other workers, and each inner
    # worker would boot its own ComfyUI for two files
    env.update(PYTEST_ARGS=pytest_args, DDIMINV_CI_NO_BROWSER="1", PYTEST_WORKERS="0")
    return subprocess.run(["bash", ".ci/run"], cwd=tree, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    if not (ROOT / ".venv" / "bin" / "python").exists() or not (ROOT / ".cache" / "comfyui_path").exists():
        pytest.skip("run `make setup` first")
    if shutil.which("git") is None:
        pytest.skip("git is needed to list the tree's files")
    return tmp_path_factory.mktemp("clones")


@pytest.mark.parametrize("name", ["ddim-inversion", "ci_checkout"])
def test_ci_run_passes_in_a_clone_named(tree, name):
    dest = _copy_tree(tree / name)
    r = _ci(dest, SUBSET)
    log = r.stdout[-3000:] + r.stderr[-3000:]
    assert r.returncode == 0, log
    assert "make test: OK" in r.stdout + r.stderr, log
    assert "passed" in r.stdout, log


def test_ci_run_fails_when_pytest_collects_nothing(tree):
    dest = _copy_tree(tree / "empty-run")
    r = _ci(dest, "tests/unit/test_package.py -k no_such_test_name")
    assert r.returncode != 0
    assert "collected no tests (exit 5)" in r.stderr, r.stderr[-3000:]

