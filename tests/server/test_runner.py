"""tools/runner.py end to end: a real ComfyUI server, a folder of PNGs, the example workflow (tiny checkpoint,
2 steps), results.json/csv, downloads, resume after a crash (pre-written results and a SIGKILL mid-run), an
unreachable server. Several servers: tools/ray_batch.py (tests/server/test_ray_batch.py)."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from ddiminv_dev import tiny_checkpoint as checkpoint

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "tools" / "runner.py"
EXAMPLE = ROOT / "example_workflows" / "api" / "invert_and_reconstruct.api.json"
SIZE = 64
N_IMAGES = 3

pytestmark = pytest.mark.slow


def own_workflow() -> dict:
    """The same chain as the example workflow, for when it is absent."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}, "_meta": {"title": "Load Image"}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"},
              "_meta": {"title": "Load Checkpoint"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo", "clip": ["2", 1]},
              "_meta": {"title": "Source prompt"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 1]},
              "_meta": {"title": "Negative prompt"}},
        "5": {"class_type": "DDIMInvVAEEncode", "inputs": {"pixels": ["1", 0], "vae": ["2", 2], "fit": "pad"},
              "_meta": {"title": "VAE Encode (Inversion)"}},
        "6": {"class_type": "DDIMInvert", "inputs": {
            "model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0], "latent": ["5", 0], "steps": 20,
            "cfg": 1.0, "scheduler": "ddim_uniform", "method": "exact"}, "_meta": {"title": "DDIM Invert"}},
        "7": {"class_type": "DDIMInvSampler", "inputs": {
            "model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0], "trajectory": ["6", 2], "cfg": 1.0},
            "_meta": {"title": "Inverted-Latent Sampler"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["2", 2]},
              "_meta": {"title": "VAE Decode"}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "ddiminv/reconstruction"},
              "_meta": {"title": "Save Image"}},
    }


@pytest.fixture(scope="module")
def workflow(tmp_path_factory) -> Path:
    if EXAMPLE.exists():
        return EXAMPLE
    p = tmp_path_factory.mktemp("wf") / "invert_and_reconstruct.api.json"
    p.write_text(json.dumps(own_workflow(), indent=1))
    return p


def make_images(folder: Path, n: int = N_IMAGES) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        im = Image.new("RGB", (SIZE, SIZE), (40 * i, 255 - 50 * i, 90))
        for x in range(0, SIZE, 8):  # a little structure
            for y in range(SIZE):
                im.putpixel((x, y), (255, 255 - 40 * i, 30 * i))
        name = f"img{i}.png"
        im.save(folder / name)
        names.append(name)
    return names


def runner_cmd(workflow: Path, images: Path, out: Path, server, extra=()) -> list:
    wf = json.loads(workflow.read_text())
    invert_id = next(k for k, n in wf.items() if n["class_type"] == "DDIMInvert")
    cmd = [sys.executable, str(RUNNER), "--workflow", str(workflow), "--images", str(images), "--out", str(out),
           "--set", f"CheckpointLoaderSimple.ckpt_name={checkpoint.CKPT_NAME}",  # by class_type
           "--set", f"{invert_id}.steps=2",                                       # by node id
           "--set", "Load Image.image=placeholder.png",                           # by title (replaced per image)
           "--timeout", "120", "--server", server]
    return cmd + list(extra)


def run_runner(cmd, timeout=150):
    t0 = time.monotonic()
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    return r, time.monotonic() - t0


def read_results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())["images"]


def history_count(server) -> int:
    return len(server.get("/history") or {})


def check_outputs(out: Path, name: str, rec: dict):
    stem = Path(name).stem
    assert rec["outputs"], rec
    pngs = [out / stem / f for f in rec["outputs"] if f.endswith(".png")]
    assert pngs, rec["outputs"]
    for p in pngs:
        assert p.is_file() and p.stat().st_size > 0, p
    # the reconstruction (SaveImage) has the source size
    with Image.open(out / stem / next(f for f in rec["outputs"] if "reconstruction" in f)) as im:
        assert im.size == (SIZE, SIZE)


def test_runner_one_server_and_resume(server, workflow, tmp_path):
    t_start = time.monotonic()
    s1 = server
    images = tmp_path / "images"
    names = make_images(images)
    out = tmp_path / "out"
    h_start = history_count(s1)

    # ---------------------------------------------------------------- a full run
    r, secs = run_runner(runner_cmd(workflow, images, out, s1.url))
    assert r.returncode == 0, f"rc {r.returncode}\nstderr:\n{r.stderr}\n{s1.log_tail(30)}"
    recs = read_results(out)
    assert sorted(recs) == names
    for n in names:
        assert recs[n]["status"] == "ok", recs[n]
        assert isinstance(recs[n]["seconds"], float) and recs[n]["seconds"] > 0
        check_outputs(out, n, recs[n])
        # the VAE Encode (Inversion) UI text (its PSNR ceiling) is recorded, and its dB figure
        assert any("dB" in t for ts in recs[n]["texts"].values() for t in ts), recs[n]["texts"]
        assert isinstance(recs[n]["figure"], float)
    assert {recs[n]["server"] for n in names} == {s1.url}
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [row["image"] for row in rows] == names
    assert all(row["status"] == "ok" and row["server"] == s1.url and row["outputs"] and
               float(row["seconds"]) > 0 and "dB" in row["texts"] for row in rows), rows
    for n in names:
        assert f"/{N_IMAGES}] {n} ok" in r.stderr, r.stderr
    assert history_count(s1) - h_start == N_IMAGES
    print(f"full run: {secs:.1f}s for {N_IMAGES} images\n{r.stderr}")

    # ---------------------------------------------------------------- resume: results written by a "crash"
    doc = json.loads((out / "results.json").read_text())
    first_ids = {n: recs[n]["prompt_id"] for n in names}
    doc["images"][names[1]].update(status="error", error="simulated crash")
    del doc["images"][names[2]]
    (out / "results.json").write_text(json.dumps(doc))
    before = history_count(s1)
    r, secs = run_runner(runner_cmd(workflow, images, out, s1.url))
    assert r.returncode == 0, r.stderr
    assert f"resuming: {N_IMAGES - 2} image(s) already ok" in r.stderr, r.stderr
    assert history_count(s1) - before == 2      # only the two unfinished images ran
    recs = read_results(out)
    assert all(recs[n]["status"] == "ok" for n in names)
    assert recs[names[0]]["prompt_id"] == first_ids[names[0]]                  # untouched
    for n in (names[1], names[2]):
        assert recs[n]["prompt_id"] != first_ids[n] and "error" not in (recs[n]["error"] or "")
        check_outputs(out, n, recs[n])
    print(f"resume run: {secs:.1f}s")

    # ---------------------------------------------------------------- an unreachable server: usage error
    dead = f"http://127.0.0.1:{_closed_port()}"
    r, _ = run_runner(runner_cmd(workflow, images, tmp_path / "out_dead", dead))
    assert r.returncode == 2 and f"{dead} is unreachable" in r.stderr and "--port" in r.stderr, r.stderr

    # ---------------------------------------------------------------- resume after SIGKILL mid-run
    out2 = tmp_path / "out_killed"
    proc = subprocess.Popen(runner_cmd(workflow, images, out2, s1.url), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=str(ROOT), start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:  # wait for the first finished image, then crash hard
            if (out2 / "results.json").exists():
                try:
                    done = [n for n, rec in read_results(out2).items() if rec["status"] == "ok"]
                except (json.JSONDecodeError, OSError):  # never happens with atomic writes; tolerate anyway
                    done = []
                if done:
                    break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(10)
    killed = read_results(out2)  # must be valid JSON: writes are atomic
    ok_before = {n: rec["prompt_id"] for n, rec in killed.items() if rec["status"] == "ok"}
    assert 1 <= len(ok_before) < N_IMAGES, killed
    r, secs = run_runner(runner_cmd(workflow, images, out2, s1.url))
    assert r.returncode == 0, r.stderr
    assert f"resuming: {len(ok_before)} image(s) already ok" in r.stderr, r.stderr
    recs = read_results(out2)
    assert all(recs[n]["status"] == "ok" for n in names)
    for n, pid in ok_before.items():
        assert recs[n]["prompt_id"] == pid
    for n in names:
        check_outputs(out2, n, recs[n])
    total = time.monotonic() - t_start
    print(f"kill+resume run: {secs:.1f}s; whole test {total:.1f}s")


def _closed_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
