#!/usr/bin/env python3
"""Render the template-browser thumbnail of each example workflow: example_workflows/<name>.jpg.

The picture is the workflow's own graph (nodes at their saved positions, titled, links coloured by type),
drawn with Pillow from the UI JSON, so it is honest for every workflow (with the tiny random models the
outputs themselves would be noise) and stays in sync: rerun after editing a workflow.

    python tools/workflow_thumbnails.py [names...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
WF_DIR = ROOT / "example_workflows"
W, H = 512, 288
LINK_COLORS = {"MODEL": (180, 160, 255), "CLIP": (255, 210, 80), "VAE": (255, 110, 110),
               "CONDITIONING": (255, 170, 60), "LATENT": (255, 150, 220), "IMAGE": (100, 200, 255),
               "NOISE": (190, 190, 190), "DDIM_TRAJECTORY": (120, 230, 160), "SIGMAS": (200, 255, 200),
               "GUIDER": (100, 220, 220), "SAMPLER": (230, 230, 140), "DDIM_ATTENTION_CONTROL": (150, 230, 255)}
OURS = {"DDIMInvert": "DDIM Invert", "DDIMInvSampler": "Inverted-Latent Sampler",
        "DDIMInvVAEEncode": "VAE Encode (Inversion)", "DDIMInvTrajectoryPreview": "Trajectory Preview",
        "DDIMInvNullText": "Null-Text Inversion", "DDIMInvAttentionControl": "Attention Control",
        "DDIMInvAttentionPrompts": "Attention Prompts"}


def render(name: str) -> Path:
    ui = json.loads((WF_DIR / f"{name}.json").read_text())
    nodes = {n["id"]: n for n in ui["nodes"]}
    x0 = min(n["pos"][0] for n in nodes.values())
    y0 = min(n["pos"][1] for n in nodes.values())
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes.values())
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes.values())
    pad, top = 12, 34
    s = min((W - 2 * pad) / (x1 - x0), (H - top - pad) / (y1 - y0))

    def xy(x, y):
        return pad + (x - x0) * s, top + (y - y0) * s

    img = Image.new("RGB", (W, H), (32, 33, 38))
    d = ImageDraw.Draw(img)
    title_font = ImageFont.load_default(size=17)
    font = ImageFont.load_default(size=10)
    d.text((pad, 8), name.replace("_", " "), fill=(235, 235, 235), font=title_font)
    for _lid, src, src_slot, dst, dst_slot, ltype in ui["links"]:
        a, b = nodes[src], nodes[dst]
        p = xy(a["pos"][0] + a["size"][0], a["pos"][1] + 30 + 20 * src_slot)
        q = xy(b["pos"][0], b["pos"][1] + 30 + 20 * dst_slot)
        mx = (p[0] + q[0]) / 2
        d.line([p, (mx, p[1]), (mx, q[1]), q], fill=LINK_COLORS.get(ltype, (200, 200, 200)), width=2)
    for n in nodes.values():
        (ax, ay), (bx, by) = xy(*n["pos"]), xy(n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
        if n["type"] in ("Note", "MarkdownNote"):
            fill, head = (85, 68, 51), (102, 85, 51)
        elif n["type"] in OURS:
            fill, head = (40, 70, 60), (50, 120, 95)
        else:
            fill, head = (53, 53, 60), (75, 75, 85)
        d.rounded_rectangle([ax, ay, bx, by], radius=4, fill=fill, outline=(20, 20, 20))
        d.rounded_rectangle([ax, ay, bx, ay + 14], radius=4, fill=head)
        label = n.get("title") or OURS.get(n["type"], n["type"])
        while label and d.textlength(label, font=font) > bx - ax - 6:
            label = label[:-1]
        d.text((ax + 3, ay + 2), label, fill=(240, 240, 240), font=font)
    out = WF_DIR / f"{name}.jpg"
    img.save(out, "JPEG", quality=85, optimize=True)
    return out


def main(argv: list) -> int:
    names = argv or sorted(p.stem for p in WF_DIR.glob("*.json"))
    for name in names:
        out = render(name)
        print(f"{out.relative_to(ROOT)}: {out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
