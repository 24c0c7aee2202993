"""The real ComfyUI host, in process: boot once, load the pack as ComfyUI does, execute API prompts.

Nothing here is mocked: ``nodes.init_extra_nodes`` loads ``custom_nodes/ddim-inversion`` (the setup links
the repo there), ``execution.validate_prompt`` validates and ``execution.PromptExecutor`` executes, exactly
as a headless /prompt run does. Outputs of any node (tensors included) are read from the executor's cache.
"""
from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from tools.comfy_host import boot as boot_host, comfy_path  # noqa: E402,F401  (comfy_path: for server.py)
_STATE: dict = {}


def boot():
    """Import ComfyUI (CPU), load its extra nodes and our pack. Idempotent; returns the ``nodes`` module."""
    if "nodes" in _STATE:
        return _STATE["nodes"]
    tmp = Path(tempfile.mkdtemp(prefix="ddiminv-host-"))
    nodes = boot_host(tmp, cpu=True)
    # test-only fixture nodes (tests/support/nodes_*.py export TEST_NODES); never part of the pack
    import importlib
    for f in sorted((ROOT / "tests" / "support").glob("nodes_*.py")):
        mod = importlib.import_module(f"tests.support.{f.stem}")
        nodes.NODE_CLASS_MAPPINGS.update(mod.TEST_NODES)
    for node_id in ("DDIMInvert", "DDIMInvSampler", "DDIMInvVAEEncode", "DDIMInvTrajectoryPreview"):
        if node_id not in nodes.NODE_CLASS_MAPPINGS:
            raise RuntimeError(f"ComfyUI did not register {node_id}; see the log above for the import error")
    _STATE["nodes"] = nodes
    _STATE["tmp"] = tmp
    return nodes


def pack_module():
    """The pack's module object as ComfyUI loaded it (classes from here match the nodes' own)."""
    boot()
    for name, mod in sys.modules.items():
        f = getattr(mod, "__file__", None) or ""
        if f.endswith(os.path.join("ddim-inversion", "__init__.py")):
            return mod
    raise RuntimeError("the ddim-inversion pack module is not loaded")


def pack_submodule(dotted: str):
    """e.g. pack_submodule('inversion.methods') -> the pack's own copy of that module."""
    import importlib
    return importlib.import_module(pack_module().__name__ + "." + dotted)


def output_dir() -> Path:
    boot()
    return _STATE["tmp"] / "output"


def input_dir() -> Path:
    boot()
    return _STATE["tmp"] / "input"


class _Server:
    """The minimal server object PromptExecutor reports to (records messages)."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


class Result:
    def __init__(self, executor, server, prompt):
        self.executor = executor
        self.server = server
        self.prompt = prompt

    @property
    def success(self) -> bool:
        return bool(self.executor.success)

    def outputs(self, node_id: str) -> list:
        """The node's return values (one entry per output socket)."""
        entry = self.executor.caches.outputs.get(str(node_id))
        if entry is None:
            raise KeyError(f"node {node_id} has no cached output (did it run?)")
        outs = entry.outputs if hasattr(entry, "outputs") else entry
        return [o[0] if isinstance(o, list) and len(o) == 1 else o for o in outs]

    def ui(self, node_id: str) -> dict:
        return self.executor.history_result["outputs"].get(str(node_id), {})

    def error(self) -> dict | None:
        for event, data in self.executor.status_messages:
            if event in ("execution_error", "execution_interrupted"):
                return data
        return None


def validate(prompt: dict):
    """ComfyUI's own prompt validation: returns (ok, error, outputs_to_execute, node_errors)."""
    boot()
    import execution
    return asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))


def run(prompt: dict, executor=None, expect_success: bool = True) -> Result:
    """Validate and execute an API-format prompt with the real executor."""
    boot()
    import execution
    ok = validate(prompt)
    if not ok[0]:
        raise AssertionError(f"prompt failed validation: {ok[1]} {ok[3]}")
    server = _Server()
    if executor is None:
        executor = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC,
                                            cache_args={"lru": 0, "ram": 0})
    else:
        executor.server = server
    executor.execute(prompt, str(uuid.uuid4()), {}, ok[2])
    res = Result(executor, server, prompt)
    if expect_success and not res.success:
        raise AssertionError(f"prompt failed: {res.error()}")
    return res
