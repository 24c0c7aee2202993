"""What the one-server client (tools/runner.py) and the Ray batch job (tools/ray_batch.py) share, none of it
networked: API-workflow loading and ``--set`` overrides, safe local names for server-supplied outputs, writing
them inside OUT, results.json/results.csv, the error texts of ComfyUI's answers, and the progress lines."""
import contextlib
import copy
import csv
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yarl

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
RESULTS_JSON, RESULTS_CSV = "results.json", "results.csv"
CSV_FIELDS = ("image", "status", "server", "seconds", "outputs", "figure", "texts", "error", "prompt_id")
NAME_MAX = 120  # characters in a local file name made from server-supplied parts
_DB_RE = re.compile(r"(-?\d+(?:\.\d+)?)\s*dB")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class RunnerError(Exception):
    """A problem the user must fix (bad workflow, bad --set, no server): printed, exit status 2."""


def run_cli(job) -> int:
    """Run ``job()`` as a command's body: its exit status, a RunnerError printed as ``error: ...`` (status 2),
    Ctrl-C as a hint to rerun the same command, which resumes (status 130)."""
    try:
        return job()
    except RunnerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


class ServerGone(Exception):
    """The server stopped answering mid-image (the Ray job moves the image to another actor)."""


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
    """A copy of ``prompt`` with ``overrides`` set: "TARGET.input=value" strings or (target, input, value)."""
    out = copy.deepcopy(prompt)
    for target, name, value in (o if isinstance(o, tuple) else parse_override(o) for o in overrides or ()):
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


def settings_key(prompt: dict, image_node: str) -> str:
    """A hash of everything an item's result depends on but its image: the workflow after --set and manifest
    values, and the node that gets the image (whose placeholder image name is left out)."""
    prompt = copy.deepcopy(prompt)
    prompt[image_node]["inputs"].pop("image", None)
    text = json.dumps({"prompt": prompt, "image_node": image_node}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


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


def store(rec: dict, files, dest_dir, root) -> dict:
    """Write an item's downloaded ``files`` [(local name, bytes)] into ``dest_dir``, a folder under ``root``
    (OUT): a name that resolves outside ``root`` (a planted symlink) is refused, not written. ``rec`` gets the
    names written; an item with refused outputs is an error listing them."""
    root, dest_dir = Path(root).resolve(), Path(dest_dir)
    for name, data in files:
        if root not in (dest_dir / name).resolve().parents:
            rec.setdefault("refused", []).append(f"{name!a} resolves outside {root}")
            continue
        dest_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(dest_dir / name, data)
        rec["outputs"].append(name)
    if rec.get("refused") and rec.get("status") == "ok":
        rec["status"], rec["error"] = "error", (f"refused {len(rec['refused'])} output(s) the server named "
                                                "unsafely: " + "; ".join(rec["refused"]))
    return rec


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

    def done(self, name: str, key=None) -> bool:
        """Ok, and (given the item's settings_key) made with these settings."""
        rec = self.images.get(name, {})
        return rec.get("status") == "ok" and (key is None or rec.get("settings") == key)

    def todo(self, keys: dict, progress, noun: str = "item") -> list:
        """The names of ``keys`` (name -> settings_key) not yet done with their settings, in order; says on
        ``progress`` how many are resumed and which are redone because their settings changed."""
        todo = [n for n in keys if not self.done(n, keys[n])]
        if changed := [n for n in todo if self.done(n)]:
            progress.line(f"{len(changed)} {noun}(s) done with other settings are redone: "
                          + ", ".join(changed[:20]) + (", ..." if len(changed) > 20 else ""))
        if len(todo) < len(keys):
            progress.line(f"resuming: {len(keys) - len(todo)} {noun}(s) already ok in {self.json_path}, "
                          f"{len(todo)} to do")
        if not todo:
            progress.line("nothing to do")
        return todo

    def finish(self, keys: dict, progress) -> int:
        """The job's last line (items ok with their settings of ``keys``, failed, where the results are) and its
        exit status: 0 all ok, else 1."""
        ok = sum(self.done(n, keys[n]) for n in keys)
        progress.line(f"done: {ok}/{len(keys)} ok, {len(keys) - ok} failed; results in {self.json_path}")
        return 0 if ok == len(keys) else 1

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


def cancel_prompt(url: str, pid: str, timeout: float = 3.0):
    """Best effort, for a prompt whose sender is gone (before its item is sent elsewhere): delete ``pid`` from
    ``url``'s queue when pending, interrupt it (by its id) when running. What was done, or None (not there, or
    the server does not answer: then nothing of it runs). Only a prompt the queue lists is interrupted, so an
    older server that ignores the id cannot lose someone else's run."""
    def call(method, path, body=None):
        req = urllib.request.Request(normalize_server(url) + path, method=method,  # noqa: S310  (http(s) only)
                                     data=None if body is None else json.dumps(body).encode("utf-8"),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310  (normalize_server: http(s))
            return json.loads(r.read(1 << 24) or b"null")

    try:
        q = call("GET", "/queue")
        ids = {k: [e[1] for e in q.get(k) or [] if isinstance(e, list) and len(e) > 1]
               for k in ("queue_pending", "queue_running")} if isinstance(q, dict) else {}
        if pid in ids.get("queue_pending", []):
            call("POST", "/queue", {"delete": [pid]})
            return "deleted from the queue"
        if pid in ids.get("queue_running", []):
            call("POST", "/interrupt", {"prompt_id": pid})
            return "interrupted"
    except (OSError, ValueError):
        pass
    return None


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


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """A line per finished item on stderr (items done, failures, rate, ETA), the sampler's steps live on a
    terminal; control characters are shown as '?' (server text cannot drive the terminal)."""

    def __init__(self, total: int, stream=None, clock=time.monotonic):
        self.total, self.n, self.failed, self.stream, self.step_len = total, 0, 0, stream or sys.stderr, 0
        self.clock, self.t0 = clock, clock()

    def start(self, total: int) -> None:
        self.total, self.n, self.failed, self.t0 = total, 0, 0, self.clock()

    def line(self, text: str) -> None:
        self.stream.write("\r" + " " * self.step_len + "\r" if self.step_len else "")
        self.step_len = 0
        print(_CONTROL.sub("?", text), file=self.stream, flush=True)

    def done(self, name: str, rec: dict) -> None:
        self.n += 1
        self.failed += rec.get("status") != "ok"
        figure = f" figure={rec['figure']:.2f}" if isinstance(rec.get("figure"), float) else ""
        error = f" {rec['error']}" if rec.get("error") else ""
        elapsed = max(self.clock() - self.t0, 1e-9)
        left = self.total - self.n
        eta = f", ETA {_duration(left * elapsed / self.n)}" if left > 0 else ""
        self.line(f"[{self.n:>{len(str(self.total))}}/{self.total}] {name} {rec['status']} "
                  f"{rec.get('seconds') or 0:.1f}s @{rec.get('server') or '?'}{figure}{error}"
                  f"  ({self.failed} failed, {60 * self.n / elapsed:.1f}/min{eta})")

    def step(self, name: str, data: dict) -> None:
        if self.stream.isatty() and isinstance(data.get("value"), int) and isinstance(data.get("max"), int):
            text = _CONTROL.sub("?", f"  {name}: node {data.get('node')} {data['value']}/{data['max']}")
            self.stream.write("\r" + text.ljust(self.step_len))
            self.step_len = len(text)
            self.stream.flush()
