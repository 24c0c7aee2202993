"""The bench scripts run (shrunk) and print their ratios. No timing assertions: timings are reported, not tested."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # boots ComfyUI or runs a bench/.ci script: not in `make test-fast`

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def _run(args, timeout=900):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.run([PY, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, (f"{args} exited {p.returncode}\n--- stdout\n{p.stdout[-3000:]}"
                              f"\n--- stderr\n{p.stderr[-3000:]}")
    return p.stdout


@pytest.mark.skipif(not (ROOT / ".comfyui" / "main.py").exists() and not os.environ.get("COMFYUI_PATH"),
                    reason="ComfyUI host not set up (tools/setup.sh)")
def test_gpu_bench_cpu_smoke():
    result = ROOT / "bench" / "out" / "gpu_cpu_smoke.json"
    result.unlink(missing_ok=True)  # the script must write it again
    out = _run(["bench/gpu.py", "--cpu-smoke"])
    for kind in ("sd15", "sdxl"):
        assert f"{kind} ratios:" in out
    assert "ours/ksampler" in out and "ours/raw" in out
    assert "sd15 null-text (2 steps x 2 iterations, cfg 7.5)" in out
    results = json.loads(result.read_text())["results"]
    for kind in ("sd15", "sdxl"):
        for cfg, entry in results[kind]["by_cfg"].items():
            assert entry["ratios"]["ours/ksampler"] > 0 and entry["ratios"]["ours/raw"] > 0, (kind, cfg, entry)
    # issue 27's rows: the P2P/MasaCtrl edit on sd15 and the v_inject edit on the (tiny, in smoke) Flux
    assert "sd15 attention control (2 steps, cfg 7.5): p2p edit / plain edit" in out
    assert "flux v_inject (latent 8x8, cfg 1, window [0.0, 0.5]): v_inject edit / plain edit" in out
    att = results["sd15"]["attention"]
    assert att["p2p_sd15"]["p2p/plain"] > 0 and att["v_inject_flux"]["v_inject/plain"] > 0, att
    nt = results["sd15"]["nulltext"]
    assert nt["backward"] == 2 * 2 and nt["evaluations"] == 2 * (1 + 2 + 1), nt  # early_stop 0: all iterations


@pytest.mark.skipif(not (ROOT / ".comfyui" / "main.py").exists() and not os.environ.get("COMFYUI_PATH"),
                    reason="ComfyUI host not set up (tools/setup.sh)")
def test_speed_bench_quick():
    result = ROOT / "bench" / "out" / "speed_quick.json"
    result.unlink(missing_ok=True)  # the script must write it again
    out = _run(["bench/speed.py", "--quick"])
    assert "ratios:" in out and "ours/ksampler" in out and "ours/raw" in out
    assert "capture overhead" in out
    res = json.loads(result.read_text())["result"]
    for cfg, entry in res["by_cfg"].items():
        assert entry["ratios"]["ours/ksampler"] > 0 and entry["ratios"]["ours/raw"] > 0, (cfg, entry)
    assert res["capture"]["max_abs_diff_bare_vs_core"] < 1e-4, res["capture"]  # the bare loop computes the same
    assert "p2p edit / plain edit" in out and res["attention"]["p2p/plain"] > 0
    assert "v_inject edit / plain edit" in out and res["attention_flux"]["v_inject/plain"] > 0   # the tiny Flux
    # what the source branch evaluates (not timed): --quick is 3 steps at cfg 7.5. p2p: the cond chunk at step 0
    # (self window 0..0.6 -> int(1.8) = 1 step) = 1 + 1/3 * 1/2; masactrl (window 0.08..1 -> steps 0..2) both
    # chunks every step = 2; v_inject at cfg 1, window 0..0.5 -> step 0 of 3 = 1 + 1/3
    assert res["attention"]["evaluations_per_step"] == {"p2p": round(1 + 1 / 6, 2), "masactrl": 2.0}
    assert res["attention_flux"]["evaluations_per_step"] == round(1 + 1 / 3, 2)


@pytest.mark.skipif(not (ROOT / ".comfyui" / "main.py").exists() and not os.environ.get("COMFYUI_PATH"),
                    reason="ComfyUI host not set up (tools/setup.sh)")
def test_learned_bench_quick():
    result = ROOT / "bench" / "out" / "learned_quick.json"
    result.unlink(missing_ok=True)  # the script must write it again
    _run(["bench/learned.py", "--quick"])
    rows = json.loads(result.read_text())["rows"]
    rt = {(r["method"], r["cfg"]): r for r in rows if r["part"] == "round_trip"}
    assert rt[("exact", 7.5)]["latent_rel_error"] < 1e-5          # BDIA replay: exact at any cfg
    assert rt[("ddim/predicted", 1.0)]["latent_rel_error"] < rt[("ddim/current", 1.0)]["latent_rel_error"]
    guided = {r["method"]: r for r in rows if r["part"] == "guided_reconstruction"}
    assert guided["null_text"]["latent_rel_error"] < guided["plain"]["latent_rel_error"] / 5
    assert guided["null_text"]["backward"] > 0 and guided["plain"]["backward"] == 0
    edits = [r for r in rows if r["part"] == "edit"]
    assert len(edits) == 4 and all(0.0 <= r["edit_success"] <= 1.0 for r in edits)


@pytest.mark.skipif(not (ROOT / ".comfyui" / "main.py").exists() and not os.environ.get("COMFYUI_PATH"),
                    reason="ComfyUI host not set up (tools/setup.sh)")
def test_edit_bench_smoke_runs_every_row(tmp_path):
    """bench/edit.py end to end, one thread, on both scenes models (the committed SD1.5 weights; the DiT's
    committed weights, else its seeded untrained stand-in): every METHODS row that applies to the model (the
    refined one included; FlowEdit on the flow DiT only, null-text and negative-prompt on the SD1.5 model only) on
    one item of an object edit and one of a background edit (the two scoring paths; shape reading is unit-tested
    on ground truth), scored, timed with its shared costs, drawn; every row names its model."""
    import math

    from bench import edit as BE
    from ddiminv_dev.scenes import build_dit
    out = _run(["bench/edit.py", "--scenes", "1", "--steps", "2", "--refine", "2", "--nulltext-iterations", "1",
                "--kinds", "colour,background", "--threads", "1", "--out", str(tmp_path)])
    assert f"a perfect item (infinite PSNR) counts as {BE.PSNR_CAP:g} dB" in out
    data = json.loads((tmp_path / "edit.json").read_text())
    assert data["scheduler"] == BE.SCHED and data["refine"] == 2 and data["psnr_cap_db"] == BE.PSNR_CAP
    models = data["models"]
    assert list(models) == list(BE.MODELS) == ["scenes-sd15", "scenes-dit"]
    assert models["scenes-sd15"]["family"] == "vp" and models["scenes-dit"]["family"] == "flow"
    assert models["scenes-dit"]["stand_in"] is (not build_dit.has_weights()) and not models["scenes-sd15"]["stand_in"]
    assert data["flowedit"]["n_max"] == 1 and data["flowedit"]["seed"] == 0
    assert "scenes-dit (flow): left out (do not apply): null-text, negative-prompt" in out
    assert "scenes-sd15 (vp): left out (do not apply): flowedit" in out
    kinds = ("colour", "background")
    rows = {(r["model"], r["edit"], r["method"]): r for r in data["rows"]}
    assert list(rows) == [(m, k, x) for m in BE.MODELS for k in kinds for x in BE.METHODS
                          if BE.applies(x, models[m]["family"])]
    assert ("scenes-dit", "colour", "flowedit") in rows and ("scenes-dit", "colour", "null-text") not in rows
    for key, r in rows.items():
        assert r["n"] == 1 and 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["iou"] <= 1.0, (key, r)
        assert 0.0 <= r["bg_psnr"] <= BE.PSNR_CAP and 0.0 <= r["gt_psnr"] <= BE.PSNR_CAP, (key, r)  # uint8: >= 0 dB
        assert math.isfinite(r["gt_ceiling"]) and r["seconds"] >= r["shared_seconds"] > 0.0, (key, r)
        latent = "latent-refined" if r["method"] == "exact from refined latent" else "latent"
        assert {latent, "cond-target", "cond-negative"} <= set(r["charged"]), (key, r["charged"])
        assert ("latent-refined" in r["charged"]) == (latent == "latent-refined"), (key, r["charged"])
    for m in BE.MODELS:
        for k in kinds:
            assert "traj-exact-refined" in rows[(m, k, "exact from refined latent")]["charged"]
            assert not any(c.startswith("traj") for c in rows[(m, k, "sdedit 0.6 (core KSampler)")]["charged"])
            ceil = models[m]["source_ceilings_db"][k]
            assert set(ceil) == {"latent", "latent-refined"} and ceil["latent-refined"] >= ceil["latent"], (m, ceil)
            assert f"{k:10s} source VAE ceiling: latent " in out
    for k in kinds:
        assert "traj-ddim" in rows[("scenes-sd15", k, "null-text")]["charged"]   # the inversion it starts from
        fe = rows[("scenes-dit", k, "flowedit")]["charged"]                        # inversion-free
        assert {"cond-source", "cond-target", "latent"} <= set(fe) and not any(c.startswith("traj") for c in fe), fe
    assert (tmp_path / "edit_grid.png").stat().st_size > 0 and (tmp_path / "edit_plot.png").stat().st_size > 0
