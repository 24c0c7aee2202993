"""A fake ComfyUI server in-process (aiohttp, on 127.0.0.1 in its own thread) for the runner's and the Ray
job's tests: the paths a real server rarely takes on demand (a server dying mid-batch, execution errors, missed
websocket messages, timeouts, hostile output names). Counts what it was asked: ``prompts``, ``uploads``, ``views``."""
from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import uuid
from pathlib import Path

from aiohttp import web

PNG = b"\x89PNG\r\n\x1a\nfake"


def _kill_peer(request) -> int:
    """SIGKILL the local process on the other end of ``request``'s connection; its pid."""
    import os
    import signal

    import psutil
    port = request.transport.get_extra_info("peername")[1]
    pid = next(c.pid for c in psutil.net_connections("inet") if c.laddr and c.laddr.port == port and c.pid)
    os.kill(pid, signal.SIGKILL)
    return pid


class FakeComfy:
    """Enough of ComfyUI's API: /upload/image, /prompt, /ws, /history, /view, /queue, /interrupt. ``mode``:
    ok | error | reject (HTTP 400 on /prompt) | die (``die_after`` s into a /prompt, drops the connection, then
    refuses; with ``die_on=N`` only the N-th /prompt dies, the ones before run) | silent (no websocket messages;
    history only) | dropws (closes the websocket once a prompt starts) | hang (never finishes) | hang_first (the
    first prompt never finishes) | kill_client (the ``die_on``-th /prompt SIGKILLs the local process that sent
    it, e.g. a Ray actor, and is not run) | kill_client_after (the same, but the prompt is accepted and runs).
    ``executions`` counts the prompts that ran to their end; /interrupt and /queue delete stop theirs."""

    def __init__(self, mode="ok", delay=0.05, files=None, die_after=0.0, die_on=None, port=0):
        self.mode, self.delay, self.files, self.die_after, self.die_on = mode, delay, files, die_after, die_on
        self.posts = 0  # every POST /prompt, the one it died on included
        self.killed_clients: list = []  # pids killed in mode kill_client
        self.uploads, self.upload_types, self.prompts, self.history, self.views = {}, {}, [], {}, []
        self.sockets: dict = {}
        self.interrupted, self.deleted, self.interrupted_ids = 0, [], []
        self.executions, self.running, self.pending = 0, {}, []  # running: prompt id -> its task
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(port), self.loop).result(10)
        self.url = f"http://127.0.0.1:{self.port}"

    async def _start(self, port):
        app = web.Application()
        app.router.add_post("/upload/image", self.upload)
        app.router.add_post("/prompt", self.prompt)
        app.router.add_get("/ws", self.ws)
        app.router.add_get("/history/{pid}", self.get_history)
        app.router.add_get("/view", self.view)
        app.router.add_get("/object_info", self.object_info)
        app.router.add_post("/queue", self.queue)
        app.router.add_get("/queue", self.get_queue)
        app.router.add_post("/interrupt", self.interrupt)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        self.site = web.TCPSite(self.runner, "127.0.0.1", port)
        await self.site.start()
        return self.site._server.sockets[0].getsockname()[1]

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    async def queue(self, request):
        ids = (await request.json()).get("delete", [])
        self.deleted += ids
        self.pending = [p for p in self.pending if p not in ids]
        return web.json_response({})

    async def get_queue(self, request):  # ComfyUI's entries are [number, prompt id, prompt, extra, outputs]
        return web.json_response({"queue_running": [[0, p, {}, {}, []] for p in self.running],
                                  "queue_pending": [[0, p, {}, {}, []] for p in self.pending]})

    async def upload(self, request):
        post = await request.post()
        f = post["image"]
        if post["type"] != "input" or post["overwrite"] != "true":
            raise web.HTTPBadRequest(text="upload fields")
        sub = post.get("subfolder", "")
        if sub.startswith("/") or ".." in sub.split("/"):
            raise web.HTTPForbidden()
        key = "/".join(filter(None, (sub, f.filename)))  # the image input that names it, as ComfyUI's
        self.uploads[key], self.upload_types[key] = f.file.read(), f.content_type  # overwrite=true replaces
        return web.json_response({"name": f.filename, "subfolder": sub, "type": "input"})

    async def interrupt(self, request):
        self.interrupted += 1
        with contextlib.suppress(ValueError):
            if (pid := (await request.json()).get("prompt_id")) is not None:
                self.interrupted_ids.append(pid)
                if (task := self.running.pop(pid, None)) is not None:
                    task.cancel()
        return web.json_response({})

    async def ws(self, request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.rel_url.query.get("clientId") or uuid.uuid4().hex
        self.sockets[sid] = ws
        await ws.send_json({"type": "status", "data": {"status": {}, "sid": sid}})
        async for _ in ws:
            pass
        return ws

    async def send(self, sid, typ, data):
        ws = self.sockets.get(sid)
        if ws is not None and not ws.closed and self.mode != "silent":
            with contextlib.suppress(ConnectionError, RuntimeError):  # a client that died mid-prompt
                await ws.send_json({"type": typ, "data": data})
                await ws.send_bytes(b"\x00\x00\x00\x01preview")  # binary frames are ignored

    async def prompt(self, request):
        body = await request.json()
        if self.mode == "reject":
            return web.json_response({"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt "
                                                "outputs failed validation", "details": ""},
                                      "node_errors": {"2": {"class_type": "DDIMInvert", "errors": [
                                          {"message": "Value smaller than min", "details": "steps: 0 < 1"}]}}},
                                     status=400)
        self.posts += 1
        if self.mode == "die" and self.die_on in (None, self.posts):
            await asyncio.sleep(self.die_after)
            await self.site.stop()  # refuse new connections, then drop this one
            request.transport.close()
            raise ConnectionResetError
        if self.mode == "kill_client" and self.die_on == self.posts:  # the process that sent it dies, not us
            self.killed_clients.append(_kill_peer(request))
            raise ConnectionResetError
        pid = body.get("prompt_id") or str(uuid.uuid4())
        self.prompts.append(body)
        self.running[pid] = asyncio.get_running_loop().create_task(self.execute(pid, body))
        if self.mode == "kill_client_after" and self.die_on == self.posts:  # accepted, running; its sender dies
            self.killed_clients.append(_kill_peer(request))
        return web.json_response({"prompt_id": pid, "number": len(self.prompts), "node_errors": {}})

    async def execute(self, pid, body):
        sid, prompt = body["client_id"], body["prompt"]
        image = prompt["1"]["inputs"]["image"]
        await self.send(sid, "execution_start", {"prompt_id": pid})
        ws = self.sockets.get(sid)
        if self.mode == "dropws":
            await ws.close()
        elif ws is not None and self.mode != "silent":  # frames a runner must shrug off
            for junk in ("not json", "[]", '{"type": "progress"}', '{"type": "progress", "data": [1]}',
                         json.dumps({"type": "progress", "data": {"prompt_id": pid, "value": "x", "max": None}}),
                         json.dumps({"type": "execution_success", "data": {"prompt_id": "someone-else"}})):
                await ws.send_str(junk)
        await self.send(sid, "executing", {"node": "1", "prompt_id": pid})
        await self.send(sid, "progress", {"value": 1, "max": 2, "prompt_id": pid, "node": "1"})
        if self.mode == "hang" or (self.mode == "hang_first" and len(self.prompts) == 1):
            return
        await asyncio.sleep(self.delay)
        if self.mode == "error":
            err = {"prompt_id": pid, "node_id": "2", "node_type": "DDIMInvert", "exception_type": "ValueError",
                   "exception_message": f"bad latent for {image}", "traceback": []}
            await self.send(sid, "execution_error", err)
            self.history[pid] = {"outputs": {}, "status": {"status_str": "error", "completed": False,
                                                           "messages": [["execution_error", err]]}}
        else:
            outputs = {"3": {"images": [{"filename": f"rec_{Path(image).stem}.png", "subfolder": "ddiminv",
                                         "type": "output"}]},
                       "4": {"text": [f"round trip: {len(self.prompts)}.5 dB"]}}
            for node, filename, sub in self.files or ():  # a hostile server names its outputs
                outputs.setdefault(node, {"images": []})["images"].append(
                    {"filename": filename, "subfolder": sub, "type": "output"})
            for node, out in outputs.items():
                await self.send(sid, "executed", {"node": node, "output": out, "prompt_id": pid})
            self.history[pid] = {"outputs": outputs, "status": {"status_str": "success", "completed": True,
                                                                "messages": []}}
            await self.send(sid, "execution_success", {"prompt_id": pid})
            self.executions += 1
        self.running.pop(pid, None)
        await self.send(sid, "executing", {"node": None, "prompt_id": pid})

    async def object_info(self, request):  # what start_server waits for
        return web.json_response({"LoadImage": {}})

    async def get_history(self, request):
        pid = request.match_info["pid"]
        return web.json_response({pid: self.history[pid]} if pid in self.history else {})

    async def view(self, request):
        q = request.rel_url.query
        self.views.append(q["filename"])
        if q["type"] != "output" or not (self.files or q["subfolder"] == "ddiminv"):
            raise web.HTTPBadRequest(text="unexpected /view query")
        return web.Response(body=PNG + q["filename"].encode(), content_type="image/png")


@contextlib.contextmanager
def fake_batch(tmp: Path, workflow: dict, n_images: int):
    """A batch job's inputs under ``tmp``: ``(workflow file, folder of n distinct fake PNGs, output folder,
    make)``, where ``make(mode, **kw)`` starts a :class:`FakeComfy`; every server made is stopped on exit."""
    wf = Path(tmp) / "wf.api.json"
    wf.write_text(json.dumps(workflow))
    imgs = Path(tmp) / "imgs"
    imgs.mkdir()
    for i in range(n_images):
        (imgs / f"im{i}.png").write_bytes(PNG + bytes([i]))
    servers = []

    def make(mode="ok", **kw):
        s = FakeComfy(mode, **kw)
        servers.append(s)
        return s

    try:
        yield wf, imgs, Path(tmp) / "out", make
    finally:
        for s in servers:
            s.stop()


MAIN_PY = """# a fake ComfyUI main.py (ddiminv_dev.fake_comfy): serves FakeComfy on --port, notes its folders
import sys, time
sys.path.insert(0, {root!r})
from ddiminv_dev.fake_comfy import FakeComfy
arg = sys.argv.__getitem__
with open({record!r}, "a") as f:
    f.write(arg(sys.argv.index("--output-directory") + 1) + "\\n")
FakeComfy({mode!r}, port=int(arg(sys.argv.index("--port") + 1)), **{kw!r})
while True:
    time.sleep(1)
"""


def fake_comfyui(folder: Path, record: Path, mode: str = "ok", **kw) -> Path:
    """A ComfyUI folder whose main.py starts a FakeComfy (for code that starts its own server, e.g. a Ray
    actor): each start appends its --output-directory to ``record``."""
    folder.mkdir(parents=True, exist_ok=True)
    root = str(Path(__file__).resolve().parents[1])
    (folder / "main.py").write_text(MAIN_PY.format(root=root, record=str(record), mode=mode, kw=kw))
    return folder
