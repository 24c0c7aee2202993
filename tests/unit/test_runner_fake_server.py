"""tools/runner.py against in-process fake ComfyUI servers (aiohttp): the paths a real server rarely
takes on demand (a server dying mid-batch, execution errors, missed websocket messages, timeouts).
The real-server behaviour is covered by tests/server/test_runner.py."""
from __future__ import annotations

import asyncio
import csv
import json
import threading
import uuid
from pathlib import Path

import pytest

web = pytest.importorskip("aiohttp.web")


def _load_runner():
    """tools/runner.py by path (tools/ is not a package); shared with test_runner_unit via sys.modules."""
    import importlib.util
    import sys
    name = "ddiminv_tools_runner"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[2] / "tools" / "runner.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


runner = _load_runner()

PNG = b"\x89PNG\r\n\x1a\nfake"


class FakeComfy:
    """Enough of ComfyUI's API: /upload/image, /prompt, /ws, /history, /view, /queue, /interrupt. ``mode``:
    ok | error | reject (HTTP 400 on /prompt) | die (``die_after`` s into a /prompt, drops the connection, then
    refuses) | silent (no websocket messages; history only) | dropws (closes the websocket once a prompt
    starts) | hang (never finishes) | hang_first (the first prompt never finishes)."""

    def __init__(self, mode="ok", delay=0.05, files=None, die_after=0.0):
        self.mode, self.delay, self.files, self.die_after = mode, delay, files, die_after
        self.uploads, self.upload_types, self.prompts, self.history, self.views = {}, {}, [], {}, []
        self.sockets: dict = {}
        self.interrupted, self.deleted = 0, []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        self.url = f"http://127.0.0.1:{self.port}"

    async def _start(self):
        app = web.Application()
        app.router.add_post("/upload/image", self.upload)
        app.router.add_post("/prompt", self.prompt)
        app.router.add_get("/ws", self.ws)
        app.router.add_get("/history/{pid}", self.get_history)
        app.router.add_get("/view", self.view)
        app.router.add_post("/queue", self.queue)
        app.router.add_post("/interrupt", self.interrupt)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        self.site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await self.site.start()
        return self.site._server.sockets[0].getsockname()[1]

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    async def queue(self, request):
        self.deleted += (await request.json()).get("delete", [])
        return web.json_response({})

    async def upload(self, request):
        post = await request.post()
        f = post["image"]
        assert post["type"] == "input" and post["overwrite"] == "true"
        self.uploads[f.filename], self.upload_types[f.filename] = f.file.read(), f.content_type
        return web.json_response({"name": f.filename, "subfolder": "", "type": "input"})

    async def interrupt(self, request):
        self.interrupted += 1
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
        if self.mode == "die":
            await asyncio.sleep(self.die_after)
            await self.site.stop()  # refuse new connections, then drop this one
            request.transport.close()
            raise ConnectionResetError
        pid = body.get("prompt_id") or str(uuid.uuid4())
        self.prompts.append(body)
        asyncio.get_running_loop().create_task(self.execute(pid, body))
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
        await self.send(sid, "executing", {"node": None, "prompt_id": pid})

    async def get_history(self, request):
        pid = request.match_info["pid"]
        return web.json_response({pid: self.history[pid]} if pid in self.history else {})

    async def view(self, request):
        q = request.rel_url.query
        self.views.append(q["filename"])
        assert q["type"] == "output" and (self.files or q["subfolder"] == "ddiminv")
        return web.Response(body=PNG + q["filename"].encode(), content_type="image/png")


WF = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}, "_meta": {"title": "Load Image"}},
    "2": {"class_type": "DDIMInvert", "inputs": {"steps": 50}, "_meta": {"title": "DDIM Invert"}},
    "3": {"class_type": "SaveImage", "inputs": {"filename_prefix": "a"}},
    "4": {"class_type": "PreviewAny", "inputs": {}},
}


@pytest.fixture
def setup(tmp_path):
    wf = tmp_path / "wf.api.json"
    wf.write_text(json.dumps(WF))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(5):
        (imgs / f"im{i}.png").write_bytes(PNG + bytes([i]))
    servers = []

    def make(mode="ok", **kw):
        s = FakeComfy(mode, **kw)
        servers.append(s)
        return s

    yield wf, imgs, tmp_path / "out", make
    for s in servers:
        s.stop()


def _args(wf, imgs, out, *servers, extra=()):
    a = ["--workflow", str(wf), "--images", str(imgs), "--out", str(out), "--set", "DDIM Invert.steps=3"]
    for s in servers:
        a += ["--server", s.url]
    return a + list(extra)


def _main(argv, limit=60.0):
    """runner.main(argv), failing the test instead of hanging it when the runner does not return in time."""
    rc = []
    t = threading.Thread(target=lambda: rc.append(runner.main(argv)), daemon=True)
    t.start()
    t.join(limit)
    assert rc, f"the runner did not return within {limit:g}s"
    return rc[0]


def _results(out):
    return json.loads((out / "results.json").read_text())["images"]


def test_spreads_over_servers_and_records_everything(setup, capsys):
    wf, imgs, out, make = setup
    a, b = make(delay=0.2), make(delay=0.2)
    assert _main(_args(wf, imgs, out, a, b)) == 0
    recs = _results(out)
    assert sorted(recs) == [f"im{i}.png" for i in range(5)]
    assert {r["server"] for r in recs.values()} == {a.url, b.url}
    assert len(a.prompts) + len(b.prompts) == 5 and a.prompts and b.prompts
    uploads = {**a.uploads, **b.uploads}
    assert uploads == {p.name: p.read_bytes() for p in imgs.iterdir()}  # the files as they are
    assert set(a.upload_types.values()) | set(b.upload_types.values()) == {"image/png"}
    for body in a.prompts + b.prompts:
        p = body["prompt"]
        assert p["2"]["inputs"]["steps"] == 3 and body["client_id"] and body["prompt_id"]
        assert p["1"]["inputs"]["image"] in uploads
    for name, r in recs.items():
        stem = Path(name).stem
        assert r["status"] == "ok" and r["outputs"] == [f"rec_{stem}.png"]
        assert (out / stem / f"rec_{stem}.png").read_bytes() == PNG + f"rec_{stem}.png".encode()
        assert r["texts"]["4"][0].startswith("round trip:") and r["figure"] == float(r["texts"]["4"][0][12:-3])
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 5
    err = capsys.readouterr().err
    assert "[1/5]" in err and "[5/5]" in err and "done: 5/5 ok" in err
    # a second run has nothing to do and queues nothing
    assert _main(_args(wf, imgs, out, a, b)) == 0
    assert len(a.prompts) + len(b.prompts) == 5
    assert "nothing to do" in capsys.readouterr().err


def test_server_dying_mid_batch_moves_work_to_the_other(setup, capsys):
    wf, imgs, out, make = setup
    good, bad = make(delay=0.1), make("die")
    assert _main(_args(wf, imgs, out, bad, good)) == 0
    recs = _results(out)
    assert all(r["status"] == "ok" and r["server"] == good.url for r in recs.values())
    assert len(good.prompts) == 5
    err = capsys.readouterr().err
    assert f"{bad.url} is dropped" in err and "goes to another server" in err


def test_execution_errors_are_recorded_and_retried_on_resume(setup, capsys):
    wf, imgs, out, make = setup
    bad = make("error")
    assert _main(_args(wf, imgs, out, bad)) == 1
    recs = _results(out)
    assert all(r["status"] == "error" and "node 2 (DDIMInvert) failed: ValueError: bad latent" in r["error"]
               for r in recs.values())
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert all("bad latent" in row["error"] for row in rows)
    assert "done: 0/5 ok, 5 failed" in capsys.readouterr().err
    good = make()
    assert _main(_args(wf, imgs, out, good)) == 0  # failed images are redone
    assert len(good.prompts) == 5 and all(r["status"] == "ok" for r in _results(out).values())


def test_missed_websocket_messages_fall_back_to_history(setup, monkeypatch):
    wf, imgs, out, make = setup
    monkeypatch.setattr(runner, "HISTORY_POLL_S", 0.3)
    quiet = make("silent")
    assert _main(_args(wf, imgs, out, quiet, extra=("--timeout", "10"))) == 0
    recs = _results(out)
    assert all(r["status"] == "ok" and r["outputs"] for r in recs.values())
    assert recs["im0.png"]["texts"]  # UI texts come from /history too


def test_timeout_is_recorded_and_interrupts(setup, capsys):
    wf, imgs, out, make = setup
    for p in sorted(imgs.iterdir())[1:]:
        p.unlink()
    hang = make("hang")
    assert _main(_args(wf, imgs, out, hang, extra=("--timeout", "0.5"))) == 1
    rec = _results(out)["im0.png"]
    assert rec["status"] == "error" and "timed out after 0.5s" in rec["error"]
    assert hang.interrupted == 1 and hang.deleted == [rec["prompt_id"]]


def test_after_a_timeout_the_next_image_runs(setup, capsys):
    wf, imgs, out, make = setup
    for p in sorted(imgs.iterdir())[2:]:
        p.unlink()
    server = make("hang_first")
    assert _main(_args(wf, imgs, out, server, extra=("--timeout", "1"))) == 1
    recs = _results(out)
    assert "timed out" in recs["im0.png"]["error"] and recs["im1.png"]["status"] == "ok"
    assert (out / "im1" / "rec_im1.png").is_file() and len(server.prompts) == 2


def test_upload_names_and_types(setup):
    wf, imgs, out, make = setup
    for p in sorted(imgs.iterdir()):
        p.unlink()
    (imgs / 'фото "1".JPG').write_bytes(b"\xff\xd8jpeg")
    server = make()
    assert _main(_args(wf, imgs, out, server)) == 0
    assert server.uploads == {'фото "1".JPG': b"\xff\xd8jpeg"}  # the local name and bytes, as they are
    assert server.upload_types == {'фото "1".JPG': "image/jpeg"}
    assert (out / 'фото "1"').is_dir()  # the local name keeps its folder name
    assert _results(out)['фото "1".JPG']["outputs"] == ["rec__1_.png"]  # the server's 'rec_фото "1".png', reduced


def test_websocket_dropped_mid_prompt_falls_back_to_history(setup, monkeypatch):
    wf, imgs, out, make = setup
    monkeypatch.setattr(runner, "HISTORY_POLL_S", 0.2)
    server = make("dropws")
    assert _main(_args(wf, imgs, out, server, extra=("--timeout", "10"))) == 0
    assert all(r["status"] == "ok" and r["outputs"] for r in _results(out).values())
    assert len(server.prompts) == 5


def test_rejected_prompt_records_the_node_errors(setup):
    wf, imgs, out, make = setup
    assert _main(_args(wf, imgs, out, make("reject"))) == 1
    err = _results(out)["im0.png"]["error"]
    assert "prompt rejected (HTTP 400)" in err and "node 2 (DDIMInvert): Value smaller than min: steps: 0 < 1" in err


def test_a_survivor_waiting_for_work_gets_the_dying_servers_image(setup, capsys):
    wf, imgs, out, make = setup
    for p in sorted(imgs.iterdir())[2:]:
        p.unlink()
    bad, good = make("die", die_after=0.5), make(delay=0.01)
    assert _main(_args(wf, imgs, out, bad, good)) == 0  # good is idle on the queue when bad dies
    recs = _results(out)
    assert [r["server"] for r in recs.values()] == [good.url, good.url] and len(good.prompts) == 2
    assert "im0.png goes to another server" in capsys.readouterr().err


def test_an_image_moves_at_most_once(setup, capsys):
    wf, imgs, out, make = setup
    for p in sorted(imgs.iterdir())[1:]:
        p.unlink()
    first, second, third = make("die"), make("die"), make()
    # workers wait on the queue in order: first takes im0, dies; second takes it, dies; third is left alone,
    # so an image that kills servers cannot take them all down
    assert _main(_args(wf, imgs, out, first, second, third)) == 1
    rec = _results(out)["im0.png"]
    assert rec["status"] == "error" and rec["server"] == second.url and "stopped answering" in rec["error"]
    assert third.prompts == [] and capsys.readouterr().err.count("goes to another server") == 1


def test_only_server_dying_records_clear_error(setup, capsys):
    wf, imgs, out, make = setup
    bad = make("die")
    assert _main(_args(wf, imgs, out, bad)) == 1
    recs = _results(out)
    assert len(recs) == 5 and all(r["status"] == "error" for r in recs.values())
    assert sum(bad.url in (r["error"] or "") and "stopped answering" in r["error"] for r in recs.values()) == 1
    assert sum(r["error"] == "no server left to run it" for r in recs.values()) == 4
    err = capsys.readouterr().err
    assert f"{bad.url} is dropped" in err and "done: 0/5 ok, 5 failed" in err


def test_progress_lines_and_tty_steps():
    import io as _io

    class Tty(_io.StringIO):
        def isatty(self):
            return True

    s = Tty()
    p = runner.Progress(12, stream=s)
    p.step("a.png", {"value": 3, "max": 20, "node": "6"})
    p.done("a.png", {"status": "ok", "seconds": 2.14, "server": "http://h:1", "figure": 31.5})
    p.done("b.png", {"status": "error", "seconds": None, "server": None, "error": "boom"})
    text = s.getvalue()
    assert "\ra.png" not in text and "a.png: node 6 3/20" in text
    assert "[ 1/12] a.png ok 2.1s @http://h:1 figure=31.50\n" in text
    assert "[ 2/12] b.png error 0.0s @? boom\n" in text
    p.done("c.png", {"status": "error", "server": "http://h:1", "error": "\x1b]0;owned\x07\x1b[2Jboom"})
    assert "\x1b" not in s.getvalue() and "c.png error 0.0s @http://h:1 ?]0;owned??[2Jboom\n" in s.getvalue()
    plain = _io.StringIO()
    runner.Progress(1, stream=plain).step("a.png", {"value": 1, "max": 2})
    assert plain.getvalue() == ""  # no carriage-return noise in logs


def _files_outside(root: Path, *inside: Path) -> list:
    """Every file under ``root`` that is not under one of ``inside``."""
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and not any(d in p.parents for d in inside))


def test_hostile_output_names_stay_inside_out(setup, tmp_path):
    wf, imgs, out, make = setup
    for p in sorted(imgs.iterdir())[1:]:
        p.unlink()
    long = "L" * 300 + ".png"
    hostile = [  # (node, filename, subfolder); node 3 already sends rec_im0.png
        ("../../x", "rec_im0.png", ""),                     # the reported exploit: duplicate basename, node id = path
        (str(tmp_path / "abs_node"), "rec_im0.png", ""),    # absolute node id
        ("\x00", "rec_im0.png", ""),                        # NUL node id
        ("5", "../../x.png", ""), ("5", str(tmp_path / "abs.png"), ""), ("5", "..", ""), ("5", ".", ""),
        ("5", "a\x00b.png", ""), ("5", "..\\..\\w.png", ""),
        ("5", "ok.png", "../../../etc"), ("5", "ok2.png", "/etc"),
        ("6", long, ""), ("6", "dup.png", ""), ("6", "dup.png", ""), ("7", "dup.png", ""),
    ]
    server = make(files=hostile)
    assert _main(_args(wf, imgs, out, server)) == 1
    rec = _results(out)["im0.png"]
    assert rec["status"] == "error" and "refused 8 output(s) the server named unsafely" in rec["error"]
    refused = rec["refused"]
    assert len(refused) == 8
    for bad in ("'../../x.png'", ascii(str(tmp_path / "abs.png")), "file name '..'", "file name '.'",
                "'a\\x00b.png'", "subfolder '../../../etc'", "subfolder '/etc'"):
        assert sum(bad in r for r in refused) == 1, (bad, refused)
    long_kept = "L" * (runner.NAME_MAX - 4) + ".png"
    assert rec["outputs"] == ["rec_im0.png", long_kept, "dup.png", "6_dup.png", "7_dup.png",  # node order
                              "__rec_im0.png", ".._.._x_rec_im0.png",
                              runner.safe_part(str(tmp_path / "abs_node")) + "_rec_im0.png"]
    for name in rec["outputs"]:
        assert (out / "im0" / name).is_file()
    assert (out / "im0" / long_kept).read_bytes() == PNG + long.encode()
    assert (out / "im0" / "7_dup.png").read_bytes() == PNG + b"dup.png"
    assert len(server.views) == len(rec["outputs"])  # refused names were never even requested
    assert _files_outside(tmp_path, out, imgs) == [str(wf)]


def test_dot_named_input_images_get_folders_inside_out(setup, tmp_path):
    wf, imgs, out, make = setup
    for p in sorted(imgs.iterdir()):
        p.unlink()
    for n in ("...png", "..png", "results.json.png"):
        (imgs / n).write_bytes(PNG)
    assert _main(_args(wf, imgs, out, make())) == 0
    recs = _results(out)
    assert all(r["status"] == "ok" for r in recs.values())
    assert (out / "...png" / "rec_...png").is_file() and (out / "..png" / "rec_..png").is_file()
    assert (out / "results.json_png" / "rec_results.json.png").is_file() and (out / "results.json").is_file()
    assert _files_outside(tmp_path, out, imgs) == [str(wf)]


def test_an_image_folder_linked_outside_out_is_not_written_through(setup, tmp_path):
    wf, imgs, out, make = setup
    for p in sorted(imgs.iterdir())[1:]:
        p.unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / "im0").symlink_to(elsewhere)  # planted before the run
    assert _main(_args(wf, imgs, out, make())) == 1
    rec = _results(out)["im0.png"]
    assert rec["status"] == "error" and len(rec["refused"]) == 1 and "resolves outside" in rec["refused"][0]
    assert list(elsewhere.iterdir()) == []


def test_an_oversized_answer_is_an_error_not_a_memory_blowup(setup, monkeypatch):
    wf, imgs, out, make = setup
    monkeypatch.setattr(runner, "MAX_BODY", 16)  # every /view answer (PNG header + name) is larger
    a = make()
    assert _main(_args(wf, imgs, out, a)) != 0
    recs = _results(out)
    assert all(r["status"] == "error" and "answered more than" in r["error"] for r in recs.values()), recs
    assert not list(out.rglob("rec_*.png"))


def test_csv_cells_that_look_like_formulas_are_quoted(setup):
    wf, imgs, out, make = setup
    for p in imgs.iterdir():
        p.unlink()
    (imgs / "=1+1.png").write_bytes(PNG)
    (imgs / "plain.png").write_bytes(PNG + b"x")
    a = make()
    assert _main(_args(wf, imgs, out, a)) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["image"] for r in rows} == {"'=1+1.png", "plain.png"}
    assert _results(out)["=1+1.png"]["status"] == "ok"  # the JSON keeps the real name


def test_a_large_output_is_downloaded_whole(setup, monkeypatch):
    """An output bigger than one network chunk (2 MiB) arrives byte for byte (a single read() returns only the
    first chunk: the image was once recorded ok with 64 KB of it)."""
    wf, imgs, out, make = setup
    big = PNG + bytes(range(256)) * 8192

    async def view(self, request):
        return web.Response(body=big, content_type="image/png")

    monkeypatch.setattr(FakeComfy, "view", view)
    a = make()
    assert _main(_args(wf, imgs, out, a)) == 0
    files = sorted(out.rglob("rec_*.png"))
    assert len(files) == 5 and all(f.read_bytes() == big for f in files), [f.stat().st_size for f in files]
