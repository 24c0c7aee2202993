"""tools/ray_batch.py without Ray: the manifest (folder, CSV, JSON) and its per-item overrides, the usage errors."""
from __future__ import annotations

import argparse
import io
import json
import types
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))

import batchlib as lib  # noqa: E402
import ray_batch  # noqa: E402


def _items(tmp_path, name=None, text=None, images=None):
    if text is not None:
        (tmp_path / name).write_text(text)
    return ray_batch.load_items(argparse.Namespace(images=images, manifest=tmp_path / name if name else None))


def test_folder_items(tmp_path):
    for n in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / n).write_bytes(b"x")
    assert _items(tmp_path, images=tmp_path) == [("a.jpg", tmp_path / "a.jpg", []), ("b.png", tmp_path / "b.png", [])]


def test_csv_manifest_overrides_per_item(tmp_path):
    items = _items(tmp_path, "m.csv", 'image,Source prompt.text,DDIMInvert.steps,id\n'
                                      'photos/cat.png,a cat,10,\n'
                                      'photos/cat.png,"a dog, small",,cat-as-dog\n'
                                      'dog.png,,"""7""",\n')
    assert items == [
        ("cat.png", tmp_path / "photos/cat.png", [("Source prompt", "text", "a cat"), ("DDIMInvert", "steps", 10)]),
        ("cat-as-dog", tmp_path / "photos/cat.png", [("Source prompt", "text", "a dog, small")]),  # empty: unset
        ("dog.png", tmp_path / "dog.png", [("DDIMInvert", "steps", "7")]),                 # JSON string stays one
    ]
    wf = {"1": {"class_type": "CLIPTextEncode", "inputs": {"text": "x"}, "_meta": {"title": "Source prompt"}},
          "2": {"class_type": "DDIMInvert", "inputs": {"steps": 50}}}
    out = lib.apply_overrides(wf, items[0][2])
    assert out["1"]["inputs"]["text"] == "a cat" and out["2"]["inputs"]["steps"] == 10
    assert wf["2"]["inputs"]["steps"] == 50


def test_json_manifest(tmp_path):
    doc = [{"image": "a.png", "set": {"Source prompt.text": "a cat", "DDIMInvert.cfg": 2.5}},
           {"image": "a.png", "id": "again"}]
    assert _items(tmp_path, "m.json", json.dumps(doc)) == [
        ("a.png", tmp_path / "a.png", [("Source prompt", "text", "a cat"), ("DDIMInvert", "cfg", 2.5)]),
        ("again", tmp_path / "a.png", [])]


@pytest.mark.parametrize("name,text,match", [
    ("m.csv", "file,x.steps\na.png,1\n", "no 'image' column"),
    ("m.csv", "image,steps\na.png,1\n", "TITLE_OR_ID.input=value"),
    ("m.csv", "image\na.png\na.png\n", "appears twice; give each row its own 'id'"),
    ("m.json", "{bad", "not valid JSON"),
    ("m.json", '{"image": "a.png"}', "must be a list"),
    ("m.json", '[{"image": "a.png", "set": [1]}]', "item 0 is not"),
    ("missing.csv", None, "No such file"),
])
def test_manifest_errors(tmp_path, name, text, match):
    with pytest.raises(lib.RunnerError, match=match):
        _items(tmp_path, name, text)


def test_usage_errors_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ray_batch, "import_ray", lambda: pytest.fail("Ray was started for a bad command"))
    wf = tmp_path / "w.json"
    wf.write_text(json.dumps({"1": {"class_type": "LoadImage", "inputs": {"image": "x"}}}))
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "m.csv").write_text("image,Nope.text\na.png,hi\n")
    base = ["--workflow", str(wf), "--out", str(tmp_path / "o"), "--server", "http://127.0.0.1:9"]
    assert ray_batch.main(base + ["--manifest", str(tmp_path / "m.csv")]) == 2
    assert "no node with id, title or class 'Nope'" in capsys.readouterr().err  # a column naming no node
    (tmp_path / "empty").mkdir()
    assert ray_batch.main(base + ["--images", str(tmp_path / "empty")]) == 2
    assert "no images" in capsys.readouterr().err
    (tmp_path / "none.csv").write_text("image,id\n")
    assert ray_batch.main(base + ["--manifest", str(tmp_path / "none.csv")]) == 2
    assert "none.csv: no items" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ray_batch.main(base + ["--images", str(tmp_path), "--actors", "-1"])


def test_a_rerun_with_other_manifest_values_redoes_only_the_changed_items(tmp_path, capsys, monkeypatch):
    wf = tmp_path / "w.json"
    wf.write_text(json.dumps({"1": {"class_type": "LoadImage", "inputs": {"image": "x"}},
                              "2": {"class_type": "DDIMInvert", "inputs": {"steps": 50}}}))
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "m.csv").write_text("image,DDIMInvert.steps,id\na.png,10,one\na.png,10,two\n")
    argv = ["--workflow", str(wf), "--out", str(tmp_path / "o"), "--server", "http://127.0.0.1:9",
            "--manifest", str(tmp_path / "m.csv")]
    results = lib.Results(tmp_path / "o")
    for ident in ("one", "two"):  # both done with steps=10, as a run would have recorded them
        prompt = lib.apply_overrides(lib.load_workflow(wf), [("DDIMInvert", "steps", 10)])
        results.record(ident, {"status": "ok", "outputs": [], "settings": lib.settings_key(prompt, "1")})
    monkeypatch.setattr(ray_batch, "import_ray", lambda: (_ for _ in ()).throw(lib.RunnerError("Ray started")))
    assert ray_batch.main(argv) == 0 and "nothing to do" in capsys.readouterr().err
    (tmp_path / "m.csv").write_text("image,DDIMInvert.steps,id\na.png,10,one\na.png,50,two\n")
    assert ray_batch.main(argv) == 2  # it goes on to start Ray for the changed item
    err = capsys.readouterr().err
    assert "1 item(s) done with other settings are redone: two" in err and "error: Ray started" in err
    assert ray_batch.main(argv + ["--set", "DDIMInvert.steps=50"]) == 2  # --set comes under the manifest's values
    assert "1 item(s) done with other settings are redone: two" in capsys.readouterr().err


class _FakeRay:
    """What dispatch and start_actors ask of Ray, without Ray: a call's outcome is ``outcome(actor, item, n)``
    (n: how many calls that item had before), a value or an exception to raise."""

    class exceptions:  # noqa: N801  (as ray.exceptions)
        RayActorError = type("RayActorError", (Exception,), {})

    def __init__(self, outcome=None):
        self.outcome, self.killed, self.calls, self.options = outcome, [], [], []

    def wait(self, refs, num_returns=1):
        return refs[:1], refs[1:]

    def get(self, ref):
        result = self.outcome(*ref)
        if isinstance(result, Exception):
            raise result
        return result

    def kill(self, actor, no_restart=True):
        self.killed.append(actor)


def _dispatch(outcome, items=("x", "y", "z"), moves=1):
    fake, finished, gone = _FakeRay(outcome), {}, []

    def submit(actor, item):
        fake.calls.append((actor, item))
        return actor, item, sum(i == item for _, i in fake.calls) - 1

    ray_batch.dispatch(fake, [("A", "http://a"), ("B", "http://b")], list(items), submit,
                       lambda item, result, error: finished.setdefault(item, (result, error)), moves,
                       lib.Progress(0, stream=io.StringIO()), lambda item, url: gone.append((item, url)))
    return fake, finished, gone


def test_an_actor_that_died_has_its_prompt_cancelled_before_the_item_moves():
    ok = ({"status": "ok"}, [])
    fake, finished, gone = _dispatch(lambda a, i, n: _FakeRay.exceptions.RayActorError() if (a, i) == ("A", "x")
                                     else ok)
    assert gone == [("x", "http://a")] and fake.killed == ["A"]  # told before x goes to B
    assert fake.calls.index(("B", "x")) > fake.calls.index(("A", "x"))
    assert finished == {"x": (ok, None), "y": (ok, None), "z": (ok, None)}


def test_any_other_failure_of_a_call_is_its_items_error_and_the_rest_finish():
    ok = ({"status": "ok"}, [])
    fake, finished, gone = _dispatch(lambda a, i, n: ValueError("boom\nin the actor") if i == "x" else ok)
    assert finished["x"] == (None, "the actor of http://a failed: in the actor")
    assert finished["y"] == finished["z"] == (ok, None) and not gone and not fake.killed
    assert [a for a, _ in fake.calls].count("A") == 2  # the actor goes on with the next item


def test_cancel_prompt_deletes_a_queued_prompt_and_interrupts_a_running_one(tmp_path):
    from ddiminv_dev.fake_comfy import FakeComfy
    server = FakeComfy("hang")
    try:
        server.pending = ["queued"]
        server.running["running"] = None
        assert lib.cancel_prompt(server.url, "queued") == "deleted from the queue" and server.deleted == ["queued"]
        assert lib.cancel_prompt(server.url, "elsewhere") is None and server.interrupted == 0  # not ours: untouched
        assert lib.cancel_prompt(server.url, "running") == "interrupted" and server.interrupted_ids == ["running"]
    finally:
        server.stop()
    assert lib.cancel_prompt(server.url, "running", timeout=1) is None  # a server that is gone: nothing to do


@pytest.mark.parametrize("ident", [".", "..", "...", "a/b", "..\\x", "a\x00b"])
def test_a_manifest_id_that_names_no_folder_of_its_own_is_refused(tmp_path, ident):
    with pytest.raises(lib.RunnerError, match="cannot be a folder name under --out"):
        _items(tmp_path, "m.json", json.dumps([{"image": "a.png", "id": ident}]))
    assert _items(tmp_path, "m.json", json.dumps([{"image": "a.png", "id": ".a"}]))[0][0] == ".a"  # a name: fine


def test_server_actors_reserve_no_gpu(monkeypatch):
    class Handle:
        def __init__(self, opts):
            self.opts = opts

        def remote(self, tools, server, start, timeout):
            ref = server or f"own{len(fake.options)}"
            return types.SimpleNamespace(ready=types.SimpleNamespace(remote=lambda: ref))

    fake = _FakeRay()
    fake.remote = lambda cls: types.SimpleNamespace(options=lambda **o: fake.options.append(o) or Handle(o))
    fake.cloudpickle = types.SimpleNamespace(register_pickle_by_value=lambda m: None)
    fake.wait = lambda refs, num_returns, timeout: (refs, [])
    fake.get = lambda ref: {"url": ref, "error": None}
    args = argparse.Namespace(server=["http://s1"], actors=2, gpus_per_actor=1.0, cpus_per_actor=1.0, comfy_arg=[],
                              comfyui=None, start_timeout=1.0, address=None, timeout=5.0)
    alive = ray_batch.start_actors(fake, args, lib.Progress(0, stream=io.StringIO()))
    assert [u for _, u in alive] == ["http://s1", "own2", "own3"]
    assert [o["num_gpus"] for o in fake.options] == [0, 1.0, 1.0]  # a running server's actor only talks to it


@pytest.mark.parametrize("extra,message", [
    (["--timeout", "0"], "--timeout must be > 0"),
    (["--actors", "-1"], "--actors must be >= 0"),
    (["--moves", "-1"], "--moves must be >= 0"),
    (["--actors", "0"], "no actor: give --actors N (N >= 1) or --server URL"),
])
def test_each_usage_error_says_which(tmp_path, capsys, extra, message):
    base = ["--workflow", "w.json", "--out", str(tmp_path / "o"), "--images", str(tmp_path)]
    with pytest.raises(SystemExit):
        ray_batch.main(base + extra)
    err = capsys.readouterr().err
    assert message in err and err.count("must") <= 1


def test_a_job_folder_left_by_a_killed_driver_goes_at_the_next_start(tmp_path, monkeypatch):
    import os
    import socket
    import subprocess
    import sys as _sys
    monkeypatch.setattr(ray_batch.tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([_sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    for name, owner in (("ddiminv-batch-dead", f"{host} {int(dead.stdout)}"), ("ddiminv-batch-live", f"{host} "
                        f"{os.getpid()}"), ("ddiminv-batch-other", f"elsewhere {int(dead.stdout)}"),
                        ("ddiminv-batch-noowner", None)):
        (tmp_path / name / "ddiminv-server-x").mkdir(parents=True)
        if owner:
            (tmp_path / name / "driver").write_text(owner)
    new = ray_batch.job_folder()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert "ddiminv-batch-dead" not in left and {"ddiminv-batch-live", "ddiminv-batch-other",
                                                  "ddiminv-batch-noowner", new.name} <= set(left)
    assert (new / "driver").read_text() == f"{host} {os.getpid()}"


class _SlowRay:
    """A stand-in for the ray module whose first ``init`` fails as a raylet that starts too late does."""
    def __init__(self, failures, message="The current node timed out during startup. This could happen ..."):
        self.failures, self.message, self.calls = failures, message, []

    def init(self, **kw):
        self.calls.append("init")
        if self.failures:
            self.failures -= 1
            raise Exception(self.message)

    def shutdown(self):
        self.calls.append("shutdown")


def test_a_local_ray_that_starts_too_late_is_started_once_more(capsys):
    ray = _SlowRay(failures=1)
    ray_batch.init_local(ray, num_cpus=2)
    assert ray.calls == ["init", "shutdown", "init"]
    assert "starting it once more" in capsys.readouterr().err
    ray = _SlowRay(failures=2)  # twice late: the error reaches the user
    with pytest.raises(Exception, match="timed out during startup"):
        ray_batch.init_local(ray, num_cpus=2)
    assert ray.calls == ["init", "shutdown", "init"]
    ray = _SlowRay(failures=1, message="some other failure")  # anything else is not retried
    with pytest.raises(Exception, match="some other failure"):
        ray_batch.init_local(ray, num_cpus=2)
    assert ray.calls == ["init"]
