#!/usr/bin/env python3
"""Batch job on Ray: an API-format workflow on every item of a manifest, over a pool of Ray actors that each
own one ComfyUI server (started by the actor, on the GPU Ray gives it, or an existing server per --server).

    # this machine: two actors, each starting its own ComfyUI (add --gpus-per-actor 1 on a GPU machine)
    python tools/ray_batch.py --workflow example_workflows/api/invert_and_reconstruct.api.json \\
        --images photos/ --out results/ --actors 2 --set "CheckpointLoaderSimple.ckpt_name=my.safetensors"
    # running servers, one actor each; a manifest with a prompt per image (CSV columns TARGET.input)
    python tools/ray_batch.py ... --manifest items.csv --server http://127.0.0.1:8188 --server http://127.0.0.1:8189
    # a Ray cluster (`ray start --head` on one machine, `ray start --address=HEAD:6379` on the others)
    python tools/ray_batch.py ... --address HEAD:6379 --actors 8 --gpus-per-actor 1 --comfyui /opt/ComfyUI

The actor calls tools/runner.py's one-server ``Client``; the driver (this process) reads the images, writes the
outputs to OUT/<item>/ and results.json/results.csv after every item, so a rerun with the same --out skips the
items already ok with the same settings and redoes those done with other settings (a hash in each record). Ray
places the actors (CPUs/GPUs), restarts a crashed actor and retries its call; an item whose server stops answering
goes to another actor (at most --moves times) and that actor is retired.
Exit status: 0 all ok, 1 some item failed, 2 usage error, Ray missing or no actor ready.
"""
import argparse
import collections
import csv
import json
import os
import shutil
import socket
import sys
import tempfile
import uuid
from pathlib import Path

_TOOLS = str(Path(__file__).resolve().parent)
ROOT = str(Path(_TOOLS).parent)
if _TOOLS not in sys.path:
    sys.path.insert(0, _TOOLS)
from batchlib import (  # noqa: E402  (tools/ is not a package on the path of a script)
    IMAGE_EXTS, Progress, Results, RunnerError, apply_overrides, cancel_prompt, find_image_node, list_images,
    load_workflow, output_stems, parse_override, run_cli, settings_key, store)

CLUSTER_EXCLUDES = [".git", ".venv", ".comfyui", ".cache", "out", "bench/out", "node_modules", "*.safetensors"]


# ------------------------------------------------------------------------------------------------ manifest
def load_items(args) -> list:
    """[(item id, image path, overrides [(target, input, value)])] from --images FOLDER or --manifest CSV/JSON.
    CSV: an ``image`` column (paths relative to the manifest), an optional ``id``, every other column a
    TARGET.input override (the cell is JSON when it parses, else a string; an empty cell sets nothing).
    JSON: a list of {"image": path, "id": optional, "set": {"TARGET.input": value}}."""
    if args.images:
        return [(p.name, p, []) for p in list_images(args.images)]
    path = Path(args.manifest)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise RunnerError(f"--manifest {path}: {e.strerror or e}") from None
    rows = []
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise RunnerError(f"--manifest {path} is not valid JSON: {e}") from None
        for i, row in enumerate(data if isinstance(data, list) else [None]):
            if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(
                    row.get("set", {}), dict):
                raise RunnerError(f'--manifest {path}: item {i} is not {{"image": path, "set": {{...}}}}; '
                                  'the file must be a list of such objects')
            sets = [(*parse_override(f"{k}=")[:2], v) for k, v in row.get("set", {}).items()]
            rows.append((row.get("id"), row["image"], sets))
    else:
        reader = csv.DictReader(text.splitlines())
        if "image" not in (reader.fieldnames or []):
            raise RunnerError(f"--manifest {path}: no 'image' column (header: {reader.fieldnames}); "
                              "the first line names the columns: image[,id][,TARGET.input ...]")
        keys = [k for k in reader.fieldnames if k not in ("image", "id")]
        for k in keys:
            parse_override(f"{k}=")  # a clear error for a column that names no input
        for row in reader:
            rows.append((row.get("id") or None, row["image"],
                         [parse_override(f"{k}={row[k]}") for k in keys if row.get(k) not in (None, "")]))
    items, seen = [], set()
    for ident, image, sets in rows:
        image_path = path.parent / image
        ident = str(ident) if ident not in (None, "") else image_path.name
        if not ident.strip(".") or any(c in ident for c in "/\\\0"):  # "." would write into OUT itself
            raise RunnerError(f"--manifest {path}: item id {ident!r} cannot be a folder name under --out; give "
                              "the row an 'id' with a letter or digit and no '/', '\\' or NUL")
        if ident in seen:
            raise RunnerError(f"--manifest {path}: item {ident!r} appears twice; give each row its own 'id'")
        seen.add(ident)
        items.append((ident, image_path, sets))
    return items


# ------------------------------------------------------------------------------------------------ the actor
class ComfyActor:
    """One ComfyUI server and a Client to it. Wrapped by ray.remote at run time (Ray is a development extra).
    Imports happen here, on the worker: on a cluster the tools/ folder arrives as the job's working_dir."""

    def __init__(self, tools_dir, server, start: dict, timeout: float):
        tools = tools_dir if tools_dir and os.path.isdir(tools_dir) else os.path.join(os.getcwd(), "tools")
        for p in (tools, os.path.dirname(tools)):
            if p not in sys.path:
                sys.path.insert(0, p)
        import runner
        self.runner, self.handle, self.timeout = runner, None, timeout
        if server is None:  # this actor's own server, on the GPU Ray gave it (CUDA_VISIBLE_DEVICES is inherited)
            from ddiminv_dev.server import start_server
            # its folder (inputs, a copy of every output, the log) goes when it stops; under the job's folder,
            # which the driver deletes at the end, so a killed actor's folder goes too (on the driver's machine)
            os.makedirs(start["tmp_root"], exist_ok=True)
            workdir = tempfile.mkdtemp(prefix="ddiminv-server-", dir=start["tmp_root"])
            self.handle = start_server(extra_args=start["args"], models=False, cpu=start["cpu"],
                                       comfy=start["comfyui"], timeout=start["timeout"], die_with_parent=True,
                                       workdir=workdir, remove_workdir=True)
            server = self.handle.url
        self.url, self.session, self.client = runner.normalize_server(server), None, None

    async def _client(self):
        if self.client is None:
            import aiohttp
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=10, sock_read=max(60.0, self.timeout)))
            self.client = self.runner.Client(self.session, self.url, self.timeout)
        return self.client

    # async methods: Ray runs them on the actor's event loop (the driver sends one call at a time per actor)
    async def ready(self) -> dict:
        """Connects the websocket; {"url", "pid" (of a server this actor started), "error" (unreachable)}."""
        try:
            await (await self._client()).connect()
        except self.runner.ServerGone as e:
            return {"url": self.url, "error": str(e)}
        return {"url": self.url, "pid": self.handle.proc.pid if self.handle else None, "error": None}

    async def run(self, name: str, image: bytes, prompt: dict, image_node: str, prompt_id=None) -> tuple:
        """(record, [(output name, bytes)]); a server that stopped answering: ({"gone": why}, []). Ray's retry
        after a restart repeats ``prompt_id``: a prompt the server already has is followed, not run twice."""
        try:
            return await (await self._client()).run(name, image, prompt, image_node, prompt_id=prompt_id)
        except self.runner.ServerGone as e:
            return {"gone": str(e)}, []

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
            await self.session.close()
        if self.handle is not None:
            self.handle.stop()


# ------------------------------------------------------------------------------------------------ driver
def job_folder() -> Path:
    """A new temporary folder for this job's actors' servers, owned by this driver (its file ``driver``: host and
    pid). The folder of an earlier driver on this host that is gone (killed with SIGKILL: nothing ran its
    cleanup) is deleted first; a live driver's, another host's or one without an owner is left alone."""
    host = socket.gethostname()
    for old in Path(tempfile.gettempdir()).glob("ddiminv-batch-*"):
        try:
            owner_host, pid = (old / "driver").read_text().split()
            os.kill(int(pid), 0)
        except ProcessLookupError:
            if owner_host == host:
                shutil.rmtree(old, ignore_errors=True)
        except (OSError, ValueError):  # no owner file, not ours to judge (or the pid is someone else's: alive)
            continue
    new = Path(tempfile.mkdtemp(prefix="ddiminv-batch-"))
    (new / "driver").write_text(f"{host} {os.getpid()}")
    return new


def import_ray():
    try:
        import ray
    except ImportError:
        raise RunnerError("Ray is not installed in this Python: `make setup` installs it into .venv (or "
                          "`python -m pip install ray`); the pack itself does not need it") from None
    return ray


def init_local(ray, num_cpus=None) -> None:
    """A Ray on this machine, on 127.0.0.1, no dashboard, no usage report; workers import tools/ and ddiminv_dev."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    paths = [p for p in (_TOOLS, ROOT, *os.environ.get("PYTHONPATH", "").split(os.pathsep)) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))  # inherited by the raylet's workers
    for attempt in (1, 2):
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                     configure_logging=False)
            return
        except Exception as e:  # Ray waits a fixed 30 s for its raylet: a busy CPU can miss that once
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
            print(f"[ray_batch] the local Ray did not start in time ({e}); starting it once more", file=sys.stderr)
            ray.shutdown()


def start_actors(ray, args, progress, tmp_root=None) -> list:
    """[(actor, url)] of the actors whose server answers; the others are reported and killed. The servers the
    actors start keep their folders under ``tmp_root`` (default: the system's temporary folder)."""
    opts = dict(num_cpus=args.cpus_per_actor, max_restarts=1, max_task_retries=1)
    if ComfyActor.__module__ != "__main__":  # imported (tests, bench): ship the class itself, as for a script,
        ray.cloudpickle.register_pickle_by_value(sys.modules[ComfyActor.__module__])  # not an import path
    Actor = ray.remote(ComfyActor)
    start = {"args": args.comfy_arg, "cpu": args.gpus_per_actor == 0, "comfyui": args.comfyui,
             "timeout": args.start_timeout, "tmp_root": tmp_root or tempfile.gettempdir()}
    tools = None if args.address else _TOOLS
    # an actor given a running server only talks to it: no GPU for it; one starting its own server gets one
    actors = [Actor.options(**opts, num_gpus=0).remote(tools, s, start, args.timeout) for s in args.server] + \
        [Actor.options(**opts, num_gpus=args.gpus_per_actor).remote(tools, None, start, args.timeout)
         for _ in range(args.actors)]
    refs = {a.ready.remote(): a for a in actors}
    done, late = ray.wait(list(refs), num_returns=len(refs), timeout=args.start_timeout + 30)
    alive = []
    for ref in done:
        try:
            info = ray.get(ref)
        except Exception as e:  # the actor could not start its server
            info = {"error": f"an actor could not start: {str(e).strip().splitlines()[-1][:500]}"}
        if info.get("error"):
            progress.line(f"warning: {info['error']}")
            ray.kill(refs[ref], no_restart=True)
        else:
            pid = f" (server pid {info['pid']})" if info.get("pid") else ""
            progress.line(f"actor {len(alive)}: {info['url']}{pid}")
            alive.append((refs[ref], info["url"]))
    for ref in late:
        progress.line("warning: an actor was not ready in time (not enough CPUs/GPUs free in the Ray cluster, "
                      "or its server is slow to start: --start-timeout)")
        ray.kill(refs[ref], no_restart=True)
    if not alive:
        raise RunnerError("no actor has a ComfyUI server; nothing was run")
    return alive


def dispatch(ray, actors, todo, submit, finish, moves: int, progress, on_gone=None) -> None:
    """Run every item of ``todo`` on the actors, one call in flight per actor: ``submit(actor, item)`` -> ref,
    ``finish(item, result or None, error)``. An actor whose server stops answering (or that Ray could not
    restart) is retired, ``on_gone(item, its url)`` is told (its prompt may still run there), and the item goes
    to another actor, at most ``moves`` times. Any other failure of a call is that item's error alone."""
    queue, idle, inflight, moved = collections.deque(todo), [a for a, _ in actors], {}, collections.Counter()
    url = dict(actors)
    while queue or inflight:
        while queue and idle:
            actor, item = idle.pop(0), queue.popleft()
            if (ref := submit(actor, item)) is not None:
                inflight[ref] = (actor, item)
            else:
                idle.append(actor)
        if not inflight:
            continue
        ready, _ = ray.wait(list(inflight), num_returns=1)
        actor, item = inflight.pop(ready[0])
        try:
            rec, files = ray.get(ready[0])
            gone = rec.get("gone")
        except ray.exceptions.RayActorError as e:
            gone = f"the actor of {url[actor]} died ({e.__class__.__name__})"
        except Exception as e:  # the call failed, the actor lives: the item's error, the others go on
            idle.append(actor)
            finish(item, None, f"the actor of {url[actor]} failed: "
                               f"{(str(e).strip().splitlines() or [e.__class__.__name__])[-1][:500]}")
            continue
        if gone is None:
            idle.append(actor)
            finish(item, (rec, files), None)
            continue
        ray.kill(actor, no_restart=True)
        who = url.pop(actor)
        if on_gone is not None:
            on_gone(item, who)
        live = list(url)
        moved[item] += 1
        again = moved[item] <= moves and bool(live)
        progress.line(f"warning: {gone}; " + (f"{item} goes to another actor; " if again else "")
                      + f"the actor of {who} is retired")
        if again:
            queue.appendleft(item)
        else:
            finish(item, None, gone)
        if not live:
            for left in queue:
                finish(left, None, "not run: no actor left")
            queue.clear()


def run(args) -> int:
    progress = Progress(0)
    template = apply_overrides(load_workflow(args.workflow), args.set, warn=progress.line)
    image_node = find_image_node(template, args.image_node)
    items = {ident: (path, sets) for ident, path, sets in load_items(args)}
    if not items:
        raise RunnerError(f"--images {args.images}: no images ({', '.join(IMAGE_EXTS)})" if args.images else
                          f"--manifest {args.manifest}: no items")
    # every item's prompt, before anything runs (a manifest column that names no node is an error here)
    prompts = {ident: apply_overrides(template, sets) for ident, (_, sets) in items.items()}
    keys = {ident: settings_key(p, image_node) for ident, p in prompts.items()}
    out = Path(args.out)
    results = Results.load(out, {"workflow": str(args.workflow), "images_dir": str(args.images or ""),
                                 "manifest": str(args.manifest or ""), "overrides": args.set})
    dirs = output_stems(items)
    if not (todo := results.todo(keys, progress)):
        return 0
    ray = import_ray()
    own = not ray.is_initialized()
    if own and args.address:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address=args.address, runtime_env={"working_dir": ROOT, "excludes": CLUSTER_EXCLUDES},
                 log_to_driver=False)
    elif own:
        init_local(ray, args.num_cpus)
    actors, tmp_root = [], str(job_folder())  # the actors' servers' folders
    try:
        actors = start_actors(ray, args, progress, tmp_root)
        progress.start(len(todo))

        def submit(actor, name):
            path = items[name][0]
            try:
                data = path.read_bytes()
            except OSError as e:
                finish(name, None, f"cannot read {path}: {e.strerror or e}")
                return None
            attempts[name] = pid = str(uuid.uuid4())  # Ray's retry of this call repeats it: see ComfyActor.run
            return actor.run.remote(path.name, data, prompts[name], image_node, prompt_id=pid)

        def on_gone(name, url):  # an external server may still run the prompt: not twice
            if done := cancel_prompt(url, attempts[name]):
                progress.line(f"{name}: its prompt {attempts[name]} on {url} was {done}")

        def finish(name, result, error):
            if result is None:
                rec = {"server": None, "status": "error", "error": error, "outputs": []}
            else:
                rec = store({**result[0], "settings": keys[name]}, result[1], out / dirs[name], out)
            results.record(name, rec)
            progress.done(name, rec)

        attempts = {}
        dispatch(ray, actors, todo, submit, finish, args.moves, progress, on_gone)
    finally:
        for actor, _ in actors:
            try:
                ray.get(actor.stop.remote(), timeout=30)
            except Exception:  # noqa: S110  (a retired or dead actor has nothing to stop)
                pass
            ray.kill(actor, no_restart=True)
        if own:
            ray.shutdown()
        shutil.rmtree(tmp_root, ignore_errors=True)  # what a killed actor's server left (its server died with it)
    return results.finish(keys, progress)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ray_batch.py", description=__doc__.split("\n")[0])
    p.add_argument("--workflow", required=True, help="API-format workflow JSON (e.g. example_workflows/api/*.api.json)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of input images (one item each)")
    src.add_argument("--manifest", help="CSV (columns image[,id][,TARGET.input ...]) or JSON list of "
                                        '{"image", "id", "set": {"TARGET.input": value}}: per-item overrides')
    p.add_argument("--out", required=True, help="output folder: OUT/<item>/..., results.json, results.csv")
    p.add_argument("--set", action="append", metavar="TITLE_OR_ID.input=value", default=[],
                   help="override for every item (as tools/runner.py); manifest columns come on top. Repeatable.")
    p.add_argument("--image-node", metavar="TITLE_OR_ID", help="node that gets the image (default: first LoadImage)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per item, then it is interrupted (600)")
    p.add_argument("--server", action="append", default=[], metavar="URL",
                   help="a running ComfyUI server: one actor uses it. Repeatable")
    p.add_argument("--actors", type=int, default=None,
                   help="actors that each start their own ComfyUI server (default 1 without --server, else 0)")
    p.add_argument("--comfyui", help="ComfyUI folder (main.py) on the machines of the actors (default: the host "
                                     "of `make setup`, or COMFYUI_PATH)")
    p.add_argument("--comfy-arg", action="append", default=[], metavar="ARG",
                   help="argument for the actors' main.py, e.g. --comfy-arg=--extra-model-paths-config=m.yaml")
    p.add_argument("--gpus-per-actor", type=float, default=0.0,
                   help="GPUs per actor that starts its own server (0: it runs with --cpu; 1: one GPU each); "
                        "an actor of a --server reserves none")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs Ray reserves per actor (1)")
    p.add_argument("--address", help="a running Ray cluster (HEAD:6379, or 'auto'); default: a Ray on this machine")
    p.add_argument("--num-cpus", type=int, help="CPUs the Ray on this machine may use (default: all)")
    p.add_argument("--moves", type=int, default=1,
                   help="times an item goes to another actor after its server stopped answering (1)")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds for an actor's server to start")
    args = p.parse_args(argv)
    if args.actors is None:
        args.actors = 0 if args.server else 1
    for bad, message in ((args.timeout <= 0, "--timeout must be > 0"), (args.actors < 0, "--actors must be >= 0"),
                         (args.moves < 0, "--moves must be >= 0"),
                         (not (args.actors or args.server), "no actor: give --actors N (N >= 1) or --server URL")):
        if bad:
            p.error(message)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
