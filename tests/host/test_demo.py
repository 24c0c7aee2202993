"""`make demo`'s script, end to end on the built-in learned model, with few steps (the full run is what the
README's table records; tests/unit/test_demo_table.py keeps the two in step).

Bars: measured on this run's settings (3 steps, methods ddim and exact, cfg 5, CPU; PSNR in dB against the
source, VAE ceiling 28.39): ddim 21.45, exact 28.39 (= the ceiling), plain cfg 5 16.73, null-text cfg 5 21.76,
neg-prompt cfg 5 21.45; the edits 9.9-11.9. A reconstruction bar sits 1.8 dB under the measured PSNR (1.5x the
measured squared error); an edit must stay far from the source. The classifier said 'a cat' (the source) for
every reconstruction but the plain cfg-5 one, and 'a cup of coffee' (the target) for the plain and
negative-prompt edits.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from ddiminv_dev.learned import data

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
STEPS, SOURCE, TARGET = 3, "a cat", "a cup of coffee"      # the learned preset's prompts
MARGIN_DB = 10 * math.log10(1.5)                           # 1.76 dB: 1.5x the measured squared error
PSNR = {"ddim": 21.45, "exact": 28.39, "plain cfg 5": 16.73, "null-text cfg 5": 21.76, "neg-prompt cfg 5": 21.45}
EDIT_PSNR_MAX = 14.0                                       # measured 9.9 .. 11.9: an edit changes the picture


def test_demo_runs_every_part_and_writes_pictures_and_metrics(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "demo.py"), "--steps", str(STEPS), "--methods",
                        "ddim,exact", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for stream in (p.stdout, p.stderr):          # what Python prints for an exception, handled or not
        assert "Traceback (most recent call last)" not in stream, stream[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"] == "learned" and m["steps"] == STEPS and m["cfg"] == 5.0
    assert (m["source_prompt"], m["target_prompt"]) == (SOURCE, TARGET)
    rows = {r["what"]: r for r in m["results"]}
    assert [r["what"] for r in m["results"] if r["kind"] == "reconstruction"] == list(PSNR)
    assert [r["what"] for r in m["results"] if r["kind"] == "edit"] == [
        "edit plain cfg 5", "edit null-text cfg 5", "edit neg-prompt cfg 5"]
    ceiling = rows["ddim"]["vae_ceiling_db"]
    assert ceiling == pytest.approx(28.39, abs=0.05)           # decode(encode(source)): the same image each run
    refined = [r for r in m["results"] if r["kind"] == "refined"]
    assert [r["what"] for r in refined] == ["exact, refine 100"]
    # decoder inversion raises the ceiling itself (measured 28.39 -> 30.17 dB) and exact reaches the new one
    r = refined[0]
    assert r["vae_ceiling_db"] >= ceiling + 1.2 and r["psnr_db"] >= r["vae_ceiling_db"] - 0.01, r
    assert r["latent_rel_error"] < 1e-5 and r["refine_seconds"] > 0, r
    for r in m["results"]:
        if r["kind"] == "refined":
            continue
        assert r["vae_ceiling_db"] == ceiling and r["psnr_db"] <= ceiling + 1e-6 and r["evaluations"] > 0, r
        fname = r["what"].replace(" ", "_").replace("/", "-").replace(",", "")
        assert (out / f"{fname}.png").is_file(), fname
        if r["kind"] == "reconstruction":
            assert r["psnr_db"] >= PSNR[r["what"]] - MARGIN_DB, (r["what"], r["psnr_db"])
        elif r["kind"] == "edit":
            assert r["psnr_db"] <= EDIT_PSNR_MAX, (r["what"], r["psnr_db"])
    # exact (BDIA) is exact at any step count: its PSNR is the VAE's ceiling; one evaluation per step each way
    assert rows["exact"]["latent_rel_error"] < 1e-5 and rows["exact"]["psnr_db"] >= ceiling - 0.01
    assert rows["exact"]["evaluations"] == 2 * STEPS - 1 and rows["ddim"]["evaluations"] == 2 * STEPS
    assert rows["ddim"]["nfe_invert"] == rows["exact"]["nfe_invert"] == STEPS
    # null-text and negative-prompt inversion undo most of the cfg-5 drift of the plain negative
    for how in ("null-text", "neg-prompt"):
        assert rows[f"{how} cfg 5"]["psnr_db"] >= rows["plain cfg 5"]["psnr_db"] + 3.0, how
    # the classifier's verdicts: what a user would see in the pictures
    assert all(r["looks_like"] in data.CAPTIONS for r in m["results"])
    for what in ("ddim", "exact", "null-text cfg 5", "neg-prompt cfg 5"):
        assert rows[what]["looks_like"] == SOURCE, (what, rows[what]["looks_like"])
    for what in ("edit plain cfg 5", "edit neg-prompt cfg 5"):
        assert rows[what]["looks_like"] == TARGET, (what, rows[what]["looks_like"])
    assert (out / "demo.png").is_file() and (out / "source.png").is_file()
    assert "total" in p.stdout and "| exact |" in p.stdout            # the printed table
