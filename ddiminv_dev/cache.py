"""One cached-build helper for every generated model file (tiny checkpoints, the learned model).

A file is *current* when its safetensors metadata carries the expected version. Building is
lock-and-check (process-safe: parallel test workers, a server and the demo may ask at once), seeded, and
written atomically (temporary file + rename), so a crash never leaves a half-written file behind.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Callable

import torch

VERSION_KEY = "ddiminv_version"


@contextlib.contextmanager
def file_lock(path: Path):
    """Hold an exclusive lock on ``<path>.lock`` (created beside ``path``) for the block: processes that build the
    same cache file (parallel test workers, a server, the demo) take turns, and the second finds it built."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / (path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def torch_save_atomic(obj, path: Path) -> None:
    """``torch.save(obj, path)`` through a temporary file of this process, renamed over ``path``: a reader never sees
    a half-written file, and two writers never share a temporary file."""
    path = Path(path)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
    with file_lock(path):
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
    return path
