#!/usr/bin/env python3
"""Headless batch runner: an API-format workflow on every image of a folder, through running ComfyUI servers.

    python tools/runner.py --workflow example_workflows/api/invert_and_reconstruct.api.json --images photos/ \\
        --out results/ --server http://127.0.0.1:8188 --server http://127.0.0.1:8189 --set "DDIMInvert.steps=20"

Outputs go to OUT/<image stem>/; OUT/results.json and results.csv are rewritten after every image, and a rerun
with the same --out skips the images already ok. Exit status: 0 all ok, 1 some image failed, 2 usage error or
no server reachable.
"""
import argparse
import asyncio
import contextlib
import copy
import csv
import io
import json
import os
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import yarl

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
RESULTS_JSON, RESULTS_CSV = "results.json", "results.csv"
CSV_FIELDS = ("image", "status", "server", "seconds", "outputs", "figure", "texts", "error", "prompt_id")
HISTORY_POLL_S = 5.0
NAME_MAX = 120  # characters in a local file name made from server-supplied parts
MAX_BODY = 256 << 20  # bytes: the most any one server answer may hold
_DB_RE = re.compile(r"(-?\d+(?:\.\d+)?)\s*dB")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class RunnerError(Exception):
    """A problem the user must fix (bad workflow, bad --set, no server): printed, exit status 2."""


class ServerGone(Exception):
    """The server stopped answering mid-image: the image goes to another server."""


class Refused(Exception):
    """A server-supplied output name that could leave the output folder: not downloaded, recorded."""


def load_workflow(path) -> dict:
    try:
        return check_api_workflow(json.loads(Path(path).read_text(encoding="utf-8")), str(path))
    except FileNotFoundError:
        raise RunnerError(f"workflow not found: {path}") from None
    except json.JSONDecodeError as e:
        raise RunnerError(f"workflow {path} is not valid JSON: {e}") from None


def check_api_workflow(data, where: str = "workflow") -> dict:
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise RunnerError(f"{where} is a UI-format workflow; the runner needs the API format: in ComfyUI use "
                          "Workflow > Export (API), or use an example_workflows/api/*.api.json")
    if not isinstance(data, dict) or not data or not all(
            isinstance(n, dict) and "class_type" in n and isinstance(n.get("inputs", {}), dict) for n in data.values()):
        raise RunnerError(f'{where} is not an API-format workflow: expected {{node_id: {{"class_type", "inputs"}}}}')
    for n in data.values():
        n.setdefault("inputs", {})
    return data


def _node_sort_key(node_id):
    return (0, int(node_id), "") if str(node_id).isdigit() else (1, 0, str(node_id))


def resolve_nodes(prompt: dict, target: str) -> list:
    """Node ids ``target`` names: a node id; else a unique ``_meta.title``; else every node of that class_type."""
    if target in prompt:
        return [target]
    ids = sorted(prompt, key=_node_sort_key)
    title = {k: n["_meta"].get("title") if isinstance(n.get("_meta"), dict) else None for k, n in prompt.items()}
    if len(found := [k for k in ids if title[k] == target]) > 1:
        raise RunnerError(f"title {target!r} matches nodes {', '.join(found)}; use a node id instead")
    if not (found := found or [k for k in ids if prompt[k].get("class_type") == target]):
        known = ", ".join(f"{k} ({title[k] or prompt[k].get('class_type')})" for k in ids)
        raise RunnerError(f"no node with id, title or class {target!r} in the workflow; nodes: {known}")
    return found


def parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_override(spec: str) -> tuple:
    """``"TITLE_OR_ID.input=value"`` -> (target, input, value); the input is after the key's last dot."""
    key, sep, raw = spec.partition("=")
    target, dot, name = key.rpartition(".")
    if not sep or not dot or not target.strip() or not name.strip():
        raise RunnerError(f"--set {spec!r}: expected TITLE_OR_ID.input=value, e.g. --set \"DDIM Invert.steps=10\"")
    return target.strip(), name.strip(), parse_value(raw)


def apply_overrides(prompt: dict, overrides, warn=None) -> dict:
    out = copy.deepcopy(prompt)
    for target, name, value in map(parse_override, overrides or ()):
        for nid in resolve_nodes(out, target):
            if name not in out[nid]["inputs"] and warn is not None:
                warn(f"note: node {nid} ({out[nid]['class_type']}) has no input {name!r} in the workflow; adding it")
            out[nid]["inputs"][name] = value
    return out


def find_image_node(prompt: dict, spec=None) -> str:
    ids = resolve_nodes(prompt, spec) if spec else \
        sorted((k for k, n in prompt.items() if n.get("class_type") == "LoadImage"), key=_node_sort_key)[:1]
    if len(ids) != 1:
        raise RunnerError(f"--image-node {spec!r} matches nodes {', '.join(ids)}; use a node id" if ids else
                          "the workflow has no LoadImage node; add one or name the node that takes the image "
                          "with --image-node TITLE_OR_ID")
    return ids[0]


def list_images(folder) -> list:
    if not Path(folder).is_dir():
        raise RunnerError(f"--images {folder}: not a folder")
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def unique(name: str, used: set) -> str:
    """``name`` or name_1, name_2, ...: the first not in ``used`` (compared in lower case)."""
    stem, suf = os.path.splitext(name)
    cand, i = name, 1
    while cand.lower() in used:
        cand, i = f"{stem}_{i}{suf}", i + 1
    used.add(cand.lower())
    return cand


def output_stems(names) -> dict:
    """Image name -> its folder under OUT: the stem (the whole name if the stem is dots), stem_ext if shared."""
    stem = {n: Path(n).stem if Path(n).stem.strip(".") else n for n in names}
    lower, used = [s.lower() for s in stem.values()], {RESULTS_JSON, RESULTS_CSV}
    return {n: unique(s if lower.count(s.lower()) == 1 and s.lower() not in used
                      else f"{s}_{Path(n).suffix.lstrip('.').lower()}", used) for n, s in stem.items()}


def safe_part(text) -> str:
    """A server-supplied name part in [A-Za-z0-9._-] and NAME_MAX characters (suffix kept); '' if only dots."""
    s = _UNSAFE.sub("_", str(text))
    if len(s) > NAME_MAX:
        stem, suf = os.path.splitext(s)
        s = stem[:NAME_MAX - len(suf[:16])] + suf[:16]
    return s if s.strip(".") else ""


def output_name(f: dict, used: set) -> str:
    """The local name of an output: safe_part(filename), node-prefixed when taken; Refused when it could climb."""
    raw, sub, node = f["filename"], f["subfolder"], ascii(f["node"][:40])
    if not raw.strip(".") or any(c in raw for c in "/\\\0"):
        raise Refused(f"node {node}: file name {raw[:80]!a} refused")
    if "\0" in sub or sub.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", sub):
        raise Refused(f"node {node}: subfolder {sub[:80]!a} refused")
    name = safe_part(raw)
    return unique(safe_part(f"{safe_part(f['node']) or 'node'}_{name}") if name.lower() in used else name, used)


def atomic_write(path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=f".{Path(path).name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def extract_ui(outputs: dict) -> tuple:
    """History outputs -> (files [{node, key, filename, subfolder, type}], texts {node: [str]}, other {node: {}})."""
    files, texts, other = [], {}, {}
    for nid in sorted(outputs or {}, key=_node_sort_key):
        for key, val in (outputs[nid] if isinstance(outputs[nid], dict) else {}).items():
            if isinstance(val, list) and val and all(isinstance(v, dict) and "filename" in v for v in val):
                files += [{"node": str(nid), "key": key, "filename": str(v["filename"]), "subfolder":
                           str(v.get("subfolder", "")), "type": str(v.get("type", "output"))} for v in val]
            elif key == "text":
                texts.setdefault(nid, []).extend(map(str, val if isinstance(val, list) else [val]))
            elif key != "animated":
                other.setdefault(nid, {})[key] = val
    return files, texts, other


def figure_from(texts: dict):
    """The last 'NN.NN dB' in the UI texts (node order), else None."""
    found = [m for k in sorted(texts or {}, key=_node_sort_key) for t in texts[k] for m in _DB_RE.findall(t)]
    return float(found[-1]) if found else None


class Results:
    """results.json / results.csv under ``out_dir``: one record per image name, rewritten atomically."""

    def __init__(self, out_dir, meta=None):
        self.out, self.meta, self.images = Path(out_dir), dict(meta or {}), {}
        self.json_path = self.out / RESULTS_JSON

    @classmethod
    def load(cls, out_dir, meta=None):
        r = cls(out_dir, meta)
        if r.json_path.exists():
            try:
                imgs = json.loads(r.json_path.read_text(encoding="utf-8")).get("images")
            except (ValueError, OSError, AttributeError) as e:
                raise RunnerError(f"{r.json_path} is unreadable ({e}); move it away to start over") from None
            r.images = {k: v for k, v in imgs.items() if isinstance(v, dict)} if isinstance(imgs, dict) else {}
        return r

    def done(self, name: str) -> bool:
        return self.images.get(name, {}).get("status") == "ok"

    def record(self, name: str, rec: dict) -> None:
        self.images[name] = {"image": name, **rec}
        self.out.mkdir(parents=True, exist_ok=True)
        names = sorted(self.images)
        ok = sum(map(self.done, names))
        atomic_write(self.json_path, (json.dumps({
            "version": 1, **self.meta, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "summary": {"total": len(names), "ok": ok, "failed": len(names) - ok},
            "images": {n: self.images[n] for n in names}}, indent=2) + "\n").encode("utf-8"))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        for row in map(self.images.get, names):
            texts = row.get("texts") or {}
            row = {**row, "outputs": ";".join(row.get("outputs") or []),
                   "seconds": "" if row.get("seconds") is None else f"{row['seconds']:.3f}",
                   "texts": " | ".join(t for k in sorted(texts, key=_node_sort_key) for t in texts[k])}
            # a cell a spreadsheet would run as a formula gets a leading apostrophe
            w.writerow({k: "'" + v if isinstance(v, str) and v.startswith(("=", "+", "-", "@", "\t", "\r")) else v
                        for k, v in row.items()})
        atomic_write(self.out / RESULTS_CSV, buf.getvalue().encode("utf-8"))


def normalize_server(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if re.match(r"^https?://", url) else "http://" + url


def ws_url(server: str, client_id: str) -> str:
    return f"ws{server[4:]}/ws?clientId={client_id}"  # server is http(s)://... (normalize_server)


def unreachable_message(url: str, err) -> str:
    u = yarl.URL(url)
    return (f"ComfyUI server {url} is unreachable ({err.__class__.__name__}: {err}). Start it with `python main.py "
            f"--listen {u.host} --port {u.port}` (add --cpu without a GPU) or fix --server.")


def format_prompt_error(status: int, body) -> str:
    """A rejected POST /prompt -> one line, with the validation errors per node."""
    body = body if isinstance(body, dict) else {"error": str(body)[:500]}
    err = body.get("error")
    parts = [err.get("message") or err.get("type"), err.get("details")] if isinstance(err, dict) else [err]
    for nid, ne in (body.get("node_errors") or {}).items():
        parts += [f"node {nid} ({ne.get('class_type', '?')}): {e.get('message', '')}"
                  + (f": {e['details']}" if e.get("details") else "") for e in (ne or {}).get("errors", [])]
    return f"prompt rejected (HTTP {status}): " + "; ".join(str(p) for p in parts if p)


def format_exec_error(data: dict, typ: str = "execution_error") -> str:
    if typ != "execution_error":
        return f"interrupted at node {data.get('node_id')} ({data.get('node_type')})"
    return (f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
            f"{data.get('exception_type', 'error')}: {str(data.get('exception_message', '')).strip()}")


def history_error(h: dict):
    """None for a /history entry that completed, else its error."""
    st = h.get("status") or {}
    ended = [format_exec_error(d, t) for t, d in st.get("messages") or []
             if t in ("execution_error", "execution_interrupted")]
    return None if st.get("completed", True) else (ended or ["execution failed (see the server log)"])[0]


class Worker:
    """One server: one websocket, one prompt in flight."""

    def __init__(self, session, server: str, args):
        self.session, self.server, self.args, self.client_id, self.ws = session, server, args, uuid.uuid4().hex, None

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

    async def download(self, f: dict, dest_dir: Path, used: set) -> str:
        """One output into ``dest_dir``; Refused, with nothing requested, when its name resolves outside OUT."""
        name, root = output_name(f, used), Path(self.args.out).resolve()
        if root not in (dest_dir / name).resolve().parents:
            raise Refused(f"node {f['node'][:40]!a}: {name!a} resolves outside {root}")
        status, data = await self.call("GET", "/view", raw=True, params={k: f[k] for k in ("filename", "subfolder",
                                                                                          "type")})
        if status != 200:
            raise RuntimeError(f"download of {name} failed: HTTP {status}")
        dest_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(dest_dir / name, data)
        return name

    async def run(self, path: Path, prompt: dict, image_node: str, dest_dir: Path, on_progress) -> dict:
        """One image -> its record (status ok or error); ServerGone propagates."""
        t0, rec = time.monotonic(), {"server": self.server, "prompt_id": None, "outputs": [], "texts": {}, "ui": {},
                                     "figure": None, "error": None}
        try:
            await self.connect()
            with path.open("rb") as fh:  # aiohttp sends the name as it is and guesses the type from it
                form = aiohttp.FormData({"type": "input", "overwrite": "true"}, quote_fields=False)
                form.add_field("image", fh, filename=path.name)
                status, up = await self.call("POST", "/upload/image", data=form)
            if status != 200 or not isinstance(up, dict) or "name" not in up:
                raise RuntimeError(f"upload of {path.name} failed: HTTP {status}: {str(up)[:300]}")
            prompt = copy.deepcopy(prompt)
            prompt[image_node]["inputs"]["image"] = "/".join(filter(None, (up.get("subfolder"), up["name"])))
            rec["prompt_id"] = pid = str(uuid.uuid4())
            status, body = await self.call("POST", "/prompt", json={"prompt": prompt, "client_id": self.client_id,
                                                                    "prompt_id": pid})
            if status != 200:
                raise RuntimeError(format_prompt_error(status, body))
            try:
                left = t0 + self.args.timeout - time.monotonic()
                h, err = await asyncio.wait_for(self.follow(pid, on_progress), max(0.0, left))
            except asyncio.TimeoutError:
                with contextlib.suppress(ServerGone):
                    await self.call("POST", "/queue", json={"delete": [pid]})
                    await self.call("POST", "/interrupt", json={"prompt_id": pid})
                await self.close()  # a fresh websocket for the next image
                raise RuntimeError(f"timed out after {self.args.timeout:g}s (raise --timeout)") from None
            files, rec["texts"], rec["ui"] = extract_ui(h.get("outputs"))
            rec["figure"] = figure_from(rec["texts"])
            if err := err or history_error(h):
                raise RuntimeError(err)
            used: set = set()
            for f in files:
                try:
                    rec["outputs"].append(await self.download(f, dest_dir, used))
                except Refused as e:
                    rec.setdefault("refused", []).append(str(e))
            if rec.get("refused"):
                raise RuntimeError(f"refused {len(rec['refused'])} output(s) the server named unsafely: "
                                   + "; ".join(rec["refused"]))
            rec["status"] = "ok"
        except ServerGone:
            raise
        except Exception as e:  # recorded per image, the batch goes on
            rec["status"], rec["error"] = "error", str(e) or e.__class__.__name__
        rec["seconds"] = round(time.monotonic() - t0, 3)
        return rec


class Progress:
    """A line per finished image on stderr, the sampler's steps live on a terminal; control characters are
    shown as '?' (server text cannot drive the terminal)."""

    def __init__(self, total: int, stream=None):
        self.total, self.n, self.stream, self.step_len = total, 0, stream or sys.stderr, 0

    def line(self, text: str) -> None:
        self.stream.write("\r" + " " * self.step_len + "\r" if self.step_len else "")
        self.step_len = 0
        print(_CONTROL.sub("?", text), file=self.stream, flush=True)

    def done(self, name: str, rec: dict) -> None:
        self.n += 1
        figure = f" figure={rec['figure']:.2f}" if isinstance(rec.get("figure"), float) else ""
        error = f" {rec['error']}" if rec.get("error") else ""
        self.line(f"[{self.n:>{len(str(self.total))}}/{self.total}] {name} {rec['status']} "
                  f"{rec.get('seconds') or 0:.1f}s @{rec.get('server') or '?'}{figure}{error}")

    def step(self, name: str, data: dict) -> None:
        if self.stream.isatty() and isinstance(data.get("value"), int) and isinstance(data.get("max"), int):
            text = _CONTROL.sub("?", f"  {name}: node {data.get('node')} {data['value']}/{data['max']}")
            self.stream.write("\r" + text.ljust(self.step_len))
            self.step_len = len(text)
            self.stream.flush()


async def run_async(args) -> int:
    progress = Progress(0)
    servers = list(dict.fromkeys(normalize_server(s) for s in args.server or ["http://127.0.0.1:8188"]))
    template = apply_overrides(load_workflow(args.workflow), args.set, warn=progress.line)
    image_node = find_image_node(template, args.image_node)
    if not (images := {p.name: p for p in list_images(args.images)}):
        raise RunnerError(f"--images {args.images}: no images ({', '.join(IMAGE_EXTS)})")
    out = Path(args.out)
    results = Results.load(out, {"workflow": str(args.workflow), "images_dir": str(args.images), "overrides": args.set})
    dirs, todo = output_stems(images), [n for n in images if not results.done(n)]
    progress.total = left = len(todo)
    if len(todo) < len(images):
        progress.line(f"resuming: {len(images) - len(todo)} image(s) already ok in {results.json_path}, "
                      f"{len(todo)} to do")
    if not todo:
        progress.line("nothing to do")
        return 0
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=max(60.0, args.timeout))
    async with aiohttp.ClientSession(timeout=timeout) as session:
        workers = [Worker(session, s, args) for s in servers]
        checks = await asyncio.gather(*(w.connect() for w in workers), return_exceptions=True)
        alive = [w for w, c in zip(workers, checks, strict=True) if c is None]
        for c in filter(None, checks):
            progress.line(("warning: " if alive else "error: ") + str(c))
        if not alive:
            raise RunnerError("no ComfyUI server reachable; nothing was run")
        live, queue = set(alive), asyncio.Queue()
        for name in todo:
            queue.put_nowait((name, False))  # (image, moved here from a server that died)

        def finish(name: str, rec=None, server=None, error=None) -> None:
            nonlocal left
            rec = rec or {"server": server, "status": "error", "error": error, "seconds": None, "outputs": []}
            results.record(name, rec)
            progress.done(name, rec)
            if (left := left - 1) == 0:  # every image has its record: one sentinel per worker
                for _ in alive:
                    queue.put_nowait(None)

        async def work(w: Worker) -> None:
            try:
                while (item := await queue.get()) is not None:
                    name, moved = item
                    try:
                        finish(name, await w.run(images[name], template, image_node, out / dirs[name],
                                                 lambda data, n=name: progress.step(n, data)))
                    except ServerGone as e:
                        live.discard(w)
                        again = not moved and bool(live)
                        progress.line(f"warning: {e}; {f'{name} goes to another server, ' if again else ''}"
                                      f"{w.server} is dropped")
                        if again:
                            queue.put_nowait((name, True))
                        else:
                            finish(name, server=w.server, error=str(e))
                        return
            finally:
                await w.close()

        await asyncio.gather(*map(work, alive))
        while not queue.empty():  # every server went away
            if (item := queue.get_nowait()) is not None:
                finish(item[0], error="no server left to run it")
    ok = sum(map(results.done, images))
    progress.line(f"done: {ok}/{len(images)} ok, {len(images) - ok} failed; results in {results.json_path}")
    return 0 if ok == len(images) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="runner.py", description=__doc__.split("\n")[0])
    p.add_argument("--workflow", required=True, help="API-format workflow JSON (e.g. example_workflows/api/*.api.json)")
    p.add_argument("--images", required=True, help="folder of input images")
    p.add_argument("--out", required=True, help="output folder: OUT/<image stem>/..., results.json, results.csv")
    p.add_argument("--server", action="append", metavar="URL",
                   help="ComfyUI server URL; repeat to spread the work (default http://127.0.0.1:8188)")
    p.add_argument("--set", action="append", metavar="TITLE_OR_ID.input=value", default=[],
                   help="override a node input by node id, _meta.title or class_type (all nodes of that class); "
                        "the value is JSON when it parses, else a string ('X.text=\"42\"' forces one). Repeatable.")
    p.add_argument("--image-node", metavar="TITLE_OR_ID", help="node that gets the image (default: first LoadImage)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per image, then it is interrupted (600)")
    args = p.parse_args(argv)
    if args.timeout <= 0:
        p.error("--timeout must be > 0")
    try:
        return asyncio.run(run_async(args))
    except RunnerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
