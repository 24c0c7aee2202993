"""bench/vae_encode.py --quick runs and prints its ratios (no timing assertion: timings are reported, not tested)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # boots ComfyUI or runs a bench/.ci script: not in `make test-fast`

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not (ROOT / ".comfyui" / "main.py").exists() and not os.environ.get("COMFYUI_PATH"),
                    reason="ComfyUI host not set up (tools/setup.sh)")
def test_vae_encode_bench_quick():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, "bench/vae_encode.py", "--quick"], cwd=ROOT, capture_output=True, text=True,
                       timeout=240, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "ratios: time ours/core" in p.stdout and "memory ours/core" in p.stdout
    assert "latent identical to core VAE Encode: True" in p.stdout
    data = json.loads((ROOT / "bench" / "out" / "vae_encode_quick.json").read_text())
    assert data["latent_equal_to_core"] is True and data["ratios"]["time ours/core"] > 0
