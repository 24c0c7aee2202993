"""Which scenes world can a latent model show? The readers on VAE round trips of held-out scenes, per world variant.

    .venv/bin/python bench/scenes_worlds.py [--n 100] [--vae PATH]

Each variant re-renders the same seeded held-out scenes with another picture side, texture crop (a smaller crop
resized to the picture is a lower-frequency texture), texture contrast floor or object size, sends them through the
scenes TAESD (``decode(encode(x))``, the best a latent model can output) and reads them with ``evaluate.judge``. The
variants are set on the render module for the run (development bench, not the pack); the last row is the committed
world. Issue 31's table in bench/RESULTS.md came from this.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ddiminv_dev.scenes import evaluate as E  # noqa: E402
from ddiminv_dev.scenes import measure as M  # noqa: E402
from ddiminv_dev.scenes import render as R  # noqa: E402

# label: (picture side, texture crop px, texture contrast floor, (min half, max half) at REF)
VARIANTS = {
    "64, VERSION 1": (64, 64, 0.25, (8, 14)),
    "64, textures 2x lower frequency": (64, 32, 0.25, (8, 14)),
    "64, lower-contrast textures, objects 10-15": (64, 32, 0.55, (10, 15)),
    "96, objects scaled": (96, 64, 0.25, (8, 14)),
    "128, VERSION 2 (committed)": (128, 64, 0.25, (8, 14)),
}


def _background(crop: int, floor: float, original):
    @functools.lru_cache(maxsize=None)
    def texture(word):
        import skimage.data
        import skimage.transform
        name, tint = R.TEXTURES[word]
        g = np.asarray(getattr(skimage.data, name)(), dtype=np.float32) / 255.0
        g = skimage.transform.resize(g, (R.TEXTURE_SIDE, R.TEXTURE_SIDE), anti_aliasing=True, preserve_range=True)
        g = floor + (1 - floor) * (g - g.min()) / max(float(g.max() - g.min()), 1e-6)
        return (g[..., None] * np.asarray(tint, np.float32)[None, None] * 255.0).astype(np.float32)

    def background(scene):
        import skimage.transform
        if scene.background not in R.TEXTURES:
            return original(scene)
        t = texture(scene.background)
        x, y = min(scene.bg_x, R.TEXTURE_SIDE - crop), min(scene.bg_y, R.TEXTURE_SIDE - crop)
        c = skimage.transform.resize(t[y:y + crop, x:x + crop], (scene.size, scene.size), order=1, preserve_range=True)
        return np.clip(np.round(c), 0, 255).astype(np.uint8)
    return background


def measure(vae, n: int, side: int, crop: int, floor: float, halves) -> dict:
    import torch
    original, saved = R.background, (R.MIN_HALF, R.MAX_HALF)
    R.background, (R.MIN_HALF, R.MAX_HALF) = _background(crop, floor, original), halves
    M._bg_refs.cache_clear()
    try:
        scenes = [R.sample_scene(900000 + i, "test", size=side) for i in range(n)]
        ims = np.stack([R.render(s).image for s in scenes])
        x = torch.from_numpy(ims).permute(0, 3, 1, 2).float() / 255.0
        with torch.no_grad():
            y = torch.cat([vae.decode(vae.encode(x[i:i + 25] * 2 - 1)) for i in range(0, n, 25)])
        trip = np.round(((y + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
        v = [E.judge(R.caption(s), p) for s, p in zip(scenes, trip, strict=True)]
        out = {k: float(np.mean([d[k] for d in v])) for k in ("background", "count", "colour", "shape", "caption")}
        out["psnr_db"] = float(np.mean([M.psnr(a, b) for a, b in zip(trip, ims, strict=True)]))
        return out
    finally:
        R.background, (R.MIN_HALF, R.MAX_HALF) = original, saved
        M._bg_refs.cache_clear()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="held-out scenes per variant")
    ap.add_argument("--vae", type=Path, default=None, help="a scenes vae.safetensors (default: the committed one)")
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    from ddiminv_dev.host import import_comfy
    from ddiminv_dev.learned import train as LT
    from ddiminv_dev.scenes.build import WEIGHTS
    import_comfy()
    vae = LT.load_taesd(a.vae or WEIGHTS / "vae.safetensors")
    print("| world | background | count | colour | shape | whole caption | round-trip PSNR |")
    print("|---|---|---|---|---|---|---|")
    for label, (side, crop, floor, halves) in VARIANTS.items():
        r = measure(vae, a.n, side, crop, floor, halves)
        print(f"| {label} | " + " | ".join(f"{100 * r[k]:.1f}%" for k in ("background", "count", "colour", "shape",
                                                                          "caption")) + f" | {r['psnr_db']:.1f} dB |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
