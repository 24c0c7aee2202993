"""Comfy Registry readiness (what the serverless ComfyUI workers install from): project URLs, an icon that
exists and that its committed script reproduces, a changelog entry for the version, no package requirements."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def _meta():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_project_urls_and_icon():
    meta = _meta()
    urls, comfy = meta["project"]["urls"], meta["tool"]["comfy"]
    repo = urls["Repository"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", repo), repo
    assert urls["Documentation"].startswith(repo) and urls["Bug Tracker"] == repo + "/issues"
    owner_name = repo.removeprefix("https://github.com/")
    # the icon is served from the repository's main branch: the file it names must be committed there
    prefix = f"https://raw.githubusercontent.com/{owner_name}/main/"
    assert comfy["Icon"].startswith(prefix), comfy["Icon"]
    icon = ROOT / comfy["Icon"].removeprefix(prefix)
    with Image.open(icon) as im:
        assert im.format == "PNG" and im.size[0] == im.size[1] <= 400, (im.format, im.size)
    assert icon.stat().st_size < 100_000


def test_icon_is_reproduced_by_its_script(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_icon.py"), str(tmp_path / "icon.png")], check=True,
                   timeout=120)
    assert (tmp_path / "icon.png").read_bytes() == (ROOT / "docs" / "icon.png").read_bytes()


def test_changelog_has_the_version():
    version = _meta()["project"]["version"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), version
    headings = re.findall(r"^## (.+)$", (ROOT / "CHANGELOG.md").read_text(), re.M)
    # the newest entry is the version being prepared (Unreleased (X.Y.Z)) or the version released (X.Y.Z — date)
    assert headings and re.match(rf"(Unreleased \({re.escape(version)}\)|{re.escape(version)} — \d{{4}}-\d\d-\d\d)$",
                                 headings[0]), (version, headings[:2])
