"""Shared helpers for the bench scripts: boot the real ComfyUI host in-process, reach the pack's and the
core's node classes, time things, and write JSON. Nothing here is mocked.

``boot(cpu=True)`` is ``ddiminv_dev.host.boot`` (bench/gpu.py boots on CUDA with ``cpu=False``). It loads
custom nodes exactly as ComfyUI does, so the pack must be linked into ``<ComfyUI>/custom_nodes/ddim-inversion``
(``tools/setup.sh``).
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
_STATE: dict = {}

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from ddiminv_dev import host  # noqa: E402


def boot(cpu: bool = True, fixtures: bool = True):
    """Import ComfyUI (``--cpu`` when ``cpu``), load its extra nodes, our pack and (``fixtures``) the fixture nodes.
    In a process that has booted the host already (tools/demo.py), it adopts that boot."""
    if "nodes" not in _STATE:
        _STATE["nodes"] = host.boot(cpu=cpu, fixtures=fixtures)
    return _STATE["nodes"]


def pack(dotted: str):
    """The pack's own copy of a submodule (e.g. 'nodes.invert', 'inversion.methods')."""
    return host.pack_submodule(dotted)


def core(node_id: str):
    return _STATE["nodes"].NODE_CLASS_MAPPINGS[node_id]


def call(node_id: str, *args, **kwargs):
    """Run a core node by id, V1 (``FUNCTION``) or V3 (``execute``): ComfyUI converts nodes between versions."""
    cls = core(node_id)
    fn = getattr(cls(), cls.FUNCTION) if getattr(cls, "FUNCTION", None) else cls.execute
    return fn(*args, **kwargs)


def first(out, i: int = 0):
    """Output ``i`` of a node call (V3 NodeOutput or a V1 tuple)."""
    return out.args[i] if hasattr(out, "args") else out[i]


# ---------------------------------------------------------------------------------------------- timing
def sync(device=None):
    import torch
    if torch.cuda.is_available() and (device is None or getattr(device, "type", str(device)) == "cuda"):
        torch.cuda.synchronize()


def timed(fn, device=None) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def interleaved(variants: dict, repeats: int, warmup: int = 1, device=None) -> dict:
    """Run every variant ``warmup`` times, then ``repeats`` rounds, one call of each per round (round-robin
    so drift hits all alike). Returns {name: {"median_s", "min_s", "all_s"}}."""
    import torch
    with torch.no_grad():
        for _ in range(warmup):
            for fn in variants.values():
                fn()
        times = {k: [] for k in variants}
        for _ in range(repeats):
            for k, fn in variants.items():
                times[k].append(timed(fn, device))
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "all_s": v} for k, v in times.items()}


# ---------------------------------------------------------------------------------------------- output
def clean(obj):
    """JSON-safe copy: NaN/Inf -> None, tensors -> lists, tuples -> lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if hasattr(obj, "tolist"):
        return clean(obj.tolist())
    return obj


def write_json(name: str, data: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    p = OUT / name
    p.write_text(json.dumps(clean(data), indent=1))
    return p


def add_threads_arg(ap) -> None:
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: stable on a shared/small CPU; OpenMP spinning on an "
                    "oversubscribed machine inflates times many-fold)")


def set_threads(n: int) -> None:
    import torch
    torch.set_num_threads(max(1, n))


def machine() -> dict:
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    lscpu = shutil.which("lscpu")
    if lscpu:
        info["cpu"] = subprocess.run([lscpu], capture_output=True, text=True).stdout.split("\n")[:12]  # noqa: S603
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import comfyui_version
        info["comfyui"] = comfyui_version.__version__
    except ImportError:
        info["comfyui"] = None
    return info
