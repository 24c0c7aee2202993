"""One cached-build helper for every generated model file (tiny checkpoints, the learned model).

A file is *current* when its safetensors metadata carries the expected version. Building is
lock-and-check (process-safe: parallel test workers, a server and the demo may ask at once), seeded, and
written atomically (temporary file + rename), so a crash never leaves a half-written file behind.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Callable

import torch

VERSION_KEY = "ddiminv_version"


def is_current(path: Path, version: str) -> bool:
    if not Path(path).exists():
        return False
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(VERSION_KEY) == version
    except Exception:
        return False


def cached_build(path: Path, version: str, build: Callable[[], dict], description: str,
                 seed: int | None = None) -> Path:
    """``path`` (a safetensors file), building it with ``build()`` (-> state dict) unless it is current.

    With ``seed``, torch's global RNG is seeded for the build and restored afterwards.
    """
    path = Path(path)
    if is_current(path, version):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / (path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if is_current(path, version):
                return path
            from safetensors.torch import save_file
            with torch.random.fork_rng(devices=[]):
                if seed is not None:
                    torch.manual_seed(int(seed))
                sd = build()
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file(sd, str(tmp), metadata={VERSION_KEY: version, "format": "pt", "description": description})
            os.replace(tmp, path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path
