"""Boot a real ComfyUI in this process, the way ``main.py`` does: the one copy shared by the tests
(tests/support/host.py), the benchmarks (bench/_common.py) and the demo (tools/demo.py)."""
from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class HostError(RuntimeError):
    """ComfyUI or the pack is not where setup puts them; the message names the fix."""


def comfy_path() -> Path:
    """$COMFYUI_PATH, else the folder `make setup` recorded, else .comfyui/."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return Path(env).resolve()
    cached = ROOT / ".cache" / "comfyui_path"
    if cached.exists():
        return Path(cached.read_text().strip())
    return ROOT / ".comfyui"


def boot(workdir: Path, cpu: bool = True, user_model_paths: bool = False):
    """Import ComfyUI (``--cpu`` when ``cpu``), point its output/temp/input folders into ``workdir``,
    load its extra nodes and the custom nodes (this pack included). Returns the ``nodes`` module."""
    cp = comfy_path()
    if not (cp / "main.py").exists():
        raise HostError(f"ComfyUI not found at {cp}: run `make setup` (or set COMFYUI_PATH to your ComfyUI folder)")
    if str(cp) not in sys.path:
        sys.path.insert(0, str(cp))
    argv, sys.argv = sys.argv, [str(cp / "main.py")] + (["--cpu"] if cpu else [])
    try:
        import comfy.options
        comfy.options.enable_args_parsing()
        import utils.extra_config  # as main.py: binds ComfyUI's `utils` package before comfy/utils.py shadows it
        import comfy.model_management  # noqa: F401  (reads the args)
    finally:
        sys.argv = argv
    import folder_paths
    extra = cp / "extra_model_paths.yaml"
    if user_model_paths and extra.exists():  # your model folders, as `python main.py` would see them
        utils.extra_config.load_extra_path_config(str(extra))
    for sub in ("output", "temp", "input"):
        (Path(workdir) / sub).mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(Path(workdir) / "output"))
    folder_paths.set_temp_directory(str(Path(workdir) / "temp"))
    folder_paths.set_input_directory(str(Path(workdir) / "input"))
    import nodes
    if not (cp / "custom_nodes" / "ddim-inversion").exists():
        raise HostError(f"the pack is not linked at {cp / 'custom_nodes' / 'ddim-inversion'}: run `make setup`")
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True))
    if "DDIMInvert" not in nodes.NODE_CLASS_MAPPINGS:
        raise HostError("ComfyUI did not register the ddim-inversion nodes; see the import error in the log above")
    return nodes
