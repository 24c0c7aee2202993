"""Where things are: the repository, its git-ignored cache, and the ComfyUI host (no ComfyUI import)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"
MODELS = CACHE / "models"
PACK_LINK_NAME = "ddim-inversion"  # setup links the repository as <ComfyUI>/custom_nodes/ddim-inversion


class HostError(RuntimeError):
    """ComfyUI or the pack is not where setup puts them; the message names the fix."""


def comfy_path() -> Path:
    """$COMFYUI_PATH, else the folder `make setup` recorded in .cache/comfyui_path, else .comfyui/."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return Path(env).resolve()
    cached = CACHE / "comfyui_path"
    if cached.exists():
        return Path(cached.read_text().strip())
    return ROOT / ".comfyui"


def put_comfy_on_path() -> Path:
    """Make ``import comfy`` work (without booting a host); returns the ComfyUI folder."""
    cp = comfy_path()
    if not (cp / "main.py").exists():
        raise HostError(f"ComfyUI not found at {cp}: run `make setup` (or set COMFYUI_PATH to your ComfyUI folder)")
    if str(cp) not in sys.path:
        sys.path.insert(0, str(cp))
    return cp
