"""The shipped API workflows run on a real ComfyUI server (the session ``server`` fixture).

Every ``example_workflows/api/<name>.api.json`` is queued over HTTP unmodified except:

* the model file names -> tiny random files in the real formats: the SD1.5-format checkpoint
  (ddiminv_dev/tiny_checkpoint.py) for Load Checkpoint; for flow_model and flow_attention_edit (SD3 workflows;
  the latter value injection with attention control) the diffusion-model-only
  SD3 MMDiT, the CLIP-L text encoder and the 16-channel SD3 VAE of ddiminv_dev/tiny_flow_files.py (UNETLoader,
  CLIPLoader type sd3, VAELoader);
* the input image -> a generated 64x64 picture uploaded with POST /upload/image, as the UI does.

Steps are the shipped ones (20) except for the null-text workflows (4 steps x 2 iterations instead of the
paper's 50 x 10) and attention_edit (6 instead of 50): see STEP_OVERRIDES. core_interop's ``implicit`` solve
does not converge on random weights and spends its per-run budget.

Outputs (saved images, the preview frames) must exist. The exact round trip is checked in process
(``host.run``, the same executor): invert_and_reconstruct and flow_model (method exact) give back DDIM
Invert's input latent from the Inverted-Latent Sampler to a relative error < 1e-4; flow_model's trajectory
ends at sigma 1 with finite values. video_two_experts (Wan 2.2 A14B, two experts) runs only in process, its
loaders, text encoder and clip replaced by tiny fixtures (no tiny UMT5-XXL or Wan files exist for the server):
the clip's latent comes back to < 1e-5 and the decoded clip has its frame count.
"""
from __future__ import annotations

import io
import json
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from ddiminv_dev import tiny_checkpoint as checkpoint
from ddiminv_dev import tiny_flow_files

ROOT = Path(__file__).resolve().parents[2]
API_DIR = ROOT / "example_workflows" / "api"
RUNNABLE = ("invert_and_reconstruct", "invert_and_edit", "core_interop", "flow_model", "nulltext_reconstruct",
            "nulltext_edit", "attention_edit", "flow_attention_edit")
# workflow -> class_type -> inputs to override (say why): the null-text workflows ship the paper's 50 steps x 10
# iterations, which on the random tiny checkpoint's 320-channel UNet would take minutes for nothing to see
_SHORT_NULLTEXT = {"DDIMInvert": {"steps": 4}, "KSamplerAdvanced": {"steps": 4}, "DDIMInvNullText": {"iterations": 2}}
STEP_OVERRIDES: dict = {"nulltext_reconstruct": _SHORT_NULLTEXT, "nulltext_edit": _SHORT_NULLTEXT,
                        "attention_edit": {"DDIMInvert": {"steps": 6}}}   # 50 steps x 3 evaluations: minutes
IMAGE_SIZE = 64


def make_image_png() -> bytes:
    """A deterministic 64x64 RGB picture (sky, sun, hill, house)."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (90, 140, 230))
    d = ImageDraw.Draw(img)
    d.ellipse((40, 5, 58, 23), fill=(250, 215, 70))
    d.ellipse((-20, 35, 85, 95), fill=(80, 180, 90))
    d.rectangle((15, 30, 35, 48), fill=(200, 60, 50))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()




def upload_image(server, name: str) -> str:
    boundary = uuid.uuid4().hex
    body = b"".join([
        f"--{boundary}\r\n".encode(),
        f'Content-Disposition: form-data; name="image"; filename="{name}"\r\n'.encode(),
        b"Content-Type: image/png\r\n\r\n", make_image_png(), b"\r\n",
        f"--{boundary}\r\n".encode(),
        b'Content-Disposition: form-data; name="overwrite"\r\n\r\ntrue\r\n',
        f"--{boundary}--\r\n".encode(),
    ])
    req = urllib.request.Request(server.url + "/upload/image", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        out = json.loads(r.read())
    assert (Path(server.input_dir) / out.get("subfolder", "") / out["name"]).is_file(), out
    return out["name"]


# loader class -> (input, tiny file name); flow_model loads the three tiny SD3 files
MODEL_FILES = {"CheckpointLoaderSimple": ("ckpt_name", checkpoint.CKPT_NAME),
               "UNETLoader": ("unet_name", tiny_flow_files.UNET_NAME),
               "CLIPLoader": ("clip_name", tiny_flow_files.CLIP_NAME),
               "VAELoader": ("vae_name", tiny_flow_files.VAE_NAME)}
EXPECTED_LOADERS = {"flow_model": {"UNETLoader", "CLIPLoader", "VAELoader"},   # others: CheckpointLoaderSimple
                    "flow_attention_edit": {"UNETLoader", "CLIPLoader", "VAELoader"}}


def load_workflow(name: str, image: str) -> dict:
    prompt = json.loads((API_DIR / f"{name}.api.json").read_text())
    changed = set()
    for node in prompt.values():
        ct, inputs = node["class_type"], node["inputs"]
        if ct in MODEL_FILES:
            key, value = MODEL_FILES[ct]
            inputs[key] = value
            changed.add(ct)
        elif ct == "LoadImage":
            inputs["image"] = image
            changed.add(ct)
        inputs.update(STEP_OVERRIDES.get(name, {}).get(ct, {}))
    expected = EXPECTED_LOADERS.get(name, {"CheckpointLoaderSimple"}) | {"LoadImage"}
    assert changed == expected, f"{name}: expected the loaders {sorted(expected)}, found {sorted(changed)}"
    return prompt


@pytest.fixture(scope="module")
def flow_files():
    """The tiny SD3 files (generated once, cached); the server's extra_model_paths lists their folders."""
    from ddiminv_dev import host
    host.boot()
    return tiny_flow_files.register_model_dirs()


def view(server, image: dict) -> bytes:
    """Fetch an output/temp image the way the UI does (GET /view)."""
    q = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                "type": image.get("type", "output")})
    with urllib.request.urlopen(f"{server.url}/view?{q}", timeout=30) as r:
        return r.read()


def _images(entry: dict, node_id: str) -> list:
    return (entry.get("outputs", {}).get(node_id) or {}).get("images") or []


@pytest.fixture(scope="module")
def uploaded(server):
    return upload_image(server, f"ddiminv_example_{uuid.uuid4().hex[:8]}.png")


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNNABLE)
def test_example_workflow_runs_on_the_server(flow_files, server, uploaded, name):
    prompt = load_workflow(name, uploaded)
    t0 = time.perf_counter()
    entry = server.run(prompt, timeout=300)
    print(f"{name}: {time.perf_counter() - t0:.1f}s on the server")
    assert entry["status"]["status_str"] == "success", entry["status"]
    for nid, node in prompt.items():
        if node["class_type"] in ("SaveImage", "DDIMInvTrajectoryPreview"):
            imgs = _images(entry, nid)
            assert imgs, f"{name}: node {nid} ({node['class_type']}) reported no images: {entry.get('outputs')}"
            for im in imgs:
                assert view(server, im)[:8] == b"\x89PNG\r\n\x1a\n", f"{name}: {im} is not a PNG"
    # attention control said what it injected, and it injected (the sampler refuses a plan of nothing and a step
    # whose planned injections did not happen; this reads the count back from what the UI shows)
    if any(n["class_type"] == "DDIMInvAttentionControl" for n in prompt.values()):
        import re
        sid = next(k for k, n in prompt.items() if n["class_type"] == "DDIMInvSampler")
        text = "\n".join((entry.get("outputs", {}).get(sid) or {}).get("text") or [])
        done = re.search(r"done: (\d+) records, (\d+) injections", text)
        assert done and int(done[1]) == int(done[2]) > 0, f"{name}: {text!r}"
        print(f"{name}: {done[0]}")
    # the pictures are meaningless on random weights; their size is not
    saved = [im for nid, n in prompt.items() if n["class_type"] == "SaveImage" for im in _images(entry, nid)]
    from PIL import Image
    with Image.open(io.BytesIO(view(server, saved[0]))) as im:
        assert im.size == (IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.slow
def test_invert_and_reconstruct_exact_round_trip_in_process():
    """The same graph (method exact, shipped steps) in process: the Inverted-Latent Sampler returns DDIM
    Invert's input latent."""
    import torch

    from ddiminv_dev import host
    host.boot()
    checkpoint.register_model_dir()
    name = "ddiminv_example_roundtrip.png"
    (host.input_dir() / name).write_bytes(make_image_png())
    prompt = load_workflow("invert_and_reconstruct", name)
    ids = {n["class_type"]: k for k, n in prompt.items()}
    assert prompt[ids["DDIMInvert"]]["inputs"]["method"] == "exact"
    assert prompt[ids["DDIMInvert"]]["inputs"]["latent"][0] == ids["DDIMInvVAEEncode"]
    res = host.run(prompt)
    x = res.outputs(ids["DDIMInvVAEEncode"])[0]["samples"].double()
    x_rec = res.outputs(ids["DDIMInvSampler"])[0]["samples"].double()
    assert x_rec.shape == x.shape
    rel = float(torch.linalg.vector_norm(x_rec - x) / torch.linalg.vector_norm(x))
    print(f"exact round trip, {prompt[ids['DDIMInvert']]['inputs']['steps']} steps: relative error {rel:.3e}")
    assert rel < 1e-4, rel
    traj = res.outputs(ids["DDIMInvert"])[2]
    assert traj.method == "exact" and traj.steps == prompt[ids["DDIMInvert"]]["inputs"]["steps"]


@pytest.mark.slow
def test_flow_model_exact_round_trip_in_process(flow_files):
    """flow_model (SD3 MMDiT, ModelSamplingSD3 shift 3, method exact, shipped steps) in process: the
    Inverted-Latent Sampler returns DDIM Invert's input latent, and the trajectory ends at sigma 1."""
    import torch

    from ddiminv_dev import host
    name = "ddiminv_example_flow_roundtrip.png"
    (host.input_dir() / name).write_bytes(make_image_png())
    prompt = load_workflow("flow_model", name)
    ids = {n["class_type"]: k for k, n in prompt.items()}
    inv = prompt[ids["DDIMInvert"]]["inputs"]
    assert inv["method"] == "exact" and inv["scheduler"] == "simple"
    assert inv["model"][0] == ids["ModelSamplingSD3"] and inv["latent"][0] == ids["DDIMInvVAEEncode"]
    t0 = time.perf_counter()
    res = host.run(prompt)
    model = res.outputs(ids["ModelSamplingSD3"])[0]
    assert type(model.model.model_config).__name__ in ("SD3", "SD35"), type(model.model.model_config)
    x = res.outputs(ids["DDIMInvVAEEncode"])[0]["samples"].double()
    assert x.shape[1] == 16, x.shape
    x_rec = res.outputs(ids["DDIMInvSampler"])[0]["samples"].double()
    assert x_rec.shape == x.shape
    rel = float(torch.linalg.vector_norm(x_rec - x) / torch.linalg.vector_norm(x))
    print(f"flow_model exact round trip, {inv['steps']} steps: relative error {rel:.3e} "
          f"({time.perf_counter() - t0:.1f}s in process)")
    assert rel < 1e-4, rel
    traj = res.outputs(ids["DDIMInvert"])[2]
    assert traj.method == "exact" and traj.steps == inv["steps"]
    assert traj.family == "flow", traj.summary()
    assert abs(float(traj.sigmas[-1]) - 1.0) < 1e-6, traj.summary()  # flow inversion ends at pure noise
    assert torch.isfinite(traj.states).all() and torch.isfinite(traj.denoised).all()


# video_two_experts in process on tiny models: node id -> (fixture class, inputs); the text encoder becomes a
# conditioning fixture (CLIPLoader type wan builds UMT5-XXL at its full size whatever the file holds), Load Video +
# Get Video Components a 9-frame clip (1 + 4k frames: the Wan VAE encodes them whole)
CLIP_FRAMES = 9
VIDEO_FIXTURES = {
    "GetVideoComponents": ("TestNoiseImage", {"width": IMAGE_SIZE, "height": IMAGE_SIZE, "batch": CLIP_FRAMES,
                                              "channels": 3, "seed": 0, "poison": "none"}),
    "High-noise expert": ("TestFamilyModel", {"name": "WAN21_T2V", "seed": 5}),
    "Low-noise expert": ("TestFamilyModel", {"name": "WAN21_T2V", "seed": 0}),
    "Source prompt": ("TestFamilyConditioning", {"name": "WAN21_T2V", "seed": 1}),
    "Negative prompt": ("TestFamilyConditioning", {"name": "WAN21_T2V", "seed": 2}),
    "VAELoader": ("TestTinyVideoVAE", {"kind": "wan21", "seed": 0}),
}


def load_video_workflow() -> dict:
    """video_two_experts with its loaders replaced by the tiny fixtures (VIDEO_FIXTURES, matched by title or
    class); Load Video and Load CLIP, which nothing reads any more, are dropped."""
    prompt = json.loads((API_DIR / "video_two_experts.api.json").read_text())
    replaced = set()
    for nid in list(prompt):
        node = prompt[nid]
        key = node["_meta"]["title"] if node["_meta"]["title"] in VIDEO_FIXTURES else node["class_type"]
        if node["class_type"] in ("LoadVideo", "CLIPLoader"):
            del prompt[nid]
        elif key in VIDEO_FIXTURES:
            ct, inputs = VIDEO_FIXTURES[key]
            prompt[nid] = {"inputs": dict(inputs), "class_type": ct, "_meta": node["_meta"]}
            replaced.add(key)
    assert replaced == set(VIDEO_FIXTURES), sorted(set(VIDEO_FIXTURES) - replaced)
    return prompt


@pytest.mark.slow
def test_video_two_experts_in_process():
    """The shipped two-expert clip workflow (exact, 20 steps, boundary 0.875, ModelSamplingSD3 shift 8 on both
    experts) on two differently seeded tiny Wan experts and the tiny Wan 2.1 VAE: the clip's latent comes back
    from the Inverted-Latent Sampler, the switch is Wan 2.2's step 11 of 20, the decoded clip has the clip's
    frame count, and the animated WEBP and the preview strips are written."""
    import torch

    from ddiminv_dev import host
    host.boot()
    prompt = load_video_workflow()
    ids = {n["class_type"]: k for k, n in prompt.items()}
    inv = prompt[ids["DDIMInvert"]]["inputs"]
    assert inv["method"] == "exact" and inv["model_high_noise"][0] != inv["model"][0]
    t0 = time.perf_counter()
    res = host.run(prompt)
    x = res.outputs(ids["DDIMInvVAEEncode"])[0]["samples"].double()
    assert x.ndim == 5 and x.shape[2] == (CLIP_FRAMES - 1) // 4 + 1, x.shape
    x_rec = res.outputs(ids["DDIMInvSampler"])[0]["samples"].double()
    rel = float(torch.linalg.vector_norm(x_rec - x) / torch.linalg.vector_norm(x))
    traj = res.outputs(ids["DDIMInvert"])[2]
    print(f"video_two_experts exact round trip, {traj.steps} steps, two experts: relative error {rel:.3e} "
          f"({time.perf_counter() - t0:.1f}s in process)")
    assert rel < 1e-5, rel
    assert traj.extra["experts"]["switch_step"] == 11, traj.extra["experts"]
    assert "end_at_step / start_at_step 11" in "\n".join(res.ui(ids["DDIMInvert"]).get("text", []))
    frames = res.outputs(ids["VAEDecode"])[0]
    assert frames.shape[0] == CLIP_FRAMES and frames.shape[1:3] == (IMAGE_SIZE, IMAGE_SIZE), frames.shape
    assert res.ui(ids["SaveAnimatedWEBP"]).get("images"), res.ui(ids["SaveAnimatedWEBP"])
    assert res.ui(ids["DDIMInvTrajectoryPreview"]).get("images")
