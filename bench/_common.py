"""Shared helpers for the bench scripts: boot the real ComfyUI host in-process, reach the pack's and the
core's node classes, time things, and write JSON. Nothing here is mocked.

``boot(cpu=True)`` mirrors tests/support/host.py (which always forces ``--cpu``) but lets bench/gpu.py boot
on CUDA. It loads custom nodes exactly as ComfyUI does, so the pack must be linked into
``<ComfyUI>/custom_nodes/ddim-inversion`` (``tools/setup.sh``).
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
_STATE: dict = {}

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def boot(cpu: bool = True):
    """Import ComfyUI (``--cpu`` when ``cpu``), load its extra nodes and our pack; returns ``nodes``."""
    if "nodes" in _STATE:
        return _STATE["nodes"]
    if cpu:  # the tests' harness does exactly this; share its state when it is importable
        from tests.support import host
        _STATE["nodes"] = host.boot()
        _STATE["pack"] = host.pack_submodule
        return _STATE["nodes"]
    from tools.comfy_host import boot as boot_host
    nodes = boot_host(Path(tempfile.mkdtemp(prefix="ddiminv-bench-")), cpu=False)
    _STATE["nodes"] = nodes
    return nodes


def pack(dotted: str):
    """The pack's own copy of a submodule (e.g. 'nodes.invert', 'inversion.methods')."""
    import importlib
    for name, mod in sys.modules.items():
        f = getattr(mod, "__file__", None) or ""
        if f.endswith(os.path.join("ddim-inversion", "__init__.py")):
            return importlib.import_module(mod.__name__ + "." + dotted)
    raise RuntimeError("the ddim-inversion pack is not loaded; call boot() first")


def core(node_id: str):
    return _STATE["nodes"].NODE_CLASS_MAPPINGS[node_id]


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


def machine() -> dict:
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        info["cpu"] = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.split("\n")[:12]
    except Exception:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import comfyui_version
        info["comfyui"] = comfyui_version.__version__
    except Exception:
        pass
    return info
