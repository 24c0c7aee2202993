#!/usr/bin/env python3
"""Headless batch runner: invert and reconstruct (or edit) every image of a folder through ComfyUI's API.

    python tools/runner.py --workflow example_workflows/api/invert_and_reconstruct.api.json \\
        --images photos/ --out results/ --server http://127.0.0.1:8188 --server http://127.0.0.1:8189 \\
        --set "DDIMInvert.steps=20" --set "CheckpointLoaderSimple.ckpt_name=v1-5-pruned-emaonly.safetensors"

For each image: upload it (POST /upload/image), put its name on the LoadImage node of the API-format
workflow, queue the prompt (POST /prompt, with this runner's client_id), follow it over the websocket
(/ws?clientId=...), read its outputs from /history/<prompt_id> and download every file output via /view
into ``OUT/<image stem>/``. Work is spread over the ``--server`` URLs, one prompt in flight per server.

``OUT/results.json`` and ``OUT/results.csv`` are rewritten atomically after every image (status, server,
seconds, downloaded outputs, the UI text entries such as the VAE-ceiling / round-trip PSNR, errors). A rerun
with the same ``--out`` skips the images already ``ok`` there, so an interrupted batch resumes.

Only the standard library and aiohttp (which ComfyUI itself installs) are used; the pure helpers below
(override parsing, node resolution, multipart bodies, results bookkeeping) import nothing but the stdlib.

Exit status: 0 all images ok, 1 some image failed, 2 usage error or no server reachable.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import csv
import io
import json
import os
import re
import sys
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
CSV_FIELDS = ("image", "status", "server", "seconds", "outputs", "figure", "texts", "error", "prompt_id")
DEFAULT_TIMEOUT = 600.0
HISTORY_POLL_S = 5.0  # a prompt whose websocket messages were missed is still noticed via /history
_DB_RE = re.compile(r"(-?\d+(?:\.\d+)?)\s*dB")


class RunnerError(Exception):
    """A problem the user must fix (bad workflow, bad --set, unreachable servers): printed, exit 2."""


class ServerGone(Exception):
    """The server stopped answering mid-image: the image is retried on another server."""


# ----------------------------------------------------------------------------------------- workflow helpers
def load_workflow(path) -> dict:
    """Read an API-format workflow ({id: {"class_type", "inputs"}}); a {"prompt": {...}} wrapper is accepted."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunnerError(f"workflow not found: {p}") from None
    except json.JSONDecodeError as e:
        raise RunnerError(f"workflow {p} is not valid JSON: {e}") from None
    return check_api_workflow(data, str(p))


def check_api_workflow(data, where: str = "workflow") -> dict:
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "class_type" not in data["prompt"]:
        data = data["prompt"]
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise RunnerError(f"{where} is a UI-format workflow (it has 'nodes' and 'links'); the runner needs the "
                          "API format: in ComfyUI use Workflow > Export (API), or use an example_workflows/api/*.api.json")
    if not isinstance(data, dict) or not data or not all(
            isinstance(n, dict) and "class_type" in n and isinstance(n.get("inputs", {}), dict) for n in data.values()):
        raise RunnerError(f"{where} is not an API-format workflow: expected an object of "
                          "{node_id: {\"class_type\": ..., \"inputs\": {...}}}")
    for n in data.values():
        n.setdefault("inputs", {})
    return data


def _node_sort_key(node_id: str):
    return (0, int(node_id), "") if str(node_id).isdigit() else (1, 0, str(node_id))


def node_title(node: dict) -> str | None:
    meta = node.get("_meta")
    return meta.get("title") if isinstance(meta, dict) else None


def resolve_nodes(prompt: dict, target: str) -> list:
    """Node ids that ``target`` names: a node id; else a unique ``_meta.title``; else every node of that
    class_type. Raises RunnerError when nothing matches or a title is ambiguous."""
    if target in prompt:
        return [target]
    by_title = sorted((k for k, n in prompt.items() if node_title(n) == target), key=_node_sort_key)
    if len(by_title) == 1:
        return by_title
    if len(by_title) > 1:
        raise RunnerError(f"title {target!r} matches nodes {', '.join(by_title)}; use a node id instead")
    by_class = sorted((k for k, n in prompt.items() if n.get("class_type") == target), key=_node_sort_key)
    if by_class:
        return by_class
    known = ", ".join(f"{k} ({node_title(n) or n.get('class_type')})" for k, n in
                      sorted(prompt.items(), key=lambda kv: _node_sort_key(kv[0])))
    raise RunnerError(f"no node with id, title or class {target!r} in the workflow; nodes: {known}")


def parse_value(text: str):
    """JSON when it parses (numbers, true/false/null, lists, quoted strings), else the raw string."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return text


def parse_override(spec: str) -> tuple:
    """``"TITLE_OR_ID.input=value"`` -> (target, input, value). The target may contain dots (the input name
    is what follows the last dot before '='); the value may contain '=' and dots."""
    key, sep, raw = spec.partition("=")
    target, dot, name = key.rpartition(".")
    if not sep or not dot or not target.strip() or not name.strip():
        raise RunnerError(f"--set {spec!r}: expected TITLE_OR_ID.input=value, e.g. --set \"DDIM Invert.steps=10\"")
    return target.strip(), name.strip(), parse_value(raw)


def apply_overrides(prompt: dict, overrides, warn=None) -> dict:
    """Return a copy of ``prompt`` with every ``--set`` applied (strings or parsed tuples)."""
    out = copy.deepcopy(prompt)
    for ov in overrides or ():
        target, name, value = parse_override(ov) if isinstance(ov, str) else ov
        for nid in resolve_nodes(out, target):
            inputs = out[nid]["inputs"]
            if name not in inputs and warn is not None:
                warn(f"note: node {nid} ({out[nid]['class_type']}) has no input {name!r} in the workflow; adding it")
            inputs[name] = value
    return out


def find_image_node(prompt: dict, spec: str | None = None) -> str:
    """The node that receives the uploaded image: ``spec`` (id/title/class) or the first LoadImage."""
    if spec:
        ids = resolve_nodes(prompt, spec)
        if len(ids) > 1:
            raise RunnerError(f"--image-node {spec!r} matches nodes {', '.join(ids)}; use a node id")
        return ids[0]
    loaders = sorted((k for k, n in prompt.items() if n.get("class_type") == "LoadImage"), key=_node_sort_key)
    if not loaders:
        raise RunnerError("the workflow has no LoadImage node; add one or name the node that takes the image "
                          "with --image-node TITLE_OR_ID")
    return loaders[0]


def set_image(prompt: dict, node_id: str, image_ref: str, input_name: str = "image") -> dict:
    out = copy.deepcopy(prompt)
    out[node_id]["inputs"][input_name] = image_ref
    return out


def list_images(folder) -> list:
    d = Path(folder)
    if not d.is_dir():
        raise RunnerError(f"--images {d}: not a folder")
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def output_stems(names) -> dict:
    """Image name -> output folder name: the stem (the whole name when the stem is only dots, as in
    '...png'), stem_ext when two images share a stem or the stem is results.json/csv; never '.' or '..'."""
    names = list(names)
    stem = {n: Path(n).stem if Path(n).stem.strip(".") else n for n in names}
    counts: dict = {}
    for s in stem.values():
        counts[s.lower()] = counts.get(s.lower(), 0) + 1
    used = {RESULTS_JSON, RESULTS_CSV}
    return {n: unique(s if counts[s.lower()] == 1 and s.lower() not in used
                      else f"{s}_{Path(n).suffix.lstrip('.').lower()}", used) for n, s in stem.items()}


class Refused(Exception):
    """A server-supplied output name that could leave the output folder: not downloaded, recorded."""


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
NAME_MAX = 120


def safe_part(text) -> str:
    """A server-supplied name part reduced to [A-Za-z0-9._-] and NAME_MAX characters (its suffix kept);
    '' when nothing usable is left ('', '.', '..', only dots)."""
    s = _UNSAFE.sub("_", str(text))
    if len(s) > NAME_MAX:
        stem, suf = os.path.splitext(s)
        s = stem[:NAME_MAX - len(suf[:16])] + suf[:16]
    return s if s.strip(".") else ""


def unique(name: str, used: set) -> str:
    """``name``, or name_1, name_2, ... (before the suffix): the first not in ``used`` (compared in lower
    case, for case-insensitive file systems); the result is added to ``used``."""
    stem, suf = os.path.splitext(name)
    cand, i = name, 1
    while cand.lower() in used:
        cand, i = f"{stem}_{i}{suf}", i + 1
    used.add(cand.lower())
    return cand


def output_name(f: dict, used: set) -> str:
    """The local file name of one server output ({node, filename, subfolder}): its file name reduced by
    safe_part, node-prefixed when another output of the image has it. Raises Refused for a file name with a
    path separator or NUL or made of dots only, or a subfolder that is absolute or climbs ('..')."""
    raw, sub = str(f.get("filename", "")), str(f.get("subfolder", ""))
    if not raw.strip(".") or any(c in raw for c in "/\\\0"):
        raise Refused(f"node {ascii(str(f.get('node'))[:40])}: file name {ascii(raw[:80])} refused")
    if "\0" in sub or sub.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", sub):
        raise Refused(f"node {ascii(str(f.get('node'))[:40])}: subfolder {ascii(sub[:80])} refused")
    name = safe_part(raw)
    if name.lower() in used:
        name = safe_part(f"{safe_part(f.get('node')) or 'node'}_{name}")
    return unique(name, used)


# ----------------------------------------------------------------------------------------- multipart
def build_multipart(fields: dict, files: dict, boundary: str | None = None) -> tuple:
    """RFC 7578 body. ``fields``: name -> str; ``files``: name -> (filename, bytes, content_type).
    Returns (body bytes, Content-Type header value)."""
    boundary = boundary or ("----ddiminv" + uuid.uuid4().hex)
    b = boundary.encode("ascii")

    def q(s: str) -> str:
        return s.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")

    buf = io.BytesIO()
    for name, value in fields.items():
        buf.write(b"--" + b + b"\r\n")
        buf.write(f'Content-Disposition: form-data; name="{q(name)}"\r\n\r\n'.encode("utf-8"))
        buf.write(str(value).encode("utf-8") + b"\r\n")
    for name, (filename, data, ctype) in files.items():
        buf.write(b"--" + b + b"\r\n")
        buf.write(f'Content-Disposition: form-data; name="{q(name)}"; filename="{q(filename)}"\r\n'.encode("utf-8"))
        buf.write(f"Content-Type: {ctype or 'application/octet-stream'}\r\n\r\n".encode("utf-8"))
        buf.write(bytes(data) + b"\r\n")
    buf.write(b"--" + b + b"--\r\n")
    return buf.getvalue(), f"multipart/form-data; boundary={boundary}"


def guess_type(name: str) -> str:
    ext = Path(name).suffix.lower()
    return {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
            ".bmp": "image/bmp", ".gif": "image/gif", ".tif": "image/tiff", ".tiff": "image/tiff"}.get(
        ext, "application/octet-stream")


# ----------------------------------------------------------------------------------------- results
def atomic_write(path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def extract_ui(outputs: dict) -> tuple:
    """History/executed outputs -> (files, texts, other). files: [{node, filename, subfolder, type}];
    texts: {node: [str]} (every 'text' entry); other: {node: {key: value}} (non-file UI entries)."""
    files, texts, other = [], {}, {}
    for nid in sorted(outputs or {}, key=_node_sort_key):
        ui = outputs[nid] or {}
        if not isinstance(ui, dict):
            continue
        for key, val in ui.items():
            if isinstance(val, list) and val and all(isinstance(v, dict) and "filename" in v for v in val):
                for v in val:
                    files.append({"node": nid, "key": key, "filename": v["filename"],
                                  "subfolder": v.get("subfolder", ""), "type": v.get("type", "output")})
            elif key == "text":
                vals = val if isinstance(val, list) else [val]
                texts.setdefault(nid, []).extend(str(v) for v in vals)
            elif key not in ("animated",):
                try:
                    json.dumps(val)
                except (TypeError, ValueError):
                    val = repr(val)
                other.setdefault(nid, {})[key] = val
    return files, texts, other


def figure_from(texts: dict, other: dict | None = None):
    """The workflow's headline number, when it exposes one: a numeric 'ddim_metrics'/'metrics'/'psnr' UI
    entry, else the last 'NN.NN dB' in the UI texts. None when there is none."""
    for nid in sorted(other or {}, key=_node_sort_key):
        for key in ("ddim_metrics", "metrics", "psnr", "round_trip_psnr"):
            v = (other or {})[nid].get(key)
            while isinstance(v, list) and v:
                v = v[0]
            if isinstance(v, dict):
                v = next((x for x in v.values() if isinstance(x, (int, float)) and not isinstance(x, bool)), None)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v)
    last = None
    for nid in sorted(texts or {}, key=_node_sort_key):
        for t in texts[nid]:
            for m in _DB_RE.finditer(t):
                last = float(m.group(1))
    return last


class Results:
    """results.json / results.csv under ``out``: one record per image name, rewritten atomically."""

    def __init__(self, out_dir, meta: dict | None = None):
        self.out = Path(out_dir)
        self.json_path = self.out / RESULTS_JSON
        self.csv_path = self.out / RESULTS_CSV
        self.meta = dict(meta or {})
        self.images: dict = {}

    @classmethod
    def load(cls, out_dir, meta: dict | None = None) -> "Results":
        r = cls(out_dir, meta)
        if r.json_path.exists():
            try:
                data = json.loads(r.json_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, OSError) as e:
                raise RunnerError(f"{r.json_path} is unreadable ({e}); move it away to start over") from None
            imgs = data.get("images", {}) if isinstance(data, dict) else {}
            if isinstance(imgs, list):  # tolerate a list of records
                imgs = {rec.get("image"): rec for rec in imgs if isinstance(rec, dict) and rec.get("image")}
            r.images = {k: v for k, v in imgs.items() if isinstance(v, dict)}
        return r

    def done(self, name: str) -> bool:
        return self.images.get(name, {}).get("status") == "ok"

    def pending(self, names) -> list:
        return [n for n in names if not self.done(n)]

    def record(self, name: str, rec: dict) -> None:
        self.images[name] = {"image": name, **rec}
        self.save()

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        names = sorted(self.images)
        summary = {"total": len(names), "ok": sum(1 for n in names if self.done(n))}
        summary["failed"] = summary["total"] - summary["ok"]
        doc = {"version": 1, **self.meta, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "summary": summary,
               "images": {n: self.images[n] for n in names}}
        atomic_write(self.json_path, (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode("utf-8"))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
        w.writeheader()
        for n in names:
            rec = self.images[n]
            texts = rec.get("texts") or {}
            w.writerow({
                "image": n, "status": rec.get("status", ""), "server": rec.get("server", ""),
                "seconds": "" if rec.get("seconds") is None else f"{rec['seconds']:.3f}",
                "outputs": ";".join(rec.get("outputs") or []),
                "figure": "" if rec.get("figure") is None else rec["figure"],
                "texts": " | ".join(t for nid in sorted(texts, key=_node_sort_key) for t in texts[nid]),
                "error": rec.get("error") or "", "prompt_id": rec.get("prompt_id") or "",
            })
        atomic_write(self.csv_path, buf.getvalue().encode("utf-8"))


# ----------------------------------------------------------------------------------------- network
def normalize_server(url: str) -> str:
    url = url.strip().rstrip("/")
    if not re.match(r"^https?://", url):
        url = "http://" + url
    return url


def ws_url(server: str, client_id: str) -> str:
    u = urllib.parse.urlsplit(server)
    scheme = "wss" if u.scheme == "https" else "ws"
    return urllib.parse.urlunsplit((scheme, u.netloc, u.path.rstrip("/") + "/ws", f"clientId={client_id}", ""))


def format_prompt_error(status: int, body) -> str:
    """POST /prompt 400 body -> one readable line (validation errors per node)."""
    if not isinstance(body, dict):
        return f"HTTP {status}: {str(body)[:500]}"
    parts = []
    err = body.get("error")
    if isinstance(err, dict):
        parts.append(err.get("message") or err.get("type") or "invalid prompt")
        if err.get("details"):
            parts.append(str(err["details"]))
    elif err:
        parts.append(str(err))
    for nid, ne in (body.get("node_errors") or {}).items():
        for e in (ne or {}).get("errors", []):
            parts.append(f"node {nid} ({ne.get('class_type', '?')}): {e.get('message', '')}"
                         f"{': ' + str(e.get('details')) if e.get('details') else ''}")
    return f"prompt rejected (HTTP {status}): " + "; ".join(p for p in parts if p)


def format_exec_error(data: dict) -> str:
    return (f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
            f"{data.get('exception_type', 'error')}: {str(data.get('exception_message', '')).strip()}")


def unreachable_message(url: str, err) -> str:
    u = urllib.parse.urlsplit(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    return (f"ComfyUI server {url} is unreachable ({err.__class__.__name__}: {err}). Start it with "
            f"`python main.py --listen {u.hostname} --port {port}` (add --cpu without a GPU) or fix --server.")


class Worker:
    """One server: one websocket, one prompt in flight."""

    def __init__(self, session, server: str, args, log):
        self.session = session
        self.server = server
        self.args = args
        self.log = log
        self.client_id = uuid.uuid4().hex
        self.ws = None

    async def check(self) -> None:
        import aiohttp
        try:
            async with self.session.get(self.server + "/system_stats",
                                        timeout=aiohttp.ClientTimeout(total=10)) as r:
                if r.status >= 400:
                    raise RunnerError(f"{self.server}/system_stats answered HTTP {r.status}: is this a ComfyUI server?")
                await r.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise RunnerError(unreachable_message(self.server, e)) from None

    async def connect(self) -> None:
        import aiohttp
        if self.ws is not None and not self.ws.closed:
            return
        try:
            self.ws = await self.session.ws_connect(ws_url(self.server, self.client_id), heartbeat=30,
                                                    max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_close=5)
                                                    if hasattr(aiohttp, "ClientWSTimeout") else 10)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise ServerGone(unreachable_message(self.server, e)) from None

    async def close(self) -> None:
        if self.ws is not None and not self.ws.closed:
            await self.ws.close()

    async def _json(self, method: str, path: str, **kw):
        import aiohttp
        try:
            async with self.session.request(method, self.server + path, **kw) as r:
                text = await r.text()
                try:
                    body = json.loads(text) if text else None
                except json.JSONDecodeError:
                    body = text
                return r.status, body
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError) as e:
            raise ServerGone(f"{self.server} stopped answering ({e.__class__.__name__}: {e})") from None

    async def upload(self, path: Path) -> str:
        fields = {"type": "input", "overwrite": "true"}
        if self.args.upload_subfolder:
            fields["subfolder"] = self.args.upload_subfolder
        body, ctype = build_multipart(fields, {"image": (path.name, path.read_bytes(), guess_type(path.name))})
        status, resp = await self._json("POST", "/upload/image", data=body, headers={"Content-Type": ctype})
        if status != 200 or not isinstance(resp, dict) or "name" not in resp:
            raise RuntimeError(f"upload of {path.name} failed: HTTP {status}: {str(resp)[:300]}")
        sub = resp.get("subfolder") or ""
        return f"{sub}/{resp['name']}" if sub else resp["name"]

    async def history(self, prompt_id: str, wait: float = 15.0):
        deadline = time.monotonic() + wait
        while True:
            status, body = await self._json("GET", f"/history/{prompt_id}")
            if status == 200 and isinstance(body, dict) and prompt_id in body:
                return body[prompt_id]
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.2)

    async def cancel(self, prompt_id: str) -> None:
        try:
            await self._json("POST", "/queue", json={"delete": [prompt_id]})
            await self._json("POST", "/interrupt", json={"prompt_id": prompt_id})
        except ServerGone:
            pass

    async def follow(self, prompt_id: str, deadline: float, on_progress) -> tuple:
        """Read websocket messages until the prompt ends. Returns (ok, error, executed_outputs)."""
        import aiohttp
        executed: dict = {}
        last_poll = time.monotonic()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False, "timeout", executed
            try:
                msg = await self.ws.receive(timeout=min(left, HISTORY_POLL_S / 2))
            except asyncio.TimeoutError:
                msg = None
            if msg is not None and msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING,
                                                aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSE):
                # the socket dropped: fall back to polling history (and try to reconnect once)
                self.ws = None
                h = await self.history(prompt_id, wait=0)
                if h is not None:
                    st = h.get("status") or {}
                    return bool(st.get("completed", True)), None if st.get("completed", True) else \
                        _history_error(h), executed
                try:
                    await self.connect()
                except ServerGone:
                    raise
                continue
            if time.monotonic() - last_poll > HISTORY_POLL_S:  # belt and braces: a missed message cannot hang us
                last_poll = time.monotonic()
                h = await self.history(prompt_id, wait=0)
                if h is not None and (h.get("status") or {}).get("status_str") in ("success", "error"):
                    st = h["status"]
                    return bool(st.get("completed")), None if st.get("completed") else _history_error(h), executed
            if msg is None or msg.type != aiohttp.WSMsgType.TEXT:
                continue
            try:
                m = json.loads(msg.data)
            except json.JSONDecodeError:
                continue
            typ, data = m.get("type"), m.get("data") or {}
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if typ == "progress" and data.get("prompt_id") == prompt_id:
                on_progress(data)
            elif typ == "executed" and data.get("prompt_id") == prompt_id:
                if data.get("output") is not None:
                    executed[str(data.get("node"))] = data["output"]
            elif typ == "execution_error" and data.get("prompt_id") == prompt_id:
                return False, format_exec_error(data), executed
            elif typ == "execution_interrupted" and data.get("prompt_id") == prompt_id:
                return False, f"interrupted at node {data.get('node_id')} ({data.get('node_type')})", executed
            elif typ == "execution_success" and data.get("prompt_id") == prompt_id:
                return True, None, executed
            elif typ == "executing" and data.get("prompt_id") == prompt_id and data.get("node") is None:
                return True, None, executed

    async def download(self, f: dict, dest_dir: Path, used: set) -> str:
        """Fetch one output into ``dest_dir`` under output_name(); Refused when the name (or where it
        resolves) is not inside the output folder: nothing is requested or written then."""
        import aiohttp
        name = output_name(f, used)
        root = Path(self.args.out).resolve()
        if root not in (dest_dir / name).resolve().parents:
            raise Refused(f"node {ascii(str(f.get('node'))[:40])}: {ascii(name)} resolves outside {root}")
        q = urllib.parse.urlencode({"filename": f["filename"], "subfolder": f.get("subfolder", ""),
                                    "type": f.get("type", "output")})
        try:
            async with self.session.get(f"{self.server}/view?{q}") as r:
                if r.status != 200:
                    raise RuntimeError(f"download of {f['filename']} failed: HTTP {r.status}")
                data = await r.read()
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError) as e:
            raise ServerGone(f"{self.server} stopped answering ({e.__class__.__name__}: {e})") from None
        dest_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(dest_dir / name, data)
        return name

    async def process(self, path: Path, prompt_template: dict, image_node: str, dest_dir: Path,
                      on_progress) -> dict:
        """Run one image; returns the results record (status ok/error). ServerGone propagates."""
        t0 = time.monotonic()
        rec = {"server": self.server, "prompt_id": None, "outputs": [], "texts": {}, "ui": {}, "figure": None,
               "error": None}
        prompt_id = None
        try:
            await self.connect()
            ref = await self.upload(path)
            prompt = set_image(prompt_template, image_node, ref, self.args.image_input)
            prompt_id = str(uuid.uuid4())
            rec["prompt_id"] = prompt_id
            status, body = await self._json("POST", "/prompt", json={"prompt": prompt, "client_id": self.client_id,
                                                                     "prompt_id": prompt_id})
            if status != 200:
                raise RuntimeError(format_prompt_error(status, body))
            if isinstance(body, dict) and body.get("prompt_id"):
                prompt_id = rec["prompt_id"] = str(body["prompt_id"])
            ok, err, executed = await self.follow(prompt_id, t0 + self.args.timeout, on_progress)
            if err == "timeout":
                await self.cancel(prompt_id)
                raise RuntimeError(f"timed out after {self.args.timeout:g}s (raise --timeout)")
            h = await self.history(prompt_id, wait=15.0)
            outputs = dict(executed)
            if h is not None:
                outputs.update(h.get("outputs") or {})
                if ok and not (h.get("status") or {}).get("completed", True):
                    ok, err = False, _history_error(h)
            files, texts, other = extract_ui(outputs)
            rec["texts"], rec["ui"] = texts, other
            rec["figure"] = figure_from(texts, other)
            if not ok:
                raise RuntimeError(err or "execution failed")
            used: set = set()
            for f in files:
                try:
                    rec["outputs"].append(await self.download(f, dest_dir, used))
                except Refused as e:
                    rec.setdefault("refused", []).append(str(e))
            if not files:
                rec["warning"] = "the workflow produced no file outputs (add a SaveImage node)"
            if rec.get("refused"):
                raise RuntimeError(f"refused {len(rec['refused'])} output(s) the server named unsafely: "
                                   + "; ".join(rec["refused"]))
            rec["status"] = "ok"
        except ServerGone:
            raise
        except Exception as e:  # noqa: BLE001 - recorded per image, the batch goes on
            rec["status"] = "error"
            rec["error"] = str(e) or e.__class__.__name__
        rec["seconds"] = round(time.monotonic() - t0, 3)
        return rec


def _history_error(h: dict) -> str:
    for typ, data in (h.get("status") or {}).get("messages", []) or []:
        if typ == "execution_error":
            return format_exec_error(data)
        if typ == "execution_interrupted":
            return f"interrupted at node {data.get('node_id')} ({data.get('node_type')})"
    return "execution failed (see the server log)"


# ----------------------------------------------------------------------------------------- driver
class Progress:
    def __init__(self, total: int, stream=None, quiet: bool = False):
        self.total, self.n = total, 0
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.width = len(str(max(total, 1)))
        self._step_len = 0

    def line(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.stream, flush=True)

    def done(self, name: str, rec: dict) -> None:
        self.n += 1
        extra = f" figure={rec['figure']:.2f}" if isinstance(rec.get("figure"), float) else ""
        tail = f" {rec['error']}" if rec.get("error") else ""
        self.clear_step()
        self.line(f"[{self.n:>{self.width}}/{self.total}] {name} {rec['status']} {rec.get('seconds') or 0:.1f}s "
                  f"@{rec.get('server') or '?'}{extra}{tail}")

    def step(self, name: str, data: dict) -> None:
        """Live sampler progress ('progress' messages) on an interactive terminal only."""
        if self.quiet or not getattr(self.stream, "isatty", lambda: False)():
            return
        try:
            text = f"  {name}: node {data.get('node')} {int(data['value'])}/{int(data['max'])}"
        except (KeyError, TypeError, ValueError):
            return
        self.stream.write("\r" + text.ljust(self._step_len))
        self._step_len = len(text)
        self.stream.flush()

    def clear_step(self) -> None:
        if self._step_len:
            self.stream.write("\r" + " " * self._step_len + "\r")
            self._step_len = 0


async def run_async(args) -> int:
    import aiohttp

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    servers = []
    for s in args.server or ["http://127.0.0.1:8188"]:
        s = normalize_server(s)
        if s not in servers:
            servers.append(s)
    template = apply_overrides(load_workflow(args.workflow), args.set, warn=log)
    image_node = find_image_node(template, args.image_node)
    images = list_images(args.images)
    if not images:
        raise RunnerError(f"--images {args.images}: no images ({', '.join(IMAGE_EXTS)})")
    names = [p.name for p in images]
    by_name = dict(zip(names, images))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = Results.load(out, meta={"workflow": str(args.workflow), "images_dir": str(args.images),
                                      "overrides": list(args.set or [])})
    stems = output_stems(names)
    todo = results.pending(names)
    skipped = len(names) - len(todo)
    progress = Progress(len(todo), quiet=args.quiet)
    if skipped:
        progress.line(f"resuming: {skipped} image(s) already ok in {results.json_path}, {len(todo)} to do")
    if not todo:
        progress.line("nothing to do")
        return 0

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=max(60.0, args.timeout))
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        workers = [Worker(session, s, args, log) for s in servers]
        alive, problems = [], []
        for w, res in zip(workers, await asyncio.gather(*(w.check() for w in workers), return_exceptions=True)):
            if isinstance(res, BaseException):
                problems.append(str(res))
            else:
                alive.append(w)
        for p in problems:
            log(("error: " if not alive else "warning: ") + p)
        if not alive:
            raise RunnerError("no ComfyUI server reachable; nothing was run")
        progress.line(f"{len(todo)} image(s) over {len(alive)} server(s): {', '.join(w.server for w in alive)}")

        queue: asyncio.Queue = asyncio.Queue()
        for n in todo:
            queue.put_nowait((n, 0))
        live = {"n": len(alive)}
        pending = {"n": len(todo)}
        failures = {"n": 0}

        def finish(name: str, rec: dict) -> None:
            results.record(name, rec)
            if rec["status"] != "ok":
                failures["n"] += 1
            pending["n"] -= 1
            progress.done(name, rec)

        async def work(w: Worker):
            try:
                while pending["n"] > 0:
                    try:
                        name, tries = queue.get_nowait()
                    except asyncio.QueueEmpty:  # others are busy; an image may come back if their server dies
                        await asyncio.sleep(0.1)
                        continue
                    try:
                        rec = await w.process(by_name[name], template, image_node, out / stems[name],
                                              on_progress=lambda d, n=name: progress.step(n, d))
                    except ServerGone as e:
                        if tries < 1 and live["n"] > 1:
                            log(f"warning: {e}; {name} goes to another server, {w.server} is dropped")
                            queue.put_nowait((name, tries + 1))
                        else:
                            log(f"warning: {e}; {w.server} is dropped")
                            finish(name, {"server": w.server, "status": "error", "error": str(e), "seconds": None,
                                          "outputs": [], "texts": {}, "figure": None})
                        return
                    finish(name, rec)
            finally:
                live["n"] -= 1
                await w.close()

        await asyncio.gather(*(work(w) for w in alive))
        while not queue.empty():  # every server went away
            name, _ = queue.get_nowait()
            results.record(name, {"server": None, "status": "error", "error": "no server left to run it",
                                  "seconds": None, "outputs": [], "texts": {}, "figure": None})
            failures["n"] += 1
    ok = sum(1 for n in names if results.done(n))
    progress.line(f"done: {ok}/{len(names)} ok, {failures['n']} failed; results in {results.json_path}")
    return 0 if ok == len(names) else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="runner.py", description="Invert and reconstruct (or edit) every image of a folder through "
        "running ComfyUI servers, using an API-format workflow as the template.")
    p.add_argument("--workflow", required=True, help="API-format workflow JSON (e.g. example_workflows/api/*.api.json)")
    p.add_argument("--images", required=True, help="folder of input images")
    p.add_argument("--out", required=True, help="output folder: OUT/<image stem>/..., results.json, results.csv")
    p.add_argument("--server", action="append", metavar="URL",
                   help="ComfyUI server URL; repeat to spread the work (default http://127.0.0.1:8188)")
    p.add_argument("--set", action="append", metavar="TITLE_OR_ID.input=value", default=[],
                   help="override a node input by node id, _meta.title or class_type (all nodes of that class); "
                        "value parsed as JSON when possible, else a string (quote to force a string: 'X.text=\"42\"'). Repeatable.")
    p.add_argument("--image-node", metavar="TITLE_OR_ID", help="node that gets the uploaded image "
                   "(default: the first LoadImage)")
    p.add_argument("--image-input", default="image", help="input name on --image-node (default: image)")
    p.add_argument("--upload-subfolder", default="", help="input subfolder for the uploads (default: none)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per image (default 600)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.timeout <= 0:
        print("error: --timeout must be > 0", file=sys.stderr)
        return 2
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
