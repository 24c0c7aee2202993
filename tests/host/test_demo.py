"""`make demo`'s script, end to end on the built-in learned model, with few steps (the full run is what the
README's table records; tests/unit/test_demo_table.py keeps the two in step).

Bars: measured on this run's settings (3 steps, methods ddim and exact, cfg 5, CPU; PSNR in dB against the
source, VAE ceiling 28.39): ddim 21.45, exact 28.39 (= the ceiling), plain cfg 5 16.73, null-text cfg 5 21.76,
neg-prompt cfg 5 21.45. A reconstruction bar sits 1.8 dB under the measured PSNR (1.5x the measured squared
error). The classifier said 'a cat' (the source) for every reconstruction but the plain cfg-5 one.

The edit row is the scenes model's colour swap of a held-out scene (3 steps here): its ground-truth column must
read right on bench/edit.py's own readers (accuracy 1, IoU 0.99 measured) and its source column wrong; the
methods' scores are the scenes model's while it trains, so only their ranges are held. Seen red with the
ground-truth column scored on the source image (accuracy 0.0).
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
EDIT_STEPS = 3


def test_demo_runs_every_part_and_writes_pictures_and_metrics(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "demo.py"), "--steps", str(STEPS), "--methods",
                        "ddim,exact", "--edit-steps", str(EDIT_STEPS), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for stream in (p.stdout, p.stderr):          # what Python prints for an exception, handled or not
        assert "Traceback (most recent call last)" not in stream, stream[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"] == "learned" and m["steps"] == STEPS and m["cfg"] == 5.0
    assert (m["source_prompt"], m["target_prompt"]) == (SOURCE, TARGET)
    rows = {r["what"]: r for r in m["results"]}
    assert [r["what"] for r in m["results"] if r["kind"] == "reconstruction"] == list(PSNR)
    assert not [r for r in m["results"] if r["kind"] == "edit"]   # the edit row is the scenes model's (below)
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
    assert (out / "demo.png").is_file() and (out / "source.png").is_file()
    assert "total" in p.stdout and "| exact |" in p.stdout            # the printed table
    scenes_edit_row_is_scored(m["scenes_edit"], out, p.stdout)


def scenes_edit_row_is_scored(s: dict, out: Path, stdout: str) -> None:
    """The edit row: a held-out scene's colour swap, source | ground truth | plain | ours, each scored."""
    assert s["steps"] == EDIT_STEPS and s["cfg"] == 5.0 and s["checkpoint"] == "ddiminv-scenes-sd15.safetensors"
    assert s["source_prompt"] != s["target_prompt"] and 15.0 < s["gt_ceiling_db"] < 40.0, s
    cols = {c["what"]: c for c in s["columns"]}
    assert list(cols) == ["source", "ground truth", "ddim (plain)", "exact, ddim replay"]
    gt, src = cols["ground truth"], cols["source"]
    # the exact answer reads right on the benchmark's own readers; the unedited source reads wrong
    assert gt["accuracy"] == 1.0 and gt["iou"] >= 0.95 and gt["gt_psnr_db"] == 100.0, gt   # measured IoU 0.99
    assert src["accuracy"] == 0.0 and src["iou"] <= 0.1 and src["bg_psnr_db"] == 100.0, src
    assert gt["bg_psnr_db"] == 100.0 and src["gt_psnr_db"] < 30.0       # a colour swap keeps the background only
    for what in ("ddim (plain)", "exact, ddim replay"):
        c = cols[what]
        assert c["accuracy"] in (0.0, 1.0) and 0.0 <= c["iou"] <= 1.0 and c["seconds"] > 0, c
        assert 5.0 < c["bg_psnr_db"] < 100.0 and 5.0 < c["gt_psnr_db"] < 100.0, c   # a model's picture, measured
    assert (out / "scenes_edit.png").is_file() and (out / "scenes_ground_truth.png").is_file()
    assert "| ground truth | 100% |" in stdout
