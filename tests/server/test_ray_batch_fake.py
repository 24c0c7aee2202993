"""tools/ray_batch.py on a real local Ray (2 CPUs, 127.0.0.1, one Ray for the module) against in-process fake
ComfyUI servers (ddiminv_dev/fake_comfy.py), which count every prompt they get: spreading over actors, a server
dying mid-run, an actor process dying mid-item (Ray restarts it and retries), hostile output names, per-item
overrides, resume. Real servers: tests/server/test_ray_batch.py.
In the server tier because it starts processes (Ray's), which the unit tier does not."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import ray  # a development extra that `make setup` installs: missing, these tests fail (not skip)

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))

import ray_batch  # noqa: E402
from ddiminv_dev.fake_comfy import PNG, fake_batch, fake_comfyui  # noqa: E402

WF = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}, "_meta": {"title": "Load Image"}},
    "2": {"class_type": "DDIMInvert", "inputs": {"steps": 50}, "_meta": {"title": "DDIM Invert"}},
    "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "x"}, "_meta": {"title": "Source prompt"}},
}


@pytest.fixture(scope="module")
def local_ray():
    ray_batch.init_local(ray, num_cpus=2)  # the job reuses it (and leaves it running)
    yield
    ray.shutdown()


@pytest.fixture
def setup(tmp_path, local_ray):
    with fake_batch(tmp_path, WF, 6) as job:
        yield job


def _run(wf, src, out, *servers, extra=()):
    flag = "--manifest" if src.is_file() else "--images"
    argv = ["--workflow", str(wf), flag, str(src), "--out", str(out), "--set", "DDIM Invert.steps=3", *extra]
    for s in servers:
        argv += ["--server", s.url]
    return ray_batch.main(argv)


def _results(out):
    return json.loads((out / "results.json").read_text())["images"]


def _images(server):
    """The images of the prompts a server accepted, in order."""
    return [Path(b["prompt"]["1"]["inputs"]["image"]).name for b in server.prompts]  # uploaded in folders of their own


def test_two_actors_share_the_work_and_a_rerun_does_nothing(setup, capsys):
    wf, imgs, out, make = setup
    a, b = make(delay=0.3), make(delay=0.3)
    assert _run(wf, imgs, out, a, b) == 0
    recs = _results(out)
    names = [f"im{i}.png" for i in range(6)]
    assert sorted(recs) == names and all(r["status"] == "ok" for r in recs.values())
    assert a.prompts and b.prompts and sorted(_images(a) + _images(b)) == names  # each image once, both used
    for r in recs.values():
        assert r["prompt_id"] in {p["prompt_id"] for p in (a if r["server"] == a.url else b).prompts}
    for n in names:
        assert (out / Path(n).stem / f"rec_{Path(n).stem}.png").read_bytes() == PNG + f"rec_{Path(n).stem}.png".encode()
    err = capsys.readouterr().err
    assert "[6/6]" in err and "/min" in err and "ETA" in err and "done: 6/6 ok" in err
    assert _run(wf, imgs, out, a, b) == 0
    assert len(a.prompts) + len(b.prompts) == 6 and "nothing to do" in capsys.readouterr().err


def test_a_server_dying_mid_run_moves_its_item_to_the_other_actor(setup, capsys):
    wf, imgs, out, make = setup
    good, bad = make(delay=0.2), make("die", die_on=2, delay=0.2)  # bad runs one image, dies on its second
    assert _run(wf, imgs, out, good, bad) == 0
    recs = _results(out)
    assert all(r["status"] == "ok" for r in recs.values()) and len(recs) == 6
    assert len(bad.prompts) == 1 and bad.posts == 2                  # one done there, the second killed it
    assert sorted(_images(good) + _images(bad)) == sorted(recs)       # nothing lost, nothing done twice
    assert [n for n, r in recs.items() if r["server"] == bad.url] == _images(bad)
    err = capsys.readouterr().err
    assert err.count("goes to another actor") == 1 and f"the actor of {bad.url} is retired" in err


def test_an_actor_process_killed_mid_item_is_restarted_by_ray_and_the_item_retried(setup, capsys):
    wf, imgs, out, make = setup
    for p in sorted(imgs.iterdir())[3:]:
        p.unlink()
    server = make("kill_client", die_on=2, delay=0.05)  # its second /prompt kills the actor that sent it
    assert _run(wf, imgs, out, server) == 0
    recs = _results(out)
    assert len(server.killed_clients) == 1 and server.posts == 4  # 3 images + the one retried after the kill
    assert sorted(_images(server)) == sorted(recs) == ["im0.png", "im1.png", "im2.png"]  # each run once
    assert all(r["status"] == "ok" for r in recs.values())
    assert "goes to another actor" not in capsys.readouterr().err  # Ray's restart and retry, not a move


def test_with_no_moves_left_the_item_fails_alone_and_a_rerun_redoes_only_it(setup, capsys):
    wf, imgs, out, make = setup
    for p in sorted(imgs.iterdir())[2:]:
        p.unlink()
    good, bad = make(delay=0.3), make("die", delay=0.3)  # both actors take one of the two images at once
    assert _run(wf, imgs, out, good, bad, extra=("--moves", "0")) == 1
    recs = _results(out)
    failed = [n for n, r in recs.items() if r["status"] != "ok"]
    assert len(failed) == 1 and "stopped answering" in recs[failed[0]]["error"] and bad.url in recs[failed[0]]["error"]
    assert len(good.prompts) == 1 and _images(good) != failed
    assert _run(wf, imgs, out, good) == 0
    assert _images(good)[1:] == failed  # the rerun ran only the failed image


def test_hostile_output_names_are_refused_under_ray(setup, tmp_path):
    wf, imgs, out, make = setup
    for p in sorted(imgs.iterdir())[1:]:
        p.unlink()
    hostile = [("5", "../../x.png", ""), ("5", str(tmp_path / "abs.png"), ""), ("5", "ok.png", "../../../etc"),
               ("../../n", "rec_im0.png", "")]
    server = make(files=hostile)
    assert _run(wf, imgs, out, server) == 1
    rec = _results(out)["im0.png"]
    assert rec["status"] == "error" and "refused 3 output(s)" in rec["error"] and len(rec["refused"]) == 3
    assert rec["outputs"] == ["rec_im0.png", ".._.._n_rec_im0.png"]
    assert len(server.views) == 2  # refused names were never requested
    inside = [p for p in tmp_path.rglob("*") if p.is_file() and out not in p.parents and imgs not in p.parents]
    assert inside == [wf]


def test_manifest_overrides_reach_each_prompt_and_a_missing_image_fails_alone(setup, tmp_path):
    wf, imgs, out, make = setup
    (tmp_path / "m.csv").write_text("image,Source prompt.text,id\nimgs/im0.png,a cat,\nimgs/im0.png,a dog,dog\n"
                                    "imgs/gone.png,x,\n")
    a = make(delay=0.05)
    assert _run(wf, tmp_path / "m.csv", out, a) == 1
    recs = _results(out)
    assert recs["gone.png"]["status"] == "error" and "cannot read" in recs["gone.png"]["error"]
    assert recs["im0.png"]["status"] == recs["dog"]["status"] == "ok"
    texts = {b["prompt_id"]: (b["prompt"]["5"]["inputs"]["text"], b["prompt"]["2"]["inputs"]["steps"])
             for b in a.prompts}
    assert texts == {recs["im0.png"]["prompt_id"]: ("a cat", 3), recs["dog"]["prompt_id"]: ("a dog", 3)}
    assert (out / "dog" / "rec_im0.png").is_file() and (out / "im0" / "rec_im0.png").is_file()


def test_an_actor_killed_after_its_server_accepted_the_prompt_runs_nothing_twice(setup, capsys):
    wf, imgs, out, make = setup
    for p in sorted(imgs.iterdir())[3:]:
        p.unlink()
    server = make("kill_client_after", die_on=2, delay=0.5)  # accepts its second prompt, then kills the sender
    assert _run(wf, imgs, out, server) == 0
    recs = _results(out)
    assert len(server.killed_clients) == 1 and all(r["status"] == "ok" for r in recs.values())
    assert server.posts == 3 and server.executions == 3  # Ray's retry follows the accepted prompt, not a copy
    assert sorted(r["prompt_id"] for r in recs.values()) == sorted(b["prompt_id"] for b in server.prompts)


def test_the_servers_the_actors_start_leave_no_folder_behind(setup, tmp_path):
    wf, imgs, out, make = setup
    for p in sorted(imgs.iterdir())[3:]:
        p.unlink()
    started = tmp_path / "started.txt"  # a line per server start: its --output-directory
    comfy = fake_comfyui(tmp_path / "comfy", started, "kill_client", die_on=3)  # the 3rd prompt kills the actor
    assert _run(wf, imgs, out, extra=("--actors", "1", "--comfyui", str(comfy), "--start-timeout", "60")) == 0
    assert all(r["status"] == "ok" for r in _results(out).values()) and len(_results(out)) == 3
    workdirs = [Path(line).parent for line in started.read_text().split()]
    assert len(workdirs) == 2  # the killed actor's server, and the one its restart started
    assert [d for d in workdirs if d.exists()] == []  # inputs, outputs, logs: all gone
