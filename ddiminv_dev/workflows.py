"""Build a UI-format workflow (what the frontend saves and the template browser lists) from an API prompt.

The API twin is the source of truth for the graph (nodes, links, widget values, titles); the node
definitions of the booted host give socket order and types, widget order and defaults; a small layout
(positions and sizes) and optional Notes make it readable. ``tests/test_workflows.py`` checks every pair
independently of this builder.

    .venv/bin/python -m ddiminv_dev.workflows nulltext_reconstruct   # api/<name>.api.json -> <name>.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .paths import ROOT

WF_DIR = ROOT / "example_workflows"
API_DIR = WF_DIR / "api"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

# what the frontend's missing-models dialog offers to download (node.properties.models)
MODEL_SOURCES = {
    "v1-5-pruned-emaonly-fp16.safetensors": (
        "checkpoints",
        "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
        "v1-5-pruned-emaonly-fp16.safetensors"),
    "sd3.5_medium.safetensors": (
        "diffusion_models",
        "https://huggingface.co/stabilityai/stable-diffusion-3.5-medium/resolve/main/sd3.5_medium.safetensors"),
    "clip_l.safetensors": (
        "text_encoders",
        "https://huggingface.co/Comfy-Org/stable-diffusion-3.5-fp8/resolve/main/text_encoders/clip_l.safetensors"),
    "sd3.5_vae.safetensors": (
        "vae",
        "https://huggingface.co/stabilityai/stable-diffusion-3.5-medium/resolve/main/vae/diffusion_pytorch_model.safetensors"),
    # Wan 2.2 A14B (video_two_experts): ComfyUI's repackaged files
    "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors": (
        "diffusion_models",
        "https://huggingface.co/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/diffusion_models/"
        "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"),
    "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors": (
        "diffusion_models",
        "https://huggingface.co/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/diffusion_models/"
        "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"),
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors": (
        "text_encoders",
        "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/text_encoders/"
        "umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
    "wan_2.1_vae.safetensors": (
        "vae",
        "https://huggingface.co/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files/vae/"
        "wan_2.1_vae.safetensors"),
}
FILE_WIDGETS = ("ckpt_name", "unet_name", "clip_name", "vae_name")


def _spec(cls) -> list:
    """[(name, type, options, required)] in the node's input order (required first, then optional)."""
    it = cls.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, spec in (it.get(section) or {}).items():
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            out.append((name, spec[0], opts, section == "required"))
    return out


def _is_widget(t, opts) -> bool:
    if opts.get("forceInput") or opts.get("rawLink"):
        return False
    return isinstance(t, list) or (isinstance(t, str) and t in WIDGET_TYPES)


def _default(t, opts):
    if "default" in opts:
        return opts["default"]
    if isinstance(t, list):
        return t[0]
    if t == "COMBO":
        return (opts.get("options") or [None])[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(t)


def build_ui(api: dict, layout: dict, nodes_module, notes: list | None = None) -> dict:
    """``layout``: node id -> (x, y, w, h); ``notes``: [(text, (x, y, w, h))] of frontend-only Note nodes.
    Widgets the API prompt leaves out are added to ``api`` with their defaults (both twins list them)."""
    classes = nodes_module.NODE_CLASS_MAPPINGS
    display = nodes_module.NODE_DISPLAY_NAME_MAPPINGS
    ids = sorted(api, key=int)
    links, ui_nodes = [], {}
    out_links: dict = {}
    for nid in ids:
        node = api[nid]
        cls = classes[node["class_type"]]
        inputs, widgets = [], []
        for name, t, opts, req in _spec(cls):
            v = node["inputs"].get(name)
            if _is_widget(t, opts):
                if name not in node["inputs"]:  # the API twin lists every widget, as the frontend exports it
                    node["inputs"][name] = _default(t, opts)
                widgets.append(node["inputs"][name])
                if opts.get("control_after_generate"):
                    widgets.append("fixed")
                if opts.get("image_upload") or opts.get("video_upload"):
                    widgets.append("image")   # the frontend's upload button (its value is "image" for both)
                continue
            entry = {"name": name, "type": str(t), "link": None}
            if not req:
                entry["shape"] = 7
            if isinstance(v, list):
                lid = len(links) + 1
                src, slot = str(v[0]), int(v[1])
                links.append([lid, int(src), slot, int(nid), len(inputs), str(t)])
                out_links.setdefault((src, slot), []).append(lid)
                entry["link"] = lid
            elif req:
                raise ValueError(f"node {nid} ({node['class_type']}) lacks its required input {name}")
            inputs.append(entry)
        x, y, w, h = layout[nid]
        n = {"id": int(nid), "type": node["class_type"], "pos": [x, y], "size": [w, h], "flags": {}, "order": 0,
             "mode": 0, "inputs": inputs, "outputs": [], "properties": {"Node name for S&R": node["class_type"]},
             "widgets_values": widgets}
        title = node.get("_meta", {}).get("title")
        if title and title != display.get(node["class_type"], node["class_type"]):
            n["title"] = title
        models = [{"name": v, "url": MODEL_SOURCES[v][1], "directory": MODEL_SOURCES[v][0]}
                  for k, v in node["inputs"].items() if k in FILE_WIDGETS and v in MODEL_SOURCES]
        if models:
            n["properties"]["models"] = models
        ui_nodes[nid] = (n, cls)
    for nid, (n, cls) in ui_nodes.items():
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        n["outputs"] = [{"name": str(names[k]), "type": str(t), "links": out_links.get((nid, k)) or None,
                         "slot_index": k} for k, t in enumerate(cls.RETURN_TYPES)]
    # execution order: a topological order (Kahn, smallest id first)
    deps = {nid: {str(lk[1]) for lk in links if str(lk[3]) == nid} for nid in ids}
    order, done = [], set()
    while len(order) < len(ids):
        nxt = min((nid for nid in ids if nid not in done and deps[nid] <= done), key=int)
        order.append(nxt)
        done.add(nxt)
    extra_nodes = []
    next_id = max(int(i) for i in ids) + 1
    for k, (text, (x, y, w, h)) in enumerate(notes or []):
        extra_nodes.append({"id": next_id + k, "type": "Note", "pos": [x, y], "size": [w, h], "flags": {},
                            "order": k, "mode": 0, "inputs": [], "outputs": [], "properties": {},
                            "widgets_values": [text], "color": "#432", "bgcolor": "#653"})
    for k, nid in enumerate(order):
        ui_nodes[nid][0]["order"] = len(extra_nodes) + k
    all_nodes = [ui_nodes[nid][0] for nid in ids] + extra_nodes
    return {"last_node_id": max(n["id"] for n in all_nodes), "last_link_id": len(links), "nodes": all_nodes,
            "links": links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
            "version": 0.4}


def write(name: str, layout: dict, notes: list | None = None) -> Path:
    from . import host
    nodes = host.boot(fixtures=False)
    api = json.loads((API_DIR / f"{name}.api.json").read_text())
    ui = build_ui(api, layout, nodes, notes)
    (API_DIR / f"{name}.api.json").write_text(json.dumps(api, indent=2) + "\n")
    path = WF_DIR / f"{name}.json"
    path.write_text(json.dumps(ui, indent=2) + "\n")
    return path


if __name__ == "__main__":  # pragma: no cover - a maintenance entry point
    from .workflow_layouts import LAYOUTS
    for wf_name in sys.argv[1:]:
        layout, notes = LAYOUTS[wf_name]
        print(write(wf_name, layout, notes))
