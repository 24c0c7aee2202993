#!/usr/bin/env python3
"""The Comfy Registry icon (docs/icon.png, 400x400): noise turning back into a picture along a DDIM trajectory.
Deterministic: `.venv/bin/python tools/make_icon.py [OUT.png]` rewrites the same bytes."""
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

S = 400
rng = np.random.default_rng(23)
y, x = np.mgrid[0:S, 0:S] / S
# the "image": a soft sun over hills, the pack's example-workflow palette
img = np.zeros((S, S, 3))
img[...] = np.stack([0.55 + 0.3 * y, 0.75 + 0.1 * y, 0.95 - 0.2 * y], -1)       # sky
hill = y > 0.62 + 0.08 * np.sin(6.0 * x)
img[hill] = np.array([0.35, 0.65, 0.3]) * (1.1 - 0.4 * y[hill, None])
sun = (x - 0.7) ** 2 + (y - 0.3) ** 2 < 0.012
img[sun] = [1.0, 0.85, 0.3]
noise = np.kron(rng.standard_normal((S // 5, S // 5, 3)) * 0.28 + 0.5, np.ones((5, 5, 1)))  # 5-px grains
# the trajectory: left noise -> right picture, blended along a diagonal ramp
t = np.clip((x + 0.35 * (1 - y) - 0.25) / 0.6, 0, 1)[..., None]
t = t * t * (3 - 2 * t)
mix = (1 - t) * noise + t * img
im = Image.fromarray((np.clip(mix, 0, 1) * 255).astype(np.uint8))
d = ImageDraw.Draw(im)
pts = [(40 + 320 * s, 330 - 250 * s + 60 * np.sin(np.pi * s)) for s in np.linspace(0, 1, 9)]
d.line(pts, fill=(255, 255, 255), width=10, joint="curve")
for px, py in pts[::2]:
    d.ellipse([px - 12, py - 12, px + 12, py + 12], fill=(255, 255, 255), outline=(30, 30, 60), width=4)
# rounded-corner mask
mask = Image.new("L", (S, S), 0)
ImageDraw.Draw(mask).rounded_rectangle([0, 0, S - 1, S - 1], radius=60, fill=255)
out = Image.new("RGBA", (S, S))
out.paste(im, (0, 0), mask)
out.save(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "docs" / "icon.png",
         optimize=True)
