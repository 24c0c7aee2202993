"""Unit tests for tools/lib.py's pure parts: no server, no ComfyUI."""
from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))  # tools/ holds scripts; their shared module is batchlib

import batchlib as lib  # noqa: E402
import runner  # noqa: E402


def _wf():
    return {
        "10": {"class_type": "LoadImage", "inputs": {"image": "a.png"}, "_meta": {"title": "Source"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "mask.png"}, "_meta": {"title": "Mask"}},
        "3": {"class_type": "DDIMInvert", "inputs": {"steps": 50, "cfg": 1.0, "latent": ["4", 0]},
              "_meta": {"title": "DDIM Invert"}},
        "4": {"class_type": "KSampler", "inputs": {"steps": 20}, "_meta": {"title": "Step 1.5: sample"}},
        "5": {"class_type": "KSampler", "inputs": {"steps": 20}, "_meta": {"title": "dup"}},
        "6": {"class_type": "KSampler", "inputs": {"steps": 20}, "_meta": {"title": "dup"}},
        "7": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}},
    }


# ------------------------------------------------------------------------------ override parsing
@pytest.mark.parametrize("text,value", [
    ("10", 10), ("1.5", 1.5), ("true", True), ("null", None), ('"10"', "10"), ("[\"4\", 0]", ["4", 0]),
    ("euler", "euler"), ("", ""), ("a=b", "a=b"), ("{bad", "{bad"),
])
def test_parse_value(text, value):
    assert lib.parse_value(text) == value


def test_parse_override_basic_and_dotted_titles():
    assert lib.parse_override("DDIM Invert.steps=10") == ("DDIM Invert", "steps", 10)
    assert lib.parse_override("3.cfg=2.5") == ("3", "cfg", 2.5)
    # dots in the title: the input is after the LAST dot of the key; '=' and dots allowed in the value
    assert lib.parse_override("Step 1.5: sample.steps=4") == ("Step 1.5: sample", "steps", 4)
    assert lib.parse_override("7.filename_prefix=a=b.c") == ("7", "filename_prefix", "a=b.c")
    assert lib.parse_override(" 3 . cfg =7") == ("3", "cfg", 7)


@pytest.mark.parametrize("bad", ["steps=4", "3.steps", ".steps=4", "3.=4", "=4", ""])
def test_parse_override_rejects_malformed(bad):
    with pytest.raises(lib.RunnerError, match="TITLE_OR_ID.input=value"):
        lib.parse_override(bad)


# ------------------------------------------------------------------------------ title / id resolution
def test_resolve_by_id_title_and_class():
    wf = _wf()
    assert lib.resolve_nodes(wf, "3") == ["3"]
    assert lib.resolve_nodes(wf, "DDIM Invert") == ["3"]
    assert lib.resolve_nodes(wf, "Step 1.5: sample") == ["4"]
    # class_type fallback names every node of that class, in numeric id order
    assert lib.resolve_nodes(wf, "KSampler") == ["4", "5", "6"]
    assert lib.resolve_nodes(wf, "SaveImage") == ["7"]


def test_resolve_id_wins_over_title():
    wf = _wf()
    wf["4"]["_meta"]["title"] = "3"
    assert lib.resolve_nodes(wf, "3") == ["3"]


def test_resolve_errors_are_clear():
    wf = _wf()
    with pytest.raises(lib.RunnerError, match="matches nodes 5, 6"):
        lib.resolve_nodes(wf, "dup")
    with pytest.raises(lib.RunnerError, match=r"no node .* 'Nope'.*3 \(DDIM Invert\)"):
        lib.resolve_nodes(wf, "Nope")


def test_apply_overrides_copies_and_sets():
    wf = _wf()
    notes = []
    out = lib.apply_overrides(wf, ["DDIM Invert.steps=8", "KSampler.steps=8", "3.latent=[\"2\", 0]",
                                      "7.new_input=hello"], warn=notes.append)
    assert out["3"]["inputs"]["steps"] == 8 and out["3"]["inputs"]["latent"] == ["2", 0]
    assert [out[k]["inputs"]["steps"] for k in ("4", "5", "6")] == [8, 8, 8]
    assert out["7"]["inputs"]["new_input"] == "hello"
    assert len(notes) == 1 and "new_input" in notes[0]
    assert wf["3"]["inputs"]["steps"] == 50  # the template is untouched


def test_find_image_node():
    wf = _wf()
    assert lib.find_image_node(wf) == "2"  # first LoadImage by numeric id, not by text ("10" < "2")
    assert lib.find_image_node(wf, "Source") == "10"
    assert lib.find_image_node(wf, "10") == "10"
    with pytest.raises(lib.RunnerError, match="use a node id"):
        lib.find_image_node(wf, "LoadImage")
    with pytest.raises(lib.RunnerError, match="no LoadImage"):
        lib.find_image_node({"1": {"class_type": "SaveImage", "inputs": {}}})


def test_check_api_workflow(tmp_path):
    ui = {"nodes": [], "links": [], "version": 0.4}
    with pytest.raises(lib.RunnerError, match="UI-format"):
        lib.check_api_workflow(ui)
    with pytest.raises(lib.RunnerError, match="not an API-format"):
        lib.check_api_workflow({"1": {"inputs": {}}})
    with pytest.raises(lib.RunnerError, match="not an API-format"):  # a /prompt body is not a workflow
        lib.check_api_workflow({"prompt": _wf(), "client_id": "x"})
    assert lib.check_api_workflow({"1": {"class_type": "X"}}) == {"1": {"class_type": "X", "inputs": {}}}
    p = tmp_path / "w.json"
    p.write_text("{not json")
    with pytest.raises(lib.RunnerError, match="not valid JSON"):
        lib.load_workflow(p)
    with pytest.raises(lib.RunnerError, match="not found"):
        lib.load_workflow(tmp_path / "missing.json")


# the example workflows that take a clip (Load Video), not an image: the batch job runs images, and refuses these
VIDEO_EXAMPLES = {"video_two_experts.api.json"}


def test_example_workflows_are_runner_compatible():
    """Every image example runs in the batch job; a clip example is refused with the error that names the fix."""
    wfs = sorted((ROOT / "example_workflows").glob("**/*.api.json"))
    if not wfs:
        pytest.skip("no example_workflows/*.api.json yet")
    assert VIDEO_EXAMPLES <= {p.name for p in wfs}
    for p in wfs:
        wf = lib.load_workflow(p)
        if p.name in VIDEO_EXAMPLES:
            assert not any(n.get("class_type") == "LoadImage" for n in wf.values()), p.name
            with pytest.raises(lib.RunnerError, match="no LoadImage node"):
                lib.find_image_node(wf)
            continue
        assert lib.find_image_node(wf) in wf, p.name


# ------------------------------------------------------------------------------ resume bookkeeping
def test_results_roundtrip_and_done(tmp_path):
    r = lib.Results(tmp_path, meta={"workflow": "w.json"})
    r.record("a.png", {"status": "ok", "server": "http://s1", "seconds": 1.25, "outputs": ["x.png"],
                       "texts": {"5": ["VAE ceiling: 31.50 dB PSNR"]}, "figure": 31.5, "error": None})
    r.record("b.png", {"status": "error", "server": "http://s2", "seconds": 0.5, "outputs": [], "texts": {},
                       "figure": None, "error": "boom"})
    assert not list(tmp_path.glob(".results*"))  # no temp files left behind
    r2 = lib.Results.load(tmp_path)
    assert r2.done("a.png") and not r2.done("b.png") and not r2.done("c.png")
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["summary"] == {"total": 2, "ok": 1, "failed": 1} and doc["workflow"] == "w.json"
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["image"] for r in rows] == ["a.png", "b.png"]
    assert rows[0]["status"] == "ok" and rows[0]["seconds"] == "1.250" and rows[0]["figure"] == "31.5"
    assert rows[0]["texts"] == "VAE ceiling: 31.50 dB PSNR" and rows[0]["outputs"] == "x.png"
    assert rows[1]["error"] == "boom"
    # a redo replaces the record; previous ok records survive a new run's writes
    r2.record("b.png", {"status": "ok", "server": "http://s1", "seconds": 0.1, "outputs": []})
    r3 = lib.Results.load(tmp_path)
    assert r3.done("a.png") and r3.done("b.png")


def test_results_finish_counts_only_what_is_done_with_its_settings(tmp_path):
    r = lib.Results(tmp_path)
    r.record("a", {"status": "ok", "outputs": [], "settings": "k1"})
    r.record("b", {"status": "ok", "outputs": [], "settings": "k0"})  # done with other settings
    r.record("c", {"status": "error", "outputs": [], "settings": "k1", "error": "boom"})
    out = io.StringIO()
    assert r.finish({"a": "k1", "b": "k1", "c": "k1"}, lib.Progress(0, stream=out)) == 1
    assert out.getvalue() == f"done: 1/3 ok, 2 failed; results in {tmp_path / 'results.json'}\n"
    assert r.finish({"a": "k1"}, lib.Progress(0, stream=io.StringIO())) == 0


def test_results_missing_and_corrupt(tmp_path):
    assert lib.Results.load(tmp_path / "nope").images == {}
    (tmp_path / "results.json").write_text("{trunc")
    with pytest.raises(lib.RunnerError, match="unreadable"):
        lib.Results.load(tmp_path)
    (tmp_path / "results.json").write_text("[]")  # not ours: not overwritten either
    with pytest.raises(lib.RunnerError, match="unreadable"):
        lib.Results.load(tmp_path)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "results.json"
    p.write_text("old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(lib.os, "replace", boom)
    with pytest.raises(OSError):
        lib.atomic_write(p, b"new")
    assert p.read_text() == "old" and list(tmp_path.iterdir()) == [p]


def test_output_stems_disambiguate():
    assert lib.output_stems(["a.png", "b.jpg"]) == {"a.png": "a", "b.jpg": "b"}
    assert lib.output_stems(["a.png", "a.jpg"]) == {"a.png": "a_png", "a.jpg": "a_jpg"}
    # a stem of dots would be '.' or '..' (OUT itself or its parent): the whole name is used instead
    assert lib.output_stems(["...png", "..png"]) == {"...png": "...png", "..png": "..png"}
    # results.json/csv are taken; 'a.png' and 'a.PNG' must not share a folder
    assert lib.output_stems(["results.json.png"]) == {"results.json.png": "results.json_png"}
    assert lib.output_stems(["a.png", "a.PNG"]) == {"a.png": "a_png", "a.PNG": "a_png_1"}


@pytest.mark.parametrize("text,safe", [
    ("rec_00001_.png", "rec_00001_.png"), ("../../x", ".._.._x"), ("/etc/passwd", "_etc_passwd"),
    ("a\x00b", "a_b"), ("C:\\w", "C_w"), ("é ü.png", "_.png"), (".", ""), ("..", ""), ("...", ""), ("", ""),
    ("L" * 300 + ".png", "L" * 116 + ".png"),
])
def test_safe_part(text, safe):
    assert lib.safe_part(text) == safe
    assert len(safe) <= lib.NAME_MAX


def test_output_name_refuses_and_dedupes():
    used: set = set()

    def name(node, filename, subfolder=""):
        return lib.output_name({"node": node, "filename": filename, "subfolder": subfolder}, used)

    assert name("9", "r.png", "ddiminv/a") == "r.png"
    assert name("../../x", "r.png") == ".._.._x_r.png"      # the node id only prefixes a duplicate, reduced
    assert name("/abs", "r.png") == "_abs_r.png"
    assert name("9", "r.png") == "9_r.png"
    assert name("9", "r.png") == "9_r_1.png"
    assert name("9", "R.PNG") == "9_R_2.PNG"                 # case-insensitive file systems
    for bad in ("../../x.png", "/abs/x.png", "..", ".", "", "a\x00.png", "a\\b.png"):
        with pytest.raises(lib.Refused, match="file name"):
            name("9", bad)
    for bad in ("..", "a/../..", "/etc", "\\srv", "a\x00"):
        with pytest.raises(lib.Refused, match="subfolder"):
            name("9", "ok.png", bad)
    assert len(used) == 6


def test_list_images(tmp_path):
    for n in ("b.png", "a.JPG", "notes.txt", "c.webp"):
        (tmp_path / n).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in lib.list_images(tmp_path)] == ["a.JPG", "b.png", "c.webp"]
    with pytest.raises(lib.RunnerError, match="not a folder"):
        lib.list_images(tmp_path / "missing")


# ------------------------------------------------------------------------------ UI outputs, errors
def test_extract_ui_and_figure():
    outputs = {
        "9": {"images": [{"filename": "r_00001_.png", "subfolder": "", "type": "output"}]},
        "5": {"text": ["VAE ceiling: 31.25 dB PSNR (decode(encode(image)) vs image)"]},
        "12": {"text": "round trip: 28.5 dB", "ddim_metrics": [{"psnr": 27.0}], "animated": [False]},
    }
    files, texts, other = lib.extract_ui(outputs)
    assert files == [{"node": "9", "key": "images", "filename": "r_00001_.png", "subfolder": "", "type": "output"}]
    assert texts == {"5": [outputs["5"]["text"][0]], "12": ["round trip: 28.5 dB"]}
    assert other == {"12": {"ddim_metrics": [{"psnr": 27.0}]}}  # kept in the record's "ui", not a figure
    assert lib.figure_from(texts) == 28.5               # the last "NN dB" in the texts, in node order
    assert lib.figure_from({"2": ["-3 dB then 4.25 dB"], "10": ["none"]}) == 4.25
    assert lib.figure_from({"5": ["no number"]}) is None and lib.figure_from({}) is None


def test_error_formatting():
    body = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                      "details": ""},
            "node_errors": {"3": {"class_type": "DDIMInvert",
                                  "errors": [{"message": "Value smaller than min", "details": "steps: 0 < 1"}]}}}
    s = lib.format_prompt_error(400, body)
    assert "HTTP 400" in s and "node 3 (DDIMInvert): Value smaller than min: steps: 0 < 1" in s
    assert "boom" in lib.format_exec_error({"node_id": "3", "node_type": "DDIMInvert",
                                                "exception_type": "ValueError", "exception_message": "boom\n"})
    assert lib.history_error({"status": {"status_str": "success", "completed": True}}) is None
    assert lib.history_error({"status": {"completed": False, "messages": [
        ["execution_start", {}], ["execution_interrupted", {"node_id": "6", "node_type": "DDIMInvert"}]]}}) \
        == "interrupted at node 6 (DDIMInvert)"
    assert lib.history_error({"status": {"completed": False}}) == "execution failed (see the server log)"
    msg = lib.unreachable_message("http://127.0.0.1:8190", ConnectionRefusedError("refused"))
    assert "http://127.0.0.1:8190" in msg and "--port 8190" in msg and "--server" in msg


def test_server_urls():
    assert lib.normalize_server("127.0.0.1:8188/") == "http://127.0.0.1:8188"
    assert lib.ws_url("http://h:1", "abc") == "ws://h:1/ws?clientId=abc"
    assert lib.ws_url("https://h/comfy", "abc") == "wss://h/comfy/ws?clientId=abc"


def test_cli_usage_errors(tmp_path, capsys):
    wf = tmp_path / "w.json"
    wf.write_text(json.dumps(_wf()))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rc = runner.main(["--workflow", str(wf), "--images", str(imgs), "--out", str(tmp_path / "o"),
                      "--set", "Nope.steps=1"])
    assert rc == 2 and "no node with id, title or class 'Nope'" in capsys.readouterr().err
    rc = runner.main(["--workflow", str(wf), "--images", str(imgs), "--out", str(tmp_path / "o")])
    assert rc == 2 and "no images" in capsys.readouterr().err


def test_cli_unreachable_server_names_url(tmp_path, capsys):
    pytest.importorskip("aiohttp")
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    wf = tmp_path / "w.json"
    wf.write_text(json.dumps(_wf()))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "a.png").write_bytes(b"x")
    rc = runner.main(["--workflow", str(wf), "--images", str(imgs), "--out", str(tmp_path / "o"),
                      "--server", f"127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert rc == 2 and f"http://127.0.0.1:{port} is unreachable" in err and f"--port {port}" in err
    assert "nothing was run" in err
