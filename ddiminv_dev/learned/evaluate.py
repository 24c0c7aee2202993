"""Measure the learned checkpoint through real ComfyUI and write ``RESULTS.md``.

    .venv/bin/python -m ddiminv_dev.learned.evaluate [--per-caption 8] [--cfg 5] [--steps 20] [--write]

* VAE ceiling: PSNR of ``decode(encode(x))`` against ``x`` on 64x64 held-out crops, through ``comfy.sd.VAE``
  loaded from the assembled checkpoint (also the raw latent std, which should be ~1/0.18215 = 5.49);
* the classifier's own accuracy (held-out crops of another seed; training-region crops it never saw);
* conditional samples: for every caption one ComfyUI graph (CheckpointLoaderSimple -> CLIPTextEncode(caption),
  CLIPTextEncode("") -> EmptyLatentImage 64x64 batch N -> KSampler -> VAEDecode), classified by the classifier;
  the accuracy is the fraction classified as their caption's photograph.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import data

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
VAE_PER_CLASS = 8
VAE_SEED = 303


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = (a.float() - b.float()).square().flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def load_vae(ckpt_path):
    from ddiminv_dev.host import import_comfy
    import_comfy()
    import comfy.sd
    return comfy.sd.load_checkpoint_guess_config(str(ckpt_path), output_vae=True, output_clip=False,
                                                 output_model=False)[2]


@torch.no_grad()
def vae_ceiling(vae, per_class: int = VAE_PER_CLASS, seed: int = VAE_SEED) -> dict:
    """Mean per-crop PSNR (dB) of the ComfyUI VAE round trip on held-out 64x64 crops, and latent statistics."""
    x, _ = data.heldout_crops(per_class, seed)
    img = x.permute(0, 2, 3, 1).contiguous()  # ComfyUI IMAGE layout
    lat = vae.encode(img)
    out = vae.decode(lat).reshape(img.shape)
    p = psnr(out.clamp(0, 1), img)
    return {"psnr_db": float(p.mean()), "psnr_min_db": float(p.min()), "latent_std": float(lat.std()),
            "latent_mean": float(lat.mean()), "n": len(x)}


def _graph(ckpt_name: str, caption: str, n: int, seed: int, cfg: float, steps: int, sampler: str,
           scheduler: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": caption}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": n}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }


def conditional_samples(per_caption: int = 8, cfg: float = 5.0, steps: int = 20, sampler: str = "euler",
                        scheduler: str = "normal", seed: int = 1000, captions=None) -> dict:
    """Sample ``per_caption`` images per caption through a real ComfyUI graph; classify them."""
    from ddiminv_dev import host

    from . import build, classifier
    host.boot()
    name = build.register_model_dir().name
    captions = list(captions or data.CAPTIONS)
    ex = host.new_executor()
    images, want, per = [], [], {}
    for i, cap in enumerate(captions):
        res = host.run(_graph(name, cap, per_caption, seed + i, cfg, steps, sampler, scheduler), executor=ex)
        img = res.outputs("6")[0].permute(0, 3, 1, 2).float()
        pred = classifier.predict(img)
        k = data.caption_index(cap)
        per[cap] = float((pred == k).mean())
        images.append(img)
        want += [k] * len(img)
    pred = classifier.predict(torch.cat(images))
    return {"accuracy": float((pred == np.array(want)).mean()), "per_caption": per, "images": torch.cat(images)}


def save_grid(images: torch.Tensor, path, per_row: int = 8) -> None:
    from PIL import Image
    n, _, h, w = images.shape
    rows = (n + per_row - 1) // per_row
    grid = torch.zeros(3, rows * h, per_row * w)
    for i in range(n):
        r, c = divmod(i, per_row)
        grid[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = images[i]
    arr = (grid.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(path)


def _meta(path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-caption", type=int, default=8)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--scheduler", default="normal")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--grid", default=None, help="write the samples as a PNG grid here (one row per caption)")
    ap.add_argument("--write", action="store_true", help=f"write {RESULTS.name}")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    from . import build, classifier
    t0 = time.perf_counter()
    ckpt = build.checkpoint_path()
    vae = vae_ceiling(load_vae(ckpt))
    acc_h, acc_t = classifier.heldout_accuracy(), classifier.train_region_accuracy()
    s = conditional_samples(args.per_caption, args.cfg, args.steps, args.sampler, args.scheduler, args.seed)
    if args.grid:
        save_grid(s["images"], args.grid, per_row=args.per_caption)
    wall = time.perf_counter() - t0
    vae_path, unet_path = build.weight_paths()
    mv, mu = _meta(vae_path), _meta(unet_path)
    nbytes = vae_path.stat().st_size + unet_path.stat().st_size
    cmd = "python -m ddiminv_dev.learned.evaluate " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    rows = [
        ("VAE ceiling PSNR, decode(encode(x)), held-out 64x64 crops", f"{vae['psnr_db']:.2f} dB "
         f"(min {vae['psnr_min_db']:.2f}, n={vae['n']})", ">= 24 dB"),
        ("raw VAE latent std / mean (SD1.5 scale: 5.49 / 0)", f"{vae['latent_std']:.2f} / {vae['latent_mean']:.2f}",
         "~5.5"),
        ("classifier accuracy, held-out crops (other seed)", f"{acc_h:.3f}", ""),
        ("classifier accuracy, training-region crops (unseen by it)", f"{acc_t:.3f}", ""),
        (f"conditional samples classified as their caption (CFG {args.cfg:g}, {args.sampler}/{args.scheduler} "
         f"{args.steps} steps, {args.per_caption}/caption)", f"{s['accuracy']:.3f}", ">= 0.80"),
        ("committed weights (fp16)", f"{nbytes:,} bytes", "<= 8 MB"),
    ]
    table = ["| measure | value | aim |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    per = ["| caption | accuracy |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in s["per_caption"].items()]
    text = "\n".join(table) + "\n\nPer caption:\n\n" + "\n".join(per)
    print(text)
    print(f"\nevaluated in {wall:.0f}s")
    if args.write:
        RESULTS.write_text(
            "# Learned tiny SD1.5 checkpoint: measured results\n\n"
            f"Command: `{cmd.strip()}` (ComfyUI on CPU, {platform.machine()}, torch {torch.__version__}); "
            f"evaluation took {wall:.0f}s.\n\n"
            f"Weights: VAE {mv.get('iterations')} iterations (seed {mv.get('seed')}, trained in "
            f"{mv.get('wall_s', '?')}s), UNet {mu.get('iterations')} iterations (seed {mu.get('seed')}, rank "
            f"{mu.get('rank')}, trained in {mu.get('wall_s', '?')}s, 2 CPU threads); train them with "
            "`python tools/train_learned.py` (see `ddiminv_dev/learned/__init__.py`).\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
