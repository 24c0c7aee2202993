"""The bench scripts run (shrunk) and print their ratios. No timing assertions: timings are reported, not tested."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def _run(args, timeout=240):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.run([PY, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, f"{args} exited {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.mark.skipif(not (ROOT / ".comfyui" / "main.py").exists() and not os.environ.get("COMFYUI_PATH"),
                    reason="ComfyUI host not set up (tools/setup.sh)")
def test_gpu_bench_cpu_smoke():
    out = _run(["bench/gpu.py", "--cpu-smoke"])
    for kind in ("sd15", "sdxl"):
        assert f"{kind} ratios:" in out
    assert "ours/ksampler" in out and "ours/raw" in out
    assert (ROOT / "bench" / "out" / "gpu_cpu_smoke.json").exists()


@pytest.mark.skipif(not (ROOT / ".comfyui" / "main.py").exists() and not os.environ.get("COMFYUI_PATH"),
                    reason="ComfyUI host not set up (tools/setup.sh)")
def test_speed_bench_quick():
    out = _run(["bench/speed.py", "--quick"])
    assert "ratios:" in out and "ours/ksampler" in out and "ours/raw" in out
    assert "capture overhead" in out
    assert (ROOT / "bench" / "out" / "speed_quick.json").exists()
