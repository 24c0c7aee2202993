"""Measures of the scenes model (development tooling): the VAE ceiling on held-out scenes, and how often CFG
samples show what their caption says, read with the pixel measures of :mod:`.measure` (no learned judge).

    .venv/bin/python -m ddiminv_dev.scenes.evaluate [--weights DIR] [--per-caption 2] [--cfg 5] [--steps 20]
    .venv/bin/python -m ddiminv_dev.scenes.evaluate --readers 200   # the readers on exact renders and VAE trips

Samples go through core nodes in-process (``CheckpointLoaderSimple``, ``CLIPTextEncode``, ``EmptyLatentImage``,
``KSampler`` euler/normal, ``VAEDecode``). Captions: every colour x shape pair alone (held-out pairs included,
reported apart) on a background that rotates over the five, plus two-object captions.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from . import measure as M
from . import render as R


def eval_captions(n_two: int = 6, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    pairs = R.allowed_pairs("test")
    one = [R.caption_of([p], R.BACKGROUNDS[i % len(R.BACKGROUNDS)]) for i, p in enumerate(pairs)]
    two = [R.caption_of([pairs[int(i)] for i in rng.integers(0, len(pairs), 2)],
                        R.BACKGROUNDS[int(rng.integers(0, len(R.BACKGROUNDS)))]) for _ in range(n_two)]
    return one + two


def judge(caption: str, image: np.ndarray) -> dict:
    """Per-attribute verdicts of one sample against its caption."""
    want, bg = R.parse_caption(caption)
    got, got_bg = M.read_scene(image)
    same_n = len(got) == len(want)
    return {"background": got_bg == bg, "count": same_n,
            "colour": same_n and [c for c, _ in got] == [c for c, _ in want],
            "shape": same_n and [s for _, s in got] == [s for _, s in want],
            "caption": same_n and got == want and got_bg == bg,
            "held_out": any(p in R.HELD_OUT for p in want)}


def vae_ceiling(vae, n: int = 32, seed: int = 1) -> float:
    """Mean PSNR (dB) of decode(encode(x)) against x over ``n`` held-out scenes, through ComfyUI's VAE object."""
    import torch
    ims = np.stack([R.render(R.sample_scene(seed * 100003 + i, "test")).image for i in range(n)])
    with torch.no_grad():
        y = vae.decode(vae.encode(torch.from_numpy(ims).float() / 255.0)).float().clamp(0, 1)
    y = np.round(y.reshape(ims.shape).numpy() * 255).astype(np.uint8)
    return float(np.mean([M.psnr(a, b) for a, b in zip(y, ims, strict=True)]))


def readers(vae_path=None, n: int = 200, seed: int = 3) -> dict:
    """How right the readers (:func:`judge`) are on ``n`` held-out scenes, exact and after the VAE round trip
    ``decode(encode(x))`` (the best a latent model can output): fraction right per attribute, and the round trip's
    mean PSNR. Uses the TAESD of ``vae_path`` (default: the committed scenes VAE) directly."""
    import torch
    from ddiminv_dev.learned import train as LT
    from .build import WEIGHTS
    m = LT.load_taesd(vae_path or WEIGHTS / "vae.safetensors")
    scenes = [R.sample_scene(seed * 100003 + i, "test") for i in range(n)]
    ims = np.stack([R.render(s).image for s in scenes])
    x = torch.from_numpy(ims).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        y = torch.cat([m.decode(m.encode(x[i:i + 25] * 2 - 1)) for i in range(0, n, 25)])
    trip = np.round(((y + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    out = {"n": n, "round_trip_psnr_db": float(np.mean([M.psnr(a, b) for a, b in zip(trip, ims, strict=True)]))}
    for name, pics in (("exact", ims), ("round_trip", trip)):
        v = [judge(R.caption(s), p) for s, p in zip(scenes, pics, strict=True)]
        out[name] = {k: float(np.mean([d[k] for d in v])) for k in ("background", "count", "colour", "shape",
                                                                      "caption")}
    return out


def evaluate(weights=None, per_caption: int = 2, cfg: float = 5.0, steps: int = 20, seed: int = 0) -> dict:
    from ddiminv_dev import host
    from . import build
    nodes = host.boot(cpu=True)
    path = build.register_model_dir(weights)
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(path.name)[:3]
    t0 = time.perf_counter()
    out = {"checkpoint": path.name, "weights": build.version(weights), "cfg": cfg, "steps": steps,
           "per_caption": per_caption, "vae_ceiling_db": vae_ceiling(vae)}
    neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    verdicts = []
    for i, cap in enumerate(eval_captions()):
        pos = nodes.CLIPTextEncode().encode(clip, cap)[0]
        lat = nodes.EmptyLatentImage().generate(R.SIZE, R.SIZE, per_caption)[0]
        res = nodes.KSampler().sample(model, seed + i, steps, cfg, "euler", "normal", pos, neg, lat)[0]
        ims = np.round(nodes.VAEDecode().decode(vae, res)[0].detach().float().clamp(0, 1).numpy() * 255)
        verdicts += [dict(judge(cap, im.astype(np.uint8)), text=cap) for im in ims]
    for group, sel in (("seen", [v for v in verdicts if not v["held_out"]]),
                       ("held_out", [v for v in verdicts if v["held_out"]])):
        out[group] = {k: float(np.mean([v[k] for v in sel])) for k in ("background", "count", "colour", "shape",
                                                                         "caption")} | {"n": len(sel)}
    out["seconds"] = time.perf_counter() - t0
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default=None, help="a folder of scenes weights (default: the committed ones)")
    ap.add_argument("--per-caption", type=int, default=2)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--readers", type=int, default=0, metavar="N",
                    help="instead of sampling, print how right the readers are on N held-out scenes and on their "
                         "VAE round trips")
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    if a.readers:
        from pathlib import Path
        print(json.dumps(readers(Path(a.weights) / "vae.safetensors" if a.weights else None, a.readers), indent=1))
        return 0
    print(json.dumps(evaluate(a.weights, a.per_caption, a.cfg, a.steps), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
