#!/usr/bin/env python3
"""Headless runner: an API-format workflow on every image of a folder, through one running ComfyUI server.

    python tools/runner.py --workflow example_workflows/api/invert_and_reconstruct.api.json --images photos/ \\
        --out results/ --server http://127.0.0.1:8188 --set "DDIMInvert.steps=20"

Outputs go to OUT/<image stem>/; OUT/results.json and results.csv are rewritten after every image, and a rerun
with the same --out skips the images already ok with the same settings (the workflow after --set: its hash is
in each record) and redoes, naming them, those done with other settings. Exit status: 0 all ok, 1 some image
failed, 2 usage error or the server unreachable. Several servers, GPUs or machines: tools/ray_batch.py runs
``Client`` in Ray actors.
"""
import argparse
import asyncio
import contextlib
import copy
import json
import mimetypes
import sys
import time
import uuid
from pathlib import Path

import aiohttp

_TOOLS = str(Path(__file__).resolve().parent)
if _TOOLS not in sys.path:
    sys.path.insert(0, _TOOLS)
from batchlib import (  # noqa: E402  (tools/ is not a package on the path of a script)
    IMAGE_EXTS, Progress, Refused, Results, RunnerError, ServerGone, apply_overrides, extract_ui, figure_from,
    find_image_node, format_exec_error, format_prompt_error, history_error, list_images, load_workflow,
    normalize_server, output_name, output_stems, run_cli, settings_key, store, unreachable_message, ws_url)

HISTORY_POLL_S = 5.0
UPLOAD_DIR = "ddiminv-batch"  # the uploads' folder in the server's input/
MAX_BODY = 256 << 20  # bytes: the most any one server answer may hold


class Client:
    """One server: one websocket, one prompt in flight. ``run`` takes an image's name and bytes and returns its
    record and its outputs in memory, so the caller (this runner, or a Ray actor on another machine) writes them."""

    def __init__(self, session, server: str, timeout: float = 600.0):
        self.session, self.server, self.timeout = session, normalize_server(server), timeout
        self.client_id, self.ws = uuid.uuid4().hex, None

    async def call(self, method: str, path: str, raw: bool = False, **kw) -> tuple:
        """(HTTP status, body: bytes when ``raw``, else JSON or text); ServerGone when the server does not answer."""
        data = bytearray()
        try:
            async with self.session.request(method, self.server + path, **kw) as r:
                async for chunk in r.content.iter_any():
                    data += chunk
                    if len(data) > MAX_BODY:  # a hostile server cannot exhaust memory
                        raise RuntimeError(f"{self.server}{path.split('?')[0]} answered more than {MAX_BODY >> 20} MiB")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise ServerGone(f"{self.server} stopped answering ({e.__class__.__name__}: {e})") from None
        with contextlib.suppress(ValueError):
            return r.status, bytes(data) if raw or not data else json.loads(data)
        return r.status, data.decode("utf-8", "replace")

    async def connect(self) -> None:
        if self.ws is None or self.ws.closed:
            try:
                self.ws = await asyncio.wait_for(
                    self.session.ws_connect(ws_url(self.server, self.client_id), heartbeat=30), 15)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                raise ServerGone(unreachable_message(self.server, e)) from None

    async def close(self) -> None:
        ws, self.ws = self.ws, None
        if ws is not None:
            await ws.close()

    async def follow(self, pid: str, on_progress) -> tuple:
        """Until the prompt's /history entry exists (the caller bounds the time): (entry, websocket error or None).
        /history is asked every HISTORY_POLL_S, more often once the websocket is down or said the prompt ended."""
        next_poll, ended, err = time.monotonic() + HISTORY_POLL_S, False, None
        while True:
            msg = typ = None
            if self.ws is None or ended:
                await asyncio.sleep(0.2 if ended else HISTORY_POLL_S / 2)
            else:
                with contextlib.suppress(asyncio.TimeoutError):
                    msg = await self.ws.receive(timeout=HISTORY_POLL_S / 2)
            if msg is not None and msg.type == aiohttp.WSMsgType.TEXT:
                with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
                    m = json.loads(msg.data)
                    typ, data = (m["type"], m["data"]) if m["data"].get("prompt_id") == pid else (None, None)
            elif msg is not None and msg.type != aiohttp.WSMsgType.BINARY:  # closed: the next image opens a new one
                self.ws, next_poll = None, 0
            if typ == "progress":
                on_progress(data)
            elif typ in ("execution_error", "execution_interrupted", "execution_success"):
                ended, err = True, None if typ == "execution_success" else format_exec_error(data, typ)
            if ended or time.monotonic() >= next_poll:  # /history is written just after the last message
                next_poll = time.monotonic() + HISTORY_POLL_S
                status, body = await self.call("GET", f"/history/{pid}")
                if status == 200 and isinstance(body, dict) and isinstance(body.get(pid), dict):
                    return body[pid], err

    async def download(self, f: dict, used: set) -> tuple:
        """One output -> (its local name, bytes); Refused, with nothing requested, when its name could climb."""
        name = output_name(f, used)
        status, data = await self.call("GET", "/view", raw=True, params={k: f[k] for k in ("filename", "subfolder",
                                                                                          "type")})
        if status != 200:
            raise RuntimeError(f"download of {name} failed: HTTP {status}")
        return name, data

    async def known(self, pid: str) -> bool:
        """Whether the server has prompt ``pid``: queued, running (/queue) or ended (/history), asked in that
        order, so a prompt that ends between the two questions is still found."""
        status, q = await self.call("GET", "/queue")
        if status == 200 and isinstance(q, dict) and any(
                isinstance(e, list) and len(e) > 1 and e[1] == pid
                for e in (q.get("queue_running") or []) + (q.get("queue_pending") or [])):
            return True
        status, h = await self.call("GET", f"/history/{pid}")
        return status == 200 and isinstance(h, dict) and isinstance(h.get(pid), dict)

    async def submit(self, name: str, image: bytes, prompt: dict, image_node: str, pid: str) -> None:
        """Upload the image and queue the prompt as ``pid``; RuntimeError when the server refuses either."""
        # a folder of its own per item: two jobs (or two folders of one manifest) sharing the server's input/
        # cannot replace each other's a.png between its upload and its run
        form = aiohttp.FormData({"type": "input", "subfolder": f"{UPLOAD_DIR}/{uuid.uuid4().hex}",
                                 "overwrite": "true"}, quote_fields=False)  # the name as it is
        form.add_field("image", image, filename=name,
                       content_type=mimetypes.guess_type(name)[0] or "application/octet-stream")
        status, up = await self.call("POST", "/upload/image", data=form)
        if status != 200 or not isinstance(up, dict) or "name" not in up:
            raise RuntimeError(f"upload of {name} failed: HTTP {status}: {str(up)[:300]}")
        prompt = copy.deepcopy(prompt)
        prompt[image_node]["inputs"]["image"] = "/".join(filter(None, (up.get("subfolder"), up["name"])))
        status, body = await self.call("POST", "/prompt", json={"prompt": prompt, "client_id": self.client_id,
                                                                "prompt_id": pid})
        if status != 200:
            raise RuntimeError(format_prompt_error(status, body))

    async def run(self, name: str, image: bytes, prompt: dict, image_node: str, on_progress=lambda d: None,
                  prompt_id=None) -> tuple:
        """One image -> (record with status ok or error, [(output name, bytes)]); ServerGone propagates.
        ``prompt_id``: the caller's id for the prompt; when the server already has it (a call retried after the
        process that sent it died), it is followed, not sent again."""
        t0, files = time.monotonic(), []
        rec = {"server": self.server, "prompt_id": None, "outputs": [], "texts": {}, "ui": {}, "figure": None,
               "error": None}
        try:
            await self.connect()
            rec["prompt_id"] = pid = prompt_id or str(uuid.uuid4())
            if not (prompt_id and await self.known(pid)):
                await self.submit(name, image, prompt, image_node, pid)
            try:
                left = t0 + self.timeout - time.monotonic()
                h, err = await asyncio.wait_for(self.follow(pid, on_progress), max(0.0, left))
            except asyncio.TimeoutError:
                with contextlib.suppress(ServerGone):
                    await self.call("POST", "/queue", json={"delete": [pid]})
                    await self.call("POST", "/interrupt", json={"prompt_id": pid})
                await self.close()  # a fresh websocket for the next image
                raise RuntimeError(f"timed out after {self.timeout:g}s (raise --timeout)") from None
            outs, rec["texts"], rec["ui"] = extract_ui(h.get("outputs"))
            rec["figure"] = figure_from(rec["texts"])
            if err := err or history_error(h):
                raise RuntimeError(err)
            used: set = set()
            for f in outs:
                try:
                    files.append(await self.download(f, used))
                except Refused as e:
                    rec.setdefault("refused", []).append(str(e))
            rec["status"] = "ok"
        except ServerGone:
            raise
        except Exception as e:  # recorded per image, the batch goes on
            rec["status"], rec["error"], files = "error", str(e) or e.__class__.__name__, []
        rec["seconds"] = round(time.monotonic() - t0, 3)
        return rec, files


async def run_async(args) -> int:
    progress = Progress(0)
    server = normalize_server(args.server)
    template = apply_overrides(load_workflow(args.workflow), args.set, warn=progress.line)
    image_node = find_image_node(template, args.image_node)
    if not (images := {p.name: p for p in list_images(args.images)}):
        raise RunnerError(f"--images {args.images}: no images ({', '.join(IMAGE_EXTS)})")
    out = Path(args.out)
    results = Results.load(out, {"workflow": str(args.workflow), "images_dir": str(args.images), "overrides": args.set})
    key = settings_key(template, image_node)
    dirs, keys = output_stems(images), dict.fromkeys(images, key)
    if not (todo := results.todo(keys, progress, "image")):
        return 0
    progress.start(len(todo))
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=max(60.0, args.timeout))
    async with aiohttp.ClientSession(timeout=timeout) as session:
        client, gone = Client(session, server, args.timeout), None
        try:
            await client.connect()
        except ServerGone as e:
            raise RunnerError(f"{e}; nothing was run") from None
        try:
            for name in todo:
                if gone is None:
                    try:
                        rec, files = await client.run(name, images[name].read_bytes(), template, image_node,
                                                      lambda data, n=name: progress.step(n, data))
                        rec = store({**rec, "settings": key}, files, out / dirs[name], out)
                    except ServerGone as e:
                        gone = str(e)
                        progress.line(f"error: {gone}; the images left are not run")
                        rec = {"server": server, "status": "error", "error": gone, "outputs": []}
                else:
                    rec = {"server": server, "status": "error", "error": "not run: the server stopped answering",
                           "outputs": []}
                results.record(name, rec)
                progress.done(name, rec)
        finally:
            await client.close()
    return results.finish(keys, progress)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="runner.py", description=__doc__.split("\n")[0])
    p.add_argument("--workflow", required=True, help="API-format workflow JSON (e.g. example_workflows/api/*.api.json)")
    p.add_argument("--images", required=True, help="folder of input images")
    p.add_argument("--out", required=True, help="output folder: OUT/<image stem>/..., results.json, results.csv")
    p.add_argument("--server", default="http://127.0.0.1:8188", metavar="URL",
                   help="the ComfyUI server (default http://127.0.0.1:8188); several: tools/ray_batch.py")
    p.add_argument("--set", action="append", metavar="TITLE_OR_ID.input=value", default=[],
                   help="override a node input by node id, _meta.title or class_type (all nodes of that class); "
                        "the value is JSON when it parses, else a string ('X.text=\"42\"' forces one). Repeatable.")
    p.add_argument("--image-node", metavar="TITLE_OR_ID", help="node that gets the image (default: first LoadImage)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per image, then it is interrupted (600)")
    args = p.parse_args(argv)
    if args.timeout <= 0:
        p.error("--timeout must be > 0")
    return run_cli(lambda: asyncio.run(run_async(args)))


if __name__ == "__main__":
    sys.exit(main())
