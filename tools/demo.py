#!/usr/bin/env python3
"""Demo: invert an image and reconstruct it with each method, through ComfyUI's real executor.

    make demo                      # built-in tiny random checkpoint (generated once, ~460 MB, cached)
    make demo CKPT=<name>          # a checkpoint from your ComfyUI checkpoints folder (SD1.5/SDXL/...)
    python tools/demo.py [--ckpt NAME] [--image PATH] [--size N] [--steps N] [--prompt TEXT] [--out DIR]

Boots ComfyUI in this process (the folder from $COMFYUI_PATH, else the one `make setup` installed), loads
the pack as ComfyUI does, and runs example_workflows/api/invert_and_reconstruct.api.json unmodified except
for the checkpoint, the input image, the prompt, the method (ddim, implicit, exact), --steps when given
and, with the tiny checkpoint only, implicit's max_iters (capped at 6: on random weights its fixed-point
solve never converges and would spend all 30 evaluations of every step).

Writes to out/ (or --out): source.png, reconstruction_<method>.png, trajectory_<method>.png (the Trajectory
Preview node's frames, source latent -> inverted noise) and metrics.json; prints a table.

Per method: the latent round-trip relative error ||x_rec - x|| / ||x|| in model space (x = the latent
DDIM Invert received, x_rec = what the Inverted-Latent Sampler returned), the PSNR of the decoded
reconstruction against the image, the VAE ceiling (PSNR of decode(encode(image)): no reconstruction can
beat it), model evaluations (NFE) and seconds (graph execution once the checkpoint is loaded and the
image encoded; those are timed separately as setup).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python tools/demo.py`: make the development package importable
    sys.path.insert(0, str(ROOT))
from ddiminv_dev import host  # noqa: E402
WORKFLOW = ROOT / "example_workflows" / "api" / "invert_and_reconstruct.api.json"
METHODS = ("ddim", "implicit", "exact")
TINY_MAX_ITERS = 6  # implicit on random weights never converges: cap its solve so the demo fits ~2 min of CPU
SYNTH_PROMPT = "a simple drawing of a red house with a green door under a yellow sun, blue sky, green hills"
TINY_NOTE = ("NOTE: the built-in tiny checkpoint has random weights, so its pictures (reconstructions, "
             "trajectory frames) are meaningless noise patterns; the latent round-trip errors, NFE and the "
             "graph mechanics are real. Use --ckpt <your SD1.5 checkpoint> for meaningful pictures.")


# ------------------------------------------------------------------ ComfyUI, in process
def boot(cpu: bool, workdir: Path):
    """Import ComfyUI and load its nodes and the custom nodes (this pack included); returns ``nodes``."""
    try:
        return host.boot(cpu=cpu, workdir=workdir, user_model_paths=True, fixtures=False)
    except host.HostError as e:
        sys.exit(str(e))


def execute(executor, prompt: dict, outputs=None) -> None:
    res = host.execute(executor, prompt, outputs, expect_success=False)
    if not res.success:
        sys.exit(f"the workflow failed: {res.error_text()}")


def output_of(executor, node_id: str, slot: int = 0):
    return host.cached_output(executor, node_id)[slot][0]


# ------------------------------------------------------------------ inputs
def synthetic_image(size: int):
    """A deterministic picture (sky, sun, hills, a house) with smooth and sharp detail."""
    from PIL import Image, ImageDraw, ImageFilter
    s = size / 256.0
    img = Image.new("RGB", (size, size))
    d = ImageDraw.Draw(img)
    for y in range(size):  # sky gradient
        t = y / size
        d.line([(0, y), (size, y)], fill=(int(70 + 90 * t), int(130 + 70 * t), int(230 - 20 * t)))
    d.ellipse([190 * s, 22 * s, 236 * s, 68 * s], fill=(250, 215, 70))
    d.ellipse([-60 * s, 150 * s, 170 * s, 330 * s], fill=(70, 165, 80))
    d.ellipse([100 * s, 170 * s, 330 * s, 330 * s], fill=(95, 190, 95))
    d.rectangle([70 * s, 120 * s, 150 * s, 190 * s], fill=(200, 60, 50))
    d.polygon([(60 * s, 122 * s), (110 * s, 80 * s), (160 * s, 122 * s)], fill=(120, 60, 40))
    d.rectangle([98 * s, 150 * s, 120 * s, 190 * s], fill=(40, 110, 60))
    d.rectangle([80 * s, 132 * s, 94 * s, 146 * s], fill=(230, 240, 255))
    for i in range(0, size, max(1, int(9 * s))):  # grass texture (high frequencies)
        d.line([(i, size - 1), (i + 3 * s, size - 12 * s)], fill=(50, 130, 60), width=max(1, int(s)))
    return img.filter(ImageFilter.GaussianBlur(0.6 * s))


def load_image(path: str | None, size: int | None):
    from PIL import Image, ImageOps
    if path is None:
        return synthetic_image(size or 256)
    img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    if size:  # centre square crop at this size
        img = ImageOps.fit(img, (size, size), Image.Resampling.LANCZOS)
    return img


# ------------------------------------------------------------------ metrics
def psnr(a, b) -> float:
    h, w = min(a.shape[1], b.shape[1]), min(a.shape[2], b.shape[2])
    mse = float(((a[:, :h, :w].double() - b[:, :h, :w].double()) ** 2).mean())
    return 100.0 if mse <= 1e-10 else -10.0 * math.log10(mse)


def to_pil(images, index: int = 0):
    from PIL import Image
    arr = (images[index].float().clamp(0, 1).cpu().numpy() * 255.0).round().astype("uint8")
    return Image.fromarray(arr)


def strip(images, min_height: int = 128):
    """Frames [K,h,w,3] side by side (nearest-upscaled to at least min_height), 4 px gaps."""
    from PIL import Image
    frames = [to_pil(images, k) for k in range(images.shape[0])]
    scale = max(1, math.ceil(min_height / frames[0].height))
    frames = [f.resize((f.width * scale, f.height * scale), Image.Resampling.NEAREST) for f in frames]
    gap = 4
    out = Image.new("RGB", (sum(f.width for f in frames) + gap * (len(frames) - 1), frames[0].height), "white")
    x = 0
    for f in frames:
        out.paste(f, (x, 0))
        x += f.width + gap
    return out


_CALLS = [0]


def _counting_wrapper(apply_model, args):
    """model_function_wrapper that counts diffusion-model calls (a batched cond+uncond call counts once)."""
    _CALLS[0] += 1
    return apply_model(args["input"], args["timestep"], **args["c"])


# ------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="checkpoint name in your ComfyUI checkpoints folder (default: the built-in "
                                   "tiny random SD1.5-format checkpoint)")
    ap.add_argument("--image", help="source image (default: a generated 256x256 drawing)")
    ap.add_argument("--size", type=int, help="centre-crop the image to a square of this size (default: the "
                                             "synthetic image is 256; your --image is used as is)")
    ap.add_argument("--steps", type=int, help="inversion/sampling steps (default: the workflow's)")
    ap.add_argument("--max-iters", type=int, help=f"implicit: most evaluations per step (default: the workflow's; "
                                                  f"{TINY_MAX_ITERS} with the tiny checkpoint, whose random weights "
                                                  "never let the solve converge)")
    ap.add_argument("--prompt", help="source prompt (default: the workflow's for --image, else one describing "
                                     "the synthetic picture)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--out", default=str(ROOT / "out"), help="output folder (default: out/)")
    ap.add_argument("--cpu", action="store_true", help="force CPU (the tiny checkpoint always runs on CPU)")
    a = ap.parse_args(argv)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; use {','.join(METHODS)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tiny = a.ckpt is None

    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="ddiminv-demo-"))
    boot(cpu=a.cpu or tiny, workdir=work)
    import folder_paths
    if tiny:
        from ddiminv_dev import tiny_checkpoint
        if not tiny_checkpoint.is_built():
            print("generating the tiny random checkpoint (once; cached in .cache/models/checkpoints) ...", flush=True)
        tiny_checkpoint.register_model_dir()
        ckpt = tiny_checkpoint.CKPT_NAME
    else:
        ckpt = a.ckpt
        if ckpt not in folder_paths.get_filename_list("checkpoints"):
            have = folder_paths.get_filename_list("checkpoints")
            sys.exit(f"checkpoint {ckpt!r} is not in your ComfyUI checkpoints folders "
                     f"{folder_paths.get_folder_paths('checkpoints')}; found: {have[:20]}")
    t_boot = time.perf_counter() - t_start

    img = load_image(a.image, a.size)
    img.save(out / "source.png")
    img.save(work / "input" / "ddiminv_demo.png")

    base = json.loads(WORKFLOW.read_text())
    ids = {n["class_type"]: k for k, n in base.items()}
    need = ("LoadImage", "CheckpointLoaderSimple", "DDIMInvVAEEncode", "DDIMInvert", "DDIMInvSampler",
            "VAEDecode", "DDIMInvTrajectoryPreview")
    missing = [c for c in need if c not in ids]
    if missing:
        sys.exit(f"{WORKFLOW} lacks {missing}")
    base[ids["LoadImage"]]["inputs"]["image"] = "ddiminv_demo.png"
    base[ids["CheckpointLoaderSimple"]]["inputs"]["ckpt_name"] = ckpt
    inv = base[ids["DDIMInvert"]]["inputs"]
    if a.steps:
        inv["steps"] = int(a.steps)
    max_iters = a.max_iters or (TINY_MAX_ITERS if tiny else None)
    if max_iters:
        inv["max_iters"] = int(max_iters)
    prompt_text = a.prompt or (SYNTH_PROMPT if a.image is None else None)
    if prompt_text is not None:
        base[inv["positive"][0]]["inputs"]["text"] = prompt_text

    import torch
    executor = host.new_executor()
    # setup: load the checkpoint, encode the image (cached for every method below)
    t0 = time.perf_counter()
    first = json.loads(json.dumps(base))
    first[ids["DDIMInvert"]]["inputs"]["method"] = methods[0]
    execute(executor, first, [ids["DDIMInvVAEEncode"]])
    t_setup = time.perf_counter() - t0
    model = output_of(executor, ids["CheckpointLoaderSimple"], 0)
    model.set_model_unet_function_wrapper(_counting_wrapper)  # the cached MODEL: every node below uses it
    latent_fmt = model.model.latent_format
    source_latent = output_of(executor, ids["DDIMInvVAEEncode"], 0)["samples"]
    ceiling = float(output_of(executor, ids["DDIMInvVAEEncode"], 1))
    source_pixels = output_of(executor, ids["LoadImage"], 0)
    x = latent_fmt.process_in(source_latent.double())

    results = {}
    for m in methods:
        p = json.loads(json.dumps(base))
        p[ids["DDIMInvert"]]["inputs"]["method"] = m
        _CALLS[0] = 0
        t0 = time.perf_counter()
        execute(executor, p)
        secs = time.perf_counter() - t0
        traj = output_of(executor, ids["DDIMInvert"], 2)
        rec_latent = output_of(executor, ids["DDIMInvSampler"], 0)["samples"]
        x_rec = latent_fmt.process_in(rec_latent.double())
        rel = float(torch.linalg.vector_norm(x_rec - x) / torch.linalg.vector_norm(x))
        rec_img = output_of(executor, ids["VAEDecode"], 0)
        to_pil(rec_img).save(out / f"reconstruction_{m}.png")
        strip(output_of(executor, ids["DDIMInvTrajectoryPreview"], 0)).save(out / f"trajectory_{m}.png")
        counted = _CALLS[0]
        results[m] = {
            "latent_rel_error": rel,
            "psnr_db": psnr(rec_img, source_pixels),
            "vae_ceiling_psnr_db": ceiling,
            "nfe_invert": int(traj.nfe),
            "nfe_sample": (counted - int(traj.nfe)) if counted else None,
            "seconds": secs,
        }
        print(f"  {m}: done in {secs:.1f}s", flush=True)

    inv = p[ids["DDIMInvert"]]["inputs"]
    metrics = {
        "checkpoint": ckpt,
        "tiny_random_checkpoint": tiny,
        "image": {"path": a.image or "(synthetic)", "width": img.width, "height": img.height},
        "prompt": p[inv["positive"][0]]["inputs"]["text"],
        "workflow": str(WORKFLOW.relative_to(ROOT)),
        "steps": inv["steps"], "cfg": inv["cfg"], "scheduler": inv["scheduler"],
        "implicit_max_iters": inv["max_iters"], "implicit_tolerance": inv["tolerance"],
        "device": str(model.load_device),
        "boot_seconds": t_boot, "setup_seconds": t_setup,
        "methods": results,
        "note": TINY_NOTE if tiny else "",
        "definitions": {
            "latent_rel_error": "||x_rec - x|| / ||x|| in model space; x = DDIM Invert's input latent, "
                                "x_rec = Inverted-Latent Sampler's output",
            "psnr_db": "PSNR (data range 1) of VAE Decode(x_rec) vs the source image",
            "vae_ceiling_psnr_db": "PSNR of decode(encode(image)) vs the image (VAE Encode (Inversion))",
            "nfe_invert": "model evaluations while inverting (DDIM Invert's trajectory)",
            "nfe_sample": "diffusion-model calls while regenerating (counted)",
            "seconds": "graph execution for this method (invert, sample, decode, save, preview); the "
                       "checkpoint load and the encode are setup_seconds",
        },
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    print()
    print(f"checkpoint {ckpt}  image {img.width}x{img.height}  steps {inv['steps']}  cfg {inv['cfg']}  "
          f"scheduler {inv['scheduler']}  implicit max_iters {inv['max_iters']}  device {model.load_device}")
    print(f"{'method':<9} {'latent rel err':>14} {'PSNR dB':>8} {'VAE ceiling':>11} {'NFE inv+samp':>13} {'seconds':>8}")
    for m, r in results.items():
        nfe = f"{r['nfe_invert']}+{r['nfe_sample'] if r['nfe_sample'] is not None else '?'}"
        print(f"{m:<9} {r['latent_rel_error']:>14.3e} {r['psnr_db']:>8.2f} {r['vae_ceiling_psnr_db']:>11.2f} "
              f"{nfe:>13} {r['seconds']:>8.1f}")
    print(f"(setup: boot {t_boot:.1f}s, checkpoint load + encode {t_setup:.1f}s; total "
          f"{time.perf_counter() - t_start:.1f}s)")
    if tiny:
        print()
        print(TINY_NOTE)
    print(f"wrote {out}/: source.png, reconstruction_<method>.png, trajectory_<method>.png, metrics.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
