"""`make demo`'s script, end to end on the built-in learned model, with few steps (the full run is what the
README's table records; tests/unit/test_demo_table.py keeps the two in step)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ddiminv_dev.learned import data

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_demo_runs_every_part_and_writes_pictures_and_metrics(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "demo.py"), "--steps", "3", "--methods", "ddim,exact",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"] == "learned" and m["steps"] == 3
    rows = {r["what"]: r for r in m["results"]}
    assert {"ddim", "exact"} <= set(rows)
    assert sum(r["kind"] == "edit" for r in m["results"]) == 3          # plain, null-text, negative-prompt
    assert sum(r["kind"] == "reconstruction" for r in m["results"]) == 5
    for r in m["results"]:
        assert r["psnr_db"] <= r["vae_ceiling_db"] + 0.5 and r["evaluations"] > 0, r
        assert r["looks_like"] in data.CAPTIONS, r                          # the classifier's verdict
        fname = r["what"].replace(" ", "_").replace("/", "-").replace(",", "")
        assert (out / f"{fname}.png").is_file(), fname
    assert rows["exact"]["latent_rel_error"] < 1e-5                        # BDIA: exact at any step count
    assert (out / "demo.png").is_file() and (out / "source.png").is_file()
    assert "total" in p.stdout and "tracebacks" not in p.stdout.lower()
