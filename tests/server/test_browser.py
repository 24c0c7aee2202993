"""Browser test of the Trajectory Preview viewer (issue 5): the real ComfyUI frontend in headless Chromium.

The server tier's ComfyUI (with the pack) serves the UI; ``tests/server/browser/viewer_check.cjs`` drives the
system Chromium with playwright-core (Node): it opens the UI, loads the example workflow
``example_workflows/invert_and_reconstruct.json`` with ``app.loadGraphData`` (or, when that file is absent or
lacks a Trajectory Preview, a minimal API-format workflow with ``app.loadApiJson``), points it at the tiny
checkpoint and an uploaded 64x64 image with few steps, queues it with ``app.queuePrompt``, waits for the viewer
to be filled from ``onExecuted``, scrubs it (input event, keyboard, mouse) and takes a screenshot
(``tests/artifacts/browser_viewer.png``, git-ignored). This file makes the assertions on what it saw.

A second test (``tests/server/browser/load_check.cjs``) loads the attention examples ``attention_edit`` and
``flow_attention_edit`` with ``app.loadGraphData`` and checks what the frontend made of them: every node type
registered, no node in error, widget values and links serialized back as saved, and a workflow saved before
Attention Control's last two widgets existed gets them at their defaults (observations in
``tests/artifacts/browser_load.json``).

Needs /usr/bin/chromium (or $DDIMINV_CHROMIUM) and the npm package playwright-core (found through
$PLAYWRIGHT_CORE_DIR, $NODE_PATH, ``.cache/node/node_modules`` or Node's own resolution); .ci/run installs both.
Skips with the reason when either is missing -- except under CI=true (unless DDIMINV_CI_NO_BROWSER=1 opts out),
where a browser test that cannot run fails: the only real-frontend test must not vanish from a green CI run.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from ddiminv_dev import tiny_checkpoint as checkpoint
from inversion.imaging import select_frames  # pure: no ComfyUI import

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "tests" / "server" / "browser" / "viewer_check.cjs"
EXAMPLE = ROOT / "example_workflows" / "invert_and_reconstruct.json"
ARTIFACTS = ROOT / "tests" / "artifacts"
SCREENSHOT = ARTIFACTS / "browser_viewer.png"
OBSERVATIONS = ARTIFACTS / "browser_viewer.json"

PREVIEW = "DDIMInvTrajectoryPreview"
EXTENSION_NAME = "ddim_inversion.TrajectoryPreview"
STEPS = 5
FRAMES = 4  # of STEPS + 1 states -> 4 frames: steps 0, 2, 3, 5
DRIVER_TIMEOUT = 170  # seconds, the whole browser session (UI load + execution + checks)
EXECUTION_TIMEOUT_MS = 120_000


# ---------------------------------------------------------------------------------------------------- tools
def chromium_path() -> str | None:
    p = os.environ.get("DDIMINV_CHROMIUM") or "/usr/bin/chromium"
    return p if os.path.isfile(p) and os.access(p, os.X_OK) else None


def node_path() -> str | None:
    return shutil.which("node")


def playwright_core_dir() -> str | None:
    """The playwright-core package directory: $PLAYWRIGHT_CORE_DIR, $NODE_PATH, .cache/node, or node's resolver."""
    cands = []
    if os.environ.get("PLAYWRIGHT_CORE_DIR"):
        cands.append(Path(os.environ["PLAYWRIGHT_CORE_DIR"]))
    for entry in (os.environ.get("NODE_PATH") or "").split(os.pathsep):
        if entry:
            cands.append(Path(entry) / "playwright-core")
    cands.append(ROOT / ".cache" / "node" / "node_modules" / "playwright-core")
    for c in cands:
        if (c / "package.json").is_file():
            return str(c)
    node = node_path()
    if node:
        try:
            r = subprocess.run([node, "-e", "process.stdout.write(require.resolve('playwright-core/package.json'))"],
                               capture_output=True, text=True, timeout=30, cwd=str(ROOT))
            if r.returncode == 0 and r.stdout.strip():
                return str(Path(r.stdout.strip()).parent)
        except (OSError, subprocess.SubprocessError):
            pass
    return None


# ---------------------------------------------------------------------------------------------------- server I/O
def upload_image(server, name: str) -> str:
    """POST a small 64x64 PNG to /upload/image (multipart, like the UI's upload); returns the stored name."""
    from PIL import Image

    img = Image.new("RGB", (64, 64))
    px = img.load()
    for y in range(64):
        for x in range(64):
            px[x, y] = (4 * x, 4 * y, 255 - 2 * (x + y))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    boundary = "----ddiminv" + uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
        "Content-Type: image/png\r\n\r\n").encode() + buf.getvalue() + (
        f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\ntrue"
        f"\r\n--{boundary}--\r\n").encode()
    req = urllib.request.Request(server.url + "/upload/image", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        out = json.loads(resp.read())
    stored = out["name"] if not out.get("subfolder") else f"{out['subfolder']}/{out['name']}"
    assert (Path(server.input_dir) / stored).is_file(), (out, server.input_dir)
    return stored


def quiet_first_run(server):
    """No first-run dialog may cover the canvas: the tutorial is marked done, and the frontend's "Missing Models"
    dialog (it reads the example workflow's ``properties.models``, which name the real SD1.5 file the test swaps
    for the tiny checkpoint) is switched off. A failed setting fails the test: a dialog would cover the viewer."""
    for key, value in (("Comfy.TutorialCompleted", True), ("Comfy.Workflow.ShowMissingModelsWarning", False)):
        server.request("POST", f"/settings/{key}", value)


def minimal_api_workflow(image_name: str) -> dict:
    """LoadImage -> tiny checkpoint -> VAE Encode (Inversion) -> 2x CLIPTextEncode -> DDIM Invert -> Preview."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint.CKPT_NAME}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a gradient"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": ""}},
        "5": {"class_type": "DDIMInvVAEEncode", "inputs": {"pixels": ["1", 0], "vae": ["2", 2]}},
        "6": {"class_type": "DDIMInvert", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0],
                                                    "latent": ["5", 0], "steps": STEPS}},
        "7": {"class_type": PREVIEW, "inputs": {"trajectory": ["6", 2], "frames": FRAMES, "show": "states"}},
    }


def workflow_source(image_name: str) -> tuple[str, dict]:
    """('example', UI workflow) when the example workflow has a Trajectory Preview, else ('minimal', API prompt).
    DDIMINV_BROWSER_WORKFLOW=minimal forces the minimal one."""
    if os.environ.get("DDIMINV_BROWSER_WORKFLOW") != "minimal" and EXAMPLE.is_file():
        try:
            wf = json.loads(EXAMPLE.read_text())
        except ValueError:
            wf = None
        if isinstance(wf, dict) and any(n.get("type") == PREVIEW for n in wf.get("nodes") or []):
            return "example", wf
    return "minimal", minimal_api_workflow(image_name)


def run_driver(cfg: dict) -> dict:
    cfg_path = ARTIFACTS / "browser_viewer.config.json"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(json.dumps(cfg))
    t0 = time.monotonic()
    try:
        r = subprocess.run([node_path(), str(DRIVER), str(cfg_path)], capture_output=True, text=True,
                           timeout=DRIVER_TIMEOUT + 10, cwd=str(ROOT))
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"browser driver timed out after {DRIVER_TIMEOUT + 10}s\nstderr:\n{(e.stderr or '')[-4000:]}")
    elapsed = time.monotonic() - t0
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        pytest.fail(f"browser driver printed no result (rc {r.returncode})\nstdout:\n{r.stdout[-2000:]}\n"
                    f"stderr:\n{r.stderr[-4000:]}")
    obs = json.loads(lines[-1])
    obs["_driver_rc"] = r.returncode
    obs["_driver_seconds"] = round(elapsed, 1)
    obs["_driver_stderr_tail"] = r.stderr[-3000:]
    OBSERVATIONS.write_text(json.dumps(obs, indent=1))
    return obs


def extension_path(server) -> str:
    """URL folder of the pack's web files as the server lists them ("/extensions/<pack folder>/")."""
    files = server.get("/extensions") or []
    ours_ = [f for f in files if f.endswith("/ddim_inversion.js")]
    assert len(ours_) == 1, f"the server does not list the pack's ddim_inversion.js exactly once: {files}"
    return ours_[0][: -len("ddim_inversion.js")]


def ours(text: str, ext_path: str) -> bool:
    """A console/page error that comes from this pack's web extension (its files, or its logged prefix)."""
    t = text or ""
    return ext_path in t or "[ddim_inversion]" in t or "ddim_inversion.js" in t or EXTENSION_NAME in t


# ---------------------------------------------------------------------------------------------------- the test
def in_ci() -> bool:
    """CI=true (as CI services set it), unless DDIMINV_CI_NO_BROWSER=1 opts the browser test out explicitly."""
    return (os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")
            and os.environ.get("DDIMINV_CI_NO_BROWSER", "0") != "1")


def cannot_run(reason: str) -> None:
    """Skip outside CI; under CI=true fail, naming what is missing."""
    if in_ci():
        pytest.fail(f"{reason} -- CI=true: the browser test must run in CI (.ci/run installs Chromium and "
                    "playwright-core; DDIMINV_CI_NO_BROWSER=1 opts out)", pytrace=False)
    pytest.skip(reason)


def browser_tools():
    """Chromium and playwright-core, or the test fails under CI / skips elsewhere (cannot_run) naming the fix."""
    chromium = chromium_path()
    if chromium is None:
        cannot_run("no Chromium at /usr/bin/chromium (or $DDIMINV_CHROMIUM): `apt-get install -y chromium`")
    if node_path() is None:
        cannot_run("no node executable: Node.js is needed to drive Chromium with playwright-core")
    pw = playwright_core_dir()
    if pw is None:
        cannot_run("playwright-core not found ($PLAYWRIGHT_CORE_DIR, $NODE_PATH, .cache/node): "
                   "`cd .cache/node && npm install --no-save playwright-core@1` (.ci/run does this)")
    return chromium, pw


def test_trajectory_viewer_in_real_frontend(request):
    chromium, pw = browser_tools()

    server = request.getfixturevalue("server")  # only now: a skip above costs no server start
    ext_path = extension_path(server)
    image_name = upload_image(server, f"ddiminv_browser_{uuid.uuid4().hex[:8]}.png")
    quiet_first_run(server)
    kind, wf = workflow_source(image_name)
    patches = [
        {"type": "CheckpointLoaderSimple", "widget": "ckpt_name", "value": checkpoint.CKPT_NAME},
        {"type": "LoadImage", "widget": "image", "value": image_name},
        {"type": "DDIMInvert", "widget": "steps", "value": STEPS},
        {"type": PREVIEW, "widget": "frames", "value": FRAMES},
        {"type": PREVIEW, "widget": "show", "value": "states"},
    ]
    if SCREENSHOT.exists():
        SCREENSHOT.unlink()
    cfg = {
        "url": server.url, "chromium": chromium, "playwrightCore": pw, "screenshot": str(SCREENSHOT),
        "workflow": wf if kind == "example" else None, "apiWorkflow": wf if kind == "minimal" else None,
        "patches": patches, "previewType": PREVIEW, "extensionName": EXTENSION_NAME,
        "extensionPath": ext_path, "timeoutMs": EXECUTION_TIMEOUT_MS, "hardTimeoutMs": DRIVER_TIMEOUT * 1000,
    }
    obs = run_driver(cfg)
    print(f"browser check ({kind} workflow, Chromium {obs.get('browserVersion')}): driver {obs['_driver_seconds']}s, "
          f"execution {obs.get('executeMs')} ms; observations in {OBSERVATIONS}")
    where = f"\n(observations: {OBSERVATIONS}; screenshot: {SCREENSHOT})\ndriver stderr:\n{obs['_driver_stderr_tail']}"

    # -- no errors from our extension, and all of its modules were served
    our_errors = [c for c in obs.get("console", [])
                  if c["type"] == "error" and (ours(c["text"], ext_path) or ours(c["url"], ext_path))]
    our_errors += [e for e in obs.get("pageErrors", []) if ours(e["message"], ext_path) or ours(e["stack"], ext_path)]
    # the viewer's frames are temp images (/view?...type=temp); the Load Image node's own preview of the
    # workflow's placeholder file (example.png, before the test patches the widget) may 404: not ours
    our_errors += [f for f in obs.get("failedRequests", [])
                   if ext_path in f["url"] or ("/view?" in f["url"] and "type=temp" in f["url"])]
    assert not our_errors, f"errors from the ddim_inversion extension: {json.dumps(our_errors, indent=1)}{where}"
    served = {re.sub(r"\?.*$", "", r["url"]).split(ext_path, 1)[-1]: r["status"]
              for r in obs.get("extensionRequests", [])}
    for mod in ("ddim_inversion.js", "lib/frames.js", "lib/format.js", "lib/url.js", "lib/plot.js"):
        assert served.get(mod) in (200, 304), f"{ext_path}{mod} not served: {served}{where}"
    assert not obs.get("driverError"), f"browser driver error: {obs['driverError']}{where}"

    # -- the workflow loaded, was patched and has the viewer widget before running
    loaded = obs["loaded"]
    assert loaded["previewCount"] >= 1, loaded
    assert not loaded["missing"], f"widgets not found in the {kind} workflow: {loaded['missing']}{where}"
    assert loaded["viewerWidget"] and loaded["rootIsDdimViewer"], loaded
    assert "ddim-trajectory-viewer" in (loaded["rootClass"] or "").split(), loaded  # newer frontends add classes
    assert loaded["headerBefore"] == "Run the workflow to see the trajectory.", loaded
    assert loaded["sliderDisabledBefore"] is True, loaded

    # -- it ran, and the viewer got the trajectory
    errors = [e for e in obs.get("events", []) if e["ev"] in ("execution_error", "execution_interrupted")]
    assert obs.get("queue", {}).get("ok"), f"app.queuePrompt failed: {obs.get('queue')}{where}"
    assert obs["waitResult"] == "filled", f"viewer not filled: {obs['waitResult']} {errors}\n" \
                                          f"{server.log_tail(40)}{where}"
    assert obs.get("finished") == "success", f"the workflow did not finish: {obs.get('finished')} {errors}\n" \
                                              f"{server.log_tail(40)}{where}"
    expected = select_frames(STEPS + 1, FRAMES)
    n = len(expected)
    executed = [e for e in obs["events"] if e["ev"] == "executed" and e.get("trajectoryFrames") is not None]
    assert executed and executed[-1]["trajectoryFrames"] == n, obs["events"]
    assert "images" in executed[-1]["outputKeys"], executed[-1]

    init = obs["initial"]
    assert int(init["sliderMax"]) + 1 == n, init
    assert init["dataFrames"] == str(n), init
    assert init["sliderMin"] == "0" and init["sliderValue"] == "0" and init["sliderDisabled"] is False, init
    assert init["label"].startswith(f"frame 1/{n} · step {expected[0]}/{STEPS} · σ "), init
    assert f"· {STEPS} steps · σmax " in init["header"] and init["header"].endswith(" · states"), init
    assert init["figure"].startswith("x0 drift (RMS) "), init
    assert init["plotPath"] and init["plotPath"].startswith("M"), init
    assert init["imgDisplay"] == "" and init["imgSrc"] and init["imgSrc"].startswith("/") and \
        "/view?filename=" in init["imgSrc"] and "type=temp" in init["imgSrc"], init
    assert obs["imageLoaded0"] and init["imgNatural"][0] > 0, f"frame image did not load: {init}{where}"

    # -- the viewer is shown inside the node on the canvas
    geo = obs["geometry"]
    assert geo["connected"] and geo["hiddenBy"] is None, geo
    assert geo["viewerRect"]["width"] > 50, geo
    assert geo["centerInsideNode"], f"viewer not inside its node: {geo}"
    parts = geo["parts"]
    assert set(parts) == {"img", "slider", "label", "plot"}, parts
    assert all(parts[k]["height"] > 0 for k in parts), f"a viewer part is collapsed to zero height: {parts}"
    assert parts["img"]["height"] >= 64 and parts["plot"]["height"] >= 40, f"viewer image/plot squeezed: {parts}"
    assert not geo["partsOutsideNode"], (
        f"viewer parts {geo['partsOutsideNode']} overflow the node's box (the DOM widget got "
        f"{geo['viewerRect']['height']}px, its content needs {geo['rootScroll'][0]}px; widgets: {geo['widgets']})")
    vr = geo["viewerRect"]
    clipped = [k for k, b in parts.items() if b["left"] < vr["left"] - 0.5 or b["right"] > vr["right"] + 0.5]
    assert not clipped, f"viewer parts {clipped} wider than the viewer (clipped by its overflow:hidden): {parts} {vr}"
    assert geo["topmostAtViewerIsOurs"], f"something covers the viewer: {geo['topmostTag']}"

    # -- scrubbing changes the frame, step label, image and marker
    last, mid = obs["afterScrubLast"], obs["afterScrubMid"]
    assert last["sliderValue"] == str(n - 1) and last["dataFrame"] == str(n - 1), last
    assert last["label"].startswith(f"frame {n}/{n} · step {expected[-1]}/{STEPS} · σ "), last
    assert last["dataStep"] == str(expected[-1]), last
    assert last["imgSrc"] != init["imgSrc"] and obs["imageLoadedLast"], (init["imgSrc"], last["imgSrc"])
    assert last["markerX"] != init["markerX"], (init["markerX"], last["markerX"])
    m = (n - 1) // 2
    assert mid["label"].startswith(f"frame {m + 1}/{n} · step {expected[m]}/{STEPS}"), mid
    assert mid["imgSrc"] not in (init["imgSrc"], last["imgSrc"]), mid

    # -- real input paths: keyboard on the focused range input and a mouse click on it
    assert "keyboardError" not in obs, obs.get("keyboardError")
    assert obs["afterKeyHome"]["dataFrame"] == "0", obs["afterKeyHome"]
    assert obs["afterKeyRight"]["dataFrame"] == "1", obs["afterKeyRight"]
    assert obs["afterKeyRight"]["label"].startswith(f"frame 2/{n} · step {expected[1]}/{STEPS}"), obs["afterKeyRight"]
    assert "mouseError" not in obs, obs.get("mouseError")
    assert obs["afterMouseEnd"]["dataFrame"] == str(n - 1), \
        f"a click at the right end of the scrubber did not reach it: {obs['afterMouseEnd']} {geo}"

    assert SCREENSHOT.is_file() and SCREENSHOT.stat().st_size > 1000, SCREENSHOT
    other = [c["text"][:200] for c in obs.get("console", []) if c["type"] == "error"]
    if other:
        print(f"console errors not from this pack (ignored): {other[:10]}")


# ---------------------------------------------------------------------------------------------------- loading
LOAD_DRIVER = ROOT / "tests" / "server" / "browser" / "load_check.cjs"
LOAD_OBSERVATIONS = ARTIFACTS / "browser_load.json"
LOAD_TIMEOUT = 300  # seconds, the whole session: UI load (over a minute on a loaded 2-core machine) + 3 loads
ATTENTION_EXAMPLES = ("attention_edit", "flow_attention_edit")
FEATURE_WIDGETS = 2  # Attention Control's feature_block, feature_end: the last widgets, both -1 by default


def saved_before_feature_widgets(wf: dict) -> dict:
    """``wf`` as it was saved before Attention Control had its last two widgets (their values cut off)."""
    old = json.loads(json.dumps(wf))
    for n in old["nodes"]:
        if n["type"] == "DDIMInvAttentionControl":
            n["widgets_values"] = n["widgets_values"][:-FEATURE_WIDGETS]
    return old


def test_attention_examples_load_in_real_frontend(request):
    """attention_edit and flow_attention_edit load in the real frontend: every node type registered (no red
    'missing node' boxes), no node in error, each node's widgets_values and every link serialized back as saved;
    and attention_edit as saved before Attention Control's feature widgets (10 values) loads them at their
    defaults (-1: the same edit)."""
    chromium, pw = browser_tools()
    saved = {name: json.loads((ROOT / "example_workflows" / f"{name}.json").read_text()) for name in ATTENTION_EXAMPLES}
    saved["attention_edit_before_features"] = saved_before_feature_widgets(saved["attention_edit"])
    server = request.getfixturevalue("server")
    quiet_first_run(server)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    cfg_path = ARTIFACTS / "browser_load.config.json"
    cfg_path.write_text(json.dumps({
        "url": server.url, "chromium": chromium, "playwrightCore": pw, "readyType": "DDIMInvAttentionControl",
        "workflows": [{"name": k, "workflow": v} for k, v in saved.items()], "hardTimeoutMs": LOAD_TIMEOUT * 1000}))
    try:
        r = subprocess.run([node_path(), str(LOAD_DRIVER), str(cfg_path)], capture_output=True, text=True,
                           timeout=LOAD_TIMEOUT + 10, cwd=str(ROOT))
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"load driver timed out after {LOAD_TIMEOUT + 10}s\nstderr:\n{(e.stderr or '')[-4000:]}")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"load driver printed no result (rc {r.returncode})\nstderr:\n{r.stderr[-4000:]}"
    obs = json.loads(lines[-1])
    LOAD_OBSERVATIONS.write_text(json.dumps(obs, indent=1))
    where = f"\n(observations: {LOAD_OBSERVATIONS})\ndriver stderr:\n{r.stderr[-3000:]}"
    assert not obs.get("driverError"), f"browser driver error: {obs['driverError']}{where}"
    print(f"browser load check (Chromium {obs.get('browserVersion')}): UI ready in {obs.get('readyMs')} ms, "
          f"all in {obs.get('totalMs')} ms")

    for name, wf in saved.items():
        got = obs["loads"][name]
        want_nodes = {n["id"]: n for n in wf["nodes"]}
        assert got["ids"] == sorted(want_nodes), (name, got["ids"])
        for n in got["nodes"]:
            assert n["type"] == want_nodes[n["id"]]["type"], (name, n)
            assert n["registered"], f"{name}: node {n['id']} has the unregistered type {n['type']}{where}"
            assert not n["hasErrors"], f"{name}: node {n['id']} ({n['type']}) is in error{where}"
        ser = {n["id"]: n for n in got["serialized"]["nodes"]}
        for nid, n in want_nodes.items():
            values = ser[nid]["widgets_values"] or []
            if name.endswith("_before_features") and n["type"] == "DDIMInvAttentionControl":
                # the widgets the saved workflow did not have get their defaults
                assert values == n["widgets_values"] + [-1, -1], (name, values)
                continue
            assert values == (n.get("widgets_values") or []), (name, nid, n["type"], values)
        assert [list(lk) for lk in got["serialized"]["links"]] == [list(lk) for lk in wf["links"]], name
        ctl = [n for n in got["nodes"] if n["type"] == "DDIMInvAttentionControl"]
        assert len(ctl) == 1 and ctl[0]["widgetNames"][-FEATURE_WIDGETS:] == ["feature_block", "feature_end"], ctl
