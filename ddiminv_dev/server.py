"""Server tier: a real ComfyUI server (``main.py --cpu``) in a subprocess, driven over HTTP.

``start_server()`` launches ``<comfy>/main.py`` with the venv's python on a free 127.0.0.1 port, with
private input/output/temp/user directories and an extra_model_paths yaml that lists the tiny model folders
(the SD1.5 checkpoint and the SD3 diffusion model, CLIP-L and VAE: ddiminv_dev/tiny_checkpoint.py,
ddiminv_dev/tiny_flow_files.py), and waits until ``GET /object_info`` answers. The returned
``ServerHandle`` speaks the HTTP API with the stdlib only (urllib + json; psutil for ``rss()``).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from . import tiny_checkpoint as checkpoint
from . import tiny_flow_files
from .paths import ROOT, comfy_path

START_TIMEOUT = 120.0


class ServerError(RuntimeError):
    pass


# pytest-xdist worker k draws ports from its own slice, 20000 + 1000 k .. + 999 (k < 12): below Linux's ephemeral
# range (32768-60999, where the OS's own choices land) and above Ray's worker ports (10002-19999). Between
# ``free_port()`` and the server's bind another process could take the port; were it another worker's server,
# start_server's /object_info poll would get its answer and the test would talk to the wrong server.
PORT_BASE, PORT_SLICE, PORT_SLICES = 20000, 1000, 12
_port_offset = secrets.randbelow(PORT_SLICE)  # two runs on one machine start apart


def _can_bind(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now: the OS's choice, or under pytest-xdist
    (``PYTEST_XDIST_WORKER=gw<k>``) one from worker k's own slice, so two workers never pick the same port."""
    global _port_offset
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and worker[2:].isdigit():
        base = PORT_BASE + PORT_SLICE * (int(worker[2:]) % PORT_SLICES)
        for _ in range(PORT_SLICE):
            _port_offset = (_port_offset + 1) % PORT_SLICE
            if _can_bind(base + _port_offset):
                return base + _port_offset
        raise ServerError(f"no free port in {base}..{base + PORT_SLICE - 1} for xdist worker {worker}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_checkpoint(timeout: float = 600.0) -> Path:
    """The tiny checkpoint path; generates it (in a child process when ComfyUI is not imported here)."""
    path = checkpoint.MODEL_DIR / checkpoint.CKPT_NAME
    if checkpoint.is_built():
        return path
    if "comfy.model_base" in sys.modules:
        return checkpoint.tiny_checkpoint_path()
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from ddiminv_dev import host, tiny_checkpoint; "
            "host.import_comfy(); print(tiny_checkpoint.tiny_checkpoint_path())")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=timeout,
                       cwd=str(ROOT))
    if r.returncode != 0 or not checkpoint.is_built():
        raise ServerError(f"could not generate the tiny checkpoint (rc {r.returncode}):\n{r.stderr[-4000:]}")
    return path


class ServerHandle:
    def __init__(self, proc: subprocess.Popen, port: int, workdir: Path, log_path: Path):
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.workdir = workdir
        self.input_dir = workdir / "input"
        self.output_dir = workdir / "output"
        self.temp_dir = workdir / "temp"
        self.log_path = log_path
        self.client_id = uuid.uuid4().hex

    # ------------------------------------------------------------------ HTTP
    def request(self, method: str, path: str, body=None, timeout: float = 30.0):
        data = None
        headers = {}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise ServerError(f"{method} {path} -> HTTP {e.code}: {detail[:4000]}") from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw

    def get(self, path: str, timeout: float = 30.0):
        return self.request("GET", path, timeout=timeout)

    def object_info(self, node_class: str | None = None) -> dict:
        if node_class:
            return self.get("/object_info/" + urllib.parse.quote(node_class))
        return self.get("/object_info", timeout=60)

    def post_prompt(self, prompt: dict, extra_data: dict | None = None) -> str:
        body = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        out = self.request("POST", "/prompt", body)
        if out.get("node_errors"):
            raise ServerError(f"prompt rejected: {out['node_errors']}")
        return out["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 120.0, poll: float = 0.2) -> dict:
        """Poll /history/<id> until the prompt has finished; returns its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            hist = self.get(f"/history/{prompt_id}")
            entry = (hist or {}).get(prompt_id)
            if entry:  # ComfyUI adds the history entry when the prompt is done (success, error or interrupt)
                return entry
            time.sleep(poll)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 120.0) -> dict:
        """post_prompt + wait; raises with the error message if execution failed."""
        entry = self.wait(self.post_prompt(prompt), timeout)
        status = entry.get("status", {})
        if status.get("status_str") == "error":
            raise ServerError(f"prompt failed: {status.get('messages')}")
        return entry

    def interrupt(self):
        return self.request("POST", "/interrupt", {})

    def queue(self) -> dict:
        return self.get("/queue")

    def rss(self) -> int:
        import psutil
        return psutil.Process(self.proc.pid).memory_info().rss

    def log_tail(self, n: int = 80) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def _check_alive(self):
        if self.proc.poll() is not None:
            raise ServerError(f"ComfyUI exited with {self.proc.returncode}\n{self.log_tail()}")

    # ------------------------------------------------------------------ lifecycle
    def stop(self, timeout: float = 20.0):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout)
        log = getattr(self, "_log_file", None)
        if log is not None and not log.closed:
            log.close()
        if getattr(self, "remove_workdir", False):  # its inputs, a copy of every output, its log
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def write_extra_model_paths(path: Path) -> Path:
    models = checkpoint.MODEL_DIR.parent
    path.write_text(
        "ddiminv_tests:\n"
        f"    base_path: {json.dumps(str(models))}\n"
        f"    checkpoints: {json.dumps(checkpoint.MODEL_DIR.name)}\n"
        # the tiny SD3 files of ddiminv_dev/tiny_flow_files.py (flow_model workflow), same base folder
        + "".join(f"    {folder}: {json.dumps(folder)}\n" for folder in tiny_flow_files.FOLDERS)
    )
    return path


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the process that started it dies (Linux PR_SET_PDEATHSIG), so a
    server started by a Ray actor does not outlive a killed actor."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` itself listens on ``port``: an answer on the port may come from another process's
    server that took it first (another test run on this machine); True when psutil cannot tell."""
    try:
        import psutil
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except Exception:  # no psutil, or not allowed to look: rely on the answer
        return True
    return any(c.laddr and c.laddr.port == port and c.status == "LISTEN" for c in conns)


def start_server(extra_args=(), port: int | None = None, timeout: float = START_TIMEOUT,
                 workdir: Path | None = None, models: bool = True, cpu: bool = True, comfy=None,
                 die_with_parent: bool = False, remove_workdir: bool = False) -> ServerHandle:
    """Start ComfyUI in its own process group on 127.0.0.1 and wait for /object_info; see module doc.
    ``models``: the tiny test models' folders (generated when missing); ``cpu``: ``--cpu``; ``comfy``: the
    ComfyUI folder (default: the host of ``make setup``); ``die_with_parent``: killed with its starter (Linux);
    ``remove_workdir``: ``stop()`` (also after a failed start) deletes the server's folder."""
    if models:
        ensure_checkpoint()
    cp = Path(comfy) if comfy else comfy_path()
    if not (cp / "main.py").exists():
        raise ServerError(f"ComfyUI not found at {cp}: run `make setup` first (or set COMFYUI_PATH)")
    workdir = Path(workdir or tempfile.mkdtemp(prefix="ddiminv-server-"))
    for sub in ("input", "output", "temp", "user"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    port = int(port or free_port())
    cmd = [sys.executable, str(cp / "main.py"), *(["--cpu"] if cpu else []), "--listen", "127.0.0.1",
           "--port", str(port), "--output-directory", str(workdir / "output"),
           "--temp-directory", str(workdir / "temp"), "--input-directory", str(workdir / "input"),
           "--user-directory", str(workdir / "user"), "--database-url", "sqlite:///:memory:",
           *(["--extra-model-paths-config", str(write_extra_model_paths(workdir / "extra_model_paths.yaml"))]
             if models else []),
           "--disable-auto-launch", *map(str, extra_args)]
    log_path = workdir / "server.log"
    log = open(log_path, "w")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=str(cp), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env=env,
                            preexec_fn=_die_with_parent if die_with_parent and sys.platform == "linux" else None)
    handle = ServerHandle(proc, port, workdir, log_path)
    handle._log_file, handle.remove_workdir = log, remove_workdir
    t0 = time.monotonic()
    deadline = t0 + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with {proc.returncode} during start\n{handle.log_tail()}")
            try:
                info = handle.get("/object_info", timeout=30)
                if isinstance(info, dict) and info and _listens(proc.pid, port):
                    break
            except (urllib.error.URLError, ConnectionError, socket.timeout, ServerError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"ComfyUI did not answer /object_info within {timeout}s\n{handle.log_tail()}")
            time.sleep(0.5)
    except BaseException:
        handle.stop()
        raise
    handle.start_seconds = time.monotonic() - t0
    return handle
