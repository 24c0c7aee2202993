"""The one in-process ComfyUI harness: boot a real host, load the pack as ComfyUI does, run API prompts.

Tests, benchmarks and the demo all use this module. Nothing is mocked: ``nodes.init_extra_nodes`` loads
``custom_nodes/ddim-inversion`` (setup links the repository there), ``execution.validate_prompt``
validates and ``execution.PromptExecutor`` executes, exactly as a headless ``/prompt`` run does.

Only stable entry points are used (they exist from ComfyUI 0.3.75 through 0.33.x): ``init_extra_nodes``,
``validate_prompt``, ``PromptExecutor(server, cache_type, cache_args).execute(...)``, ``history_result``
and ``status_messages``. Two things that changed are probed rather than assumed:

* ``cache_args`` gained ``ram_inactive`` (0.33): it is always passed (older cores ignore it);
* the output cache's ``get`` became a coroutine (0.33) with a synchronous ``get_local``: :func:`cached_output`
  uses ``get_local`` when it exists.
"""
from __future__ import annotations

import asyncio
import importlib
import os
import sys
import tempfile
import uuid
from pathlib import Path

from .paths import PACK_LINK_NAME, ROOT, HostError, comfy_path, put_comfy_on_path

PACK_NODES = ("DDIMInvVAEEncode", "DDIMInvert", "DDIMInvNullText", "DDIMInvSampler", "DDIMInvTrajectoryPreview",
              "DDIMInvAttentionControl", "DDIMInvAttentionPrompts")
FIXTURE_MODULES = ("gmm_nodes", "hardening_nodes", "preview_nodes", "tiny_nodes")
CACHE_ARGS = {"lru": 0, "ram": 0, "ram_inactive": 0}
_STATE: dict = {}

__all__ = ["HostError", "ROOT", "boot", "pack_module", "pack_submodule", "run", "validate",
           "new_executor", "execute", "cached_output", "Result", "output_dir", "input_dir", "comfy_path"]


def import_comfy(cpu: bool = True) -> Path:
    """Import ComfyUI's modules with its command-line arguments parsed as ``main.py [--cpu]`` would, without
    loading any nodes (enough to build models and files). Returns the ComfyUI folder."""
    cp = put_comfy_on_path()
    if "comfy.model_management" in sys.modules:
        return cp
    argv, sys.argv = sys.argv, [str(cp / "main.py")] + (["--cpu"] if cpu else [])
    try:
        import comfy.options
        comfy.options.enable_args_parsing()
        import utils.extra_config  # noqa: F401  (as main.py: binds ComfyUI's `utils` package first)
        import comfy.model_management  # noqa: F401  (reads the args)
    finally:
        sys.argv = argv
    return cp


def boot(cpu: bool = True, workdir: Path | None = None, user_model_paths: bool = False, fixtures: bool = True):
    """Import ComfyUI the way ``main.py`` does, load its extra nodes and the custom nodes (this pack included).

    ``cpu`` passes ``--cpu``. ``workdir`` receives ComfyUI's output/temp/input folders (a fresh temporary
    folder by default). ``user_model_paths`` reads the host's ``extra_model_paths.yaml`` (your model folders,
    as ``python main.py`` sees them). ``fixtures`` registers the test-only nodes of
    :mod:`ddiminv_dev.fixtures` (never part of the pack). Idempotent; returns the ``nodes`` module.
    """
    if "nodes" in _STATE:
        if _STATE["cpu"] != bool(cpu):
            raise HostError(f"ComfyUI was already booted with cpu={_STATE['cpu']} in this process")
        if fixtures and not _STATE["fixtures"]:
            _register_fixtures(_STATE["nodes"])
        return _STATE["nodes"]
    cp = import_comfy(cpu)
    import folder_paths
    import utils.extra_config
    extra = cp / "extra_model_paths.yaml"
    if user_model_paths and extra.exists():
        utils.extra_config.load_extra_path_config(str(extra))
    work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="ddiminv-host-"))
    for sub in ("output", "temp", "input"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(work / "output"))
    folder_paths.set_temp_directory(str(work / "temp"))
    folder_paths.set_input_directory(str(work / "input"))
    import nodes
    if not (cp / "custom_nodes" / PACK_LINK_NAME).exists():
        raise HostError(f"the pack is not linked at {cp / 'custom_nodes' / PACK_LINK_NAME}: run `make setup`")
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True))
    missing = [n for n in PACK_NODES if n not in nodes.NODE_CLASS_MAPPINGS]
    if missing:
        raise HostError(f"ComfyUI did not register {missing}; see the import error in the log above")
    _STATE.update(nodes=nodes, cpu=bool(cpu), workdir=work, fixtures=False)
    if fixtures:
        _register_fixtures(nodes)
    return nodes


def _register_fixtures(nodes) -> None:
    for name in FIXTURE_MODULES:
        mod = importlib.import_module(f"ddiminv_dev.fixtures.{name}")
        nodes.NODE_CLASS_MAPPINGS.update(mod.TEST_NODES)
    _STATE["fixtures"] = True


def workdir() -> Path:
    boot()
    return _STATE["workdir"]


def output_dir() -> Path:
    return workdir() / "output"


def input_dir() -> Path:
    return workdir() / "input"


def pack_module():
    """The pack's package as ComfyUI loaded it (its classes are the ones the nodes use).

    Found by the file ComfyUI imported, ``<ComfyUI>/custom_nodes/ddim-inversion/__init__.py`` (a package):
    not by a suffix match, since pytest may also import the repository's ``__init__.py`` as a plain module.
    """
    if "pack" in _STATE:
        return _STATE["pack"]
    boot()
    want = os.path.abspath(os.path.join(str(comfy_path()), "custom_nodes", PACK_LINK_NAME, "__init__.py"))
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        spec = getattr(mod, "__spec__", None)
        if f and os.path.abspath(f) == want and spec is not None and spec.submodule_search_locations:
            _STATE["pack"] = mod
            return mod
    raise HostError(f"the ddim-inversion pack module ({want}) is not loaded")


def pack_submodule(dotted: str):
    """e.g. ``pack_submodule('inversion.methods')``: the pack's own copy of that module."""
    return importlib.import_module(pack_module().__name__ + "." + dotted)


# ---------------------------------------------------------------------------------------------- executing
class RecordingServer:
    """The server object PromptExecutor reports to: records every message."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


def new_executor(server=None):
    """A fresh ``PromptExecutor`` with the classic cache (what ``main.py --cache-classic`` makes)."""
    boot()
    import execution
    return execution.PromptExecutor(server or RecordingServer(), cache_type=execution.CacheType.CLASSIC,
                                    cache_args=dict(CACHE_ARGS))


def cached_output(ex, node_id: str):
    """A node's cached outputs (one entry per output socket, each a list over the node's batch)."""
    cache = ex.caches.outputs
    get = getattr(cache, "get_local", None) or cache.get
    entry = get(str(node_id))
    if entry is None:
        raise KeyError(f"node {node_id} has no cached output (did it run?)")
    return entry.outputs if hasattr(entry, "outputs") else entry


class Result:
    def __init__(self, ex, server, prompt):
        self.executor = ex
        self.server = server
        self.prompt = prompt

    @property
    def success(self) -> bool:
        return bool(self.executor.success)

    def outputs(self, node_id: str) -> list:
        """The node's return values (one entry per output socket)."""
        return [o[0] if isinstance(o, list) and len(o) == 1 else o for o in cached_output(self.executor, node_id)]

    def ui(self, node_id: str) -> dict:
        return self.executor.history_result["outputs"].get(str(node_id), {})

    def error(self) -> dict | None:
        for event, data in self.executor.status_messages:
            if event in ("execution_error", "execution_interrupted"):
                return data
        return None

    def error_text(self) -> str:
        return str((self.error() or {}).get("exception_message", ""))


def validate(prompt: dict):
    """ComfyUI's own prompt validation: returns (ok, error, outputs_to_execute, node_errors)."""
    boot()
    import execution
    return asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))


def execute(ex, prompt: dict, outputs=None, expect_success: bool = True) -> Result:
    """Validate ``prompt`` and execute it (or only ``outputs``) on executor ``ex``."""
    ok = validate(prompt)
    if not ok[0]:
        raise AssertionError(f"prompt failed validation: {ok[1]} {ok[3]}")
    server = getattr(ex, "server", None) or RecordingServer()
    ex.execute(prompt, str(uuid.uuid4()), {}, list(outputs) if outputs else ok[2])
    res = Result(ex, server, prompt)
    if expect_success and not res.success:
        raise AssertionError(f"prompt failed: {res.error()}")
    return res


def run(prompt: dict, executor=None, expect_success: bool = True) -> Result:
    """Validate and execute an API-format prompt on a fresh executor (or on ``executor``, whose cache then
    serves unchanged nodes, reporting to a new server)."""
    if executor is None:
        ex = new_executor()
    else:
        ex = executor
        ex.server = RecordingServer()
    return execute(ex, prompt, expect_success=expect_success)
