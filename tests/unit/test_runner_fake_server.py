"""tools/runner.py (the one-server client) against an in-process fake ComfyUI server (ddiminv_dev/fake_comfy.py):
the paths a real server rarely takes on demand (the server dying mid-batch, execution errors, missed websocket
messages, timeouts, hostile names). The real-server behaviour is covered by tests/server/test_runner.py; several
servers are tools/ray_batch.py's (tests/server/test_ray_batch_fake.py)."""
from __future__ import annotations

import csv
import json
import re
import sys
import threading
from pathlib import Path

import pytest

web = pytest.importorskip("aiohttp.web")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))  # tools/ holds scripts; their shared module is batchlib

import batchlib as lib  # noqa: E402
import runner  # noqa: E402
from ddiminv_dev.fake_comfy import PNG, FakeComfy, fake_batch  # noqa: E402

WF = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}, "_meta": {"title": "Load Image"}},
    "2": {"class_type": "DDIMInvert", "inputs": {"steps": 50}, "_meta": {"title": "DDIM Invert"}},
    "3": {"class_type": "SaveImage", "inputs": {"filename_prefix": "a"}},
    "4": {"class_type": "PreviewAny", "inputs": {}},
}


@pytest.fixture
def setup(tmp_path):
    with fake_batch(tmp_path, WF, 5) as job:
        yield job


def _args(wf, imgs, out, server, extra=()):
    return ["--workflow", str(wf), "--images", str(imgs), "--out", str(out), "--set", "DDIM Invert.steps=3",
            "--server", server.url, *extra]


def _main(argv, limit=60.0):
    """runner.main(argv), failing the test instead of hanging it when the runner does not return in time."""
    rc = []
    t = threading.Thread(target=lambda: rc.append(runner.main(argv)), daemon=True)
    t.start()
    t.join(limit)
    assert rc, f"the runner did not return within {limit:g}s"
    return rc[0]


def _uploads(server):
    """The server's uploads by their own names, each in a folder of its own (runner.UPLOAD_DIR/<hex>/name)."""
    folders = [k.rsplit("/", 1)[0] for k in server.uploads]
    assert len(set(folders)) == len(folders) and all(re.fullmatch(r"ddiminv-batch/[0-9a-f]{32}", f) for f in folders)
    return {k.rsplit("/", 1)[1]: v for k, v in server.uploads.items()}


def _results(out):
    return json.loads((out / "results.json").read_text())["images"]


def test_runs_every_image_and_records_everything(setup, capsys):
    wf, imgs, out, make = setup
    a = make(delay=0.02)
    assert _main(_args(wf, imgs, out, a)) == 0
    recs = _results(out)
    assert sorted(recs) == [f"im{i}.png" for i in range(5)]
    assert {r["server"] for r in recs.values()} == {a.url} and len(a.prompts) == 5
    assert _uploads(a) == {p.name: p.read_bytes() for p in imgs.iterdir()}  # the files as they are
    assert set(a.upload_types.values()) == {"image/png"}
    for body in a.prompts:
        p = body["prompt"]
        assert p["2"]["inputs"]["steps"] == 3 and body["client_id"] and body["prompt_id"]
        assert p["1"]["inputs"]["image"] in a.uploads
    for name, r in recs.items():
        stem = Path(name).stem
        assert r["status"] == "ok" and r["outputs"] == [f"rec_{stem}.png"]
        assert (out / stem / f"rec_{stem}.png").read_bytes() == PNG + f"rec_{stem}.png".encode()
        assert r["texts"]["4"][0].startswith("round trip:") and r["figure"] == float(r["texts"]["4"][0][12:-3])
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 5
    err = capsys.readouterr().err
    assert "[1/5]" in err and "[5/5]" in err and "done: 5/5 ok" in err
    # a second run has nothing to do and queues nothing
    assert _main(_args(wf, imgs, out, a)) == 0
    assert len(a.prompts) == 5
    assert "nothing to do" in capsys.readouterr().err


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
    assert _uploads(server) == {'фото "1".JPG': b"\xff\xd8jpeg"}  # the local name and bytes, as they are
    assert list(server.upload_types.values()) == ["image/jpeg"]
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


def test_the_server_dying_records_a_clear_error_and_resume_redoes_the_rest(setup, capsys):
    wf, imgs, out, make = setup
    bad = make("die", die_on=3)  # two images run, the third kills it
    assert _main(_args(wf, imgs, out, bad)) == 1
    recs = _results(out)
    assert [recs[f"im{i}.png"]["status"] for i in range(5)] == ["ok", "ok", "error", "error", "error"]
    assert bad.url in recs["im2.png"]["error"] and "stopped answering" in recs["im2.png"]["error"]
    assert all(recs[f"im{i}.png"]["error"] == "not run: the server stopped answering" for i in (3, 4))
    err = capsys.readouterr().err
    assert "the images left are not run" in err and "done: 2/5 ok, 3 failed" in err
    good = make()
    assert _main(_args(wf, imgs, out, good)) == 0
    assert sorted(Path(b["prompt"]["1"]["inputs"]["image"]).name for b in good.prompts) == ["im2.png", "im3.png",
                                                                                           "im4.png"]


def test_progress_lines_and_tty_steps():
    import io as _io

    class Tty(_io.StringIO):
        def isatty(self):
            return True

    now = [100.0]
    s = Tty()
    p = lib.Progress(12, stream=s, clock=lambda: now[0])
    p.step("a.png", {"value": 3, "max": 20, "node": "6"})
    now[0] += 30  # one item per 30 s: 2/min, and the rest at that rate
    p.done("a.png", {"status": "ok", "seconds": 2.14, "server": "http://h:1", "figure": 31.5})
    now[0] += 30
    p.done("b.png", {"status": "error", "seconds": None, "server": None, "error": "boom"})
    text = s.getvalue()
    assert "\ra.png" not in text and "a.png: node 6 3/20" in text
    assert "[ 1/12] a.png ok 2.1s @http://h:1 figure=31.50  (0 failed, 2.0/min, ETA 5m30s)\n" in text
    assert "[ 2/12] b.png error 0.0s @? boom  (1 failed, 2.0/min, ETA 5m00s)\n" in text
    now[0] += 3540  # 3 in an hour
    p.done("c.png", {"status": "error", "server": "http://h:1", "error": "\x1b]0;owned\x07\x1b[2Jboom"})
    assert "\x1b" not in s.getvalue() and "c.png error 0.0s @http://h:1 ?]0;owned??[2Jboom  (2 failed, 0.1/min, " \
        "ETA 3h00m)\n" in s.getvalue()
    p.start(1)
    now[0] += 1
    p.done("d.png", {"status": "ok", "server": "http://h:1"})
    assert s.getvalue().endswith("[1/1] d.png ok 0.0s @http://h:1  (0 failed, 60.0/min)\n")  # no ETA at the end
    plain = _io.StringIO()
    lib.Progress(1, stream=plain).step("a.png", {"value": 1, "max": 2})
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
    long_kept = "L" * (lib.NAME_MAX - 4) + ".png"
    assert rec["outputs"] == ["rec_im0.png", long_kept, "dup.png", "6_dup.png", "7_dup.png",  # node order
                              "__rec_im0.png", ".._.._x_rec_im0.png",
                              lib.safe_part(str(tmp_path / "abs_node")) + "_rec_im0.png"]
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


def test_a_rerun_with_other_settings_redoes_its_images_and_says_which(setup, capsys, tmp_path):
    wf, imgs, out, make = setup
    for p in sorted(imgs.iterdir())[2:]:
        p.unlink()
    a = make()
    assert _main(_args(wf, imgs, out, a)) == 0 and len(a.prompts) == 2
    capsys.readouterr()
    # other --set values: both images are redone with them, and the progress says which and why
    assert _main(_args(wf, imgs, out, a, extra=("--set", "DDIM Invert.steps=5"))) == 0
    assert [b["prompt"]["2"]["inputs"]["steps"] for b in a.prompts] == [3, 3, 5, 5]
    err = capsys.readouterr().err
    assert "2 image(s) done with other settings are redone: im0.png, im1.png" in err
    keys = {n: r["settings"] for n, r in _results(out).items()}
    assert _main(_args(wf, imgs, out, a, extra=("--set", "DDIM Invert.steps=5"))) == 0  # the same: nothing to do
    assert len(a.prompts) == 4 and "nothing to do" in capsys.readouterr().err
    # another workflow file with other contents: redone; each record keeps the settings it was made with
    wf2 = tmp_path / "b.api.json"
    wf2.write_text(json.dumps({**WF, "3": {"class_type": "SaveImage", "inputs": {"filename_prefix": "b"}}}))
    assert _main(_args(wf2, imgs, out, a, extra=("--set", "DDIM Invert.steps=5"))) == 0
    assert len(a.prompts) == 6 and [b["prompt"]["3"]["inputs"]["filename_prefix"] for b in a.prompts[4:]] == ["b"] * 2
    assert all(r["settings"] != keys[n] for n, r in _results(out).items())


def test_two_jobs_sharing_a_server_never_swap_same_named_images(setup, tmp_path):
    wf, imgs, out, make = setup
    server = make()
    other = tmp_path / "other"
    other.mkdir()
    for p in imgs.iterdir():
        (other / p.name).write_bytes(b"other " + p.read_bytes())  # the same names, other pictures
    assert _main(_args(wf, imgs, out, server)) == 0
    assert _main(_args(wf, other, tmp_path / "out2", server)) == 0
    sent = [imgs / n for n in sorted(p.name for p in imgs.iterdir())] + \
        [other / n for n in sorted(p.name for p in other.iterdir())]
    for body, path in zip(server.prompts, sent, strict=True):  # each prompt names its own upload, still there
        assert server.uploads[body["prompt"]["1"]["inputs"]["image"]] == path.read_bytes(), path
