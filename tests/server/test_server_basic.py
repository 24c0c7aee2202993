"""A real ComfyUI server loads the pack (schema over /object_info) and runs a core-only prompt."""
from __future__ import annotations

from pathlib import Path

from ddiminv_dev import tiny_checkpoint as checkpoint
from ddiminv_dev.host import PACK_NODES       # the pack's nodes (one list for the host and the server tiers)

CATEGORY = "sampling/ddim_inversion"


def _inputs(info: dict):
    for section in ("required", "optional"):
        for name, spec in (info.get("input", {}).get(section) or {}).items():
            yield section, name, spec


def test_object_info_lists_pack_nodes_with_docs(server):
    info = server.object_info()
    missing = [n for n in PACK_NODES if n not in info]
    assert not missing, f"not registered by the server: {missing}\n{server.log_tail(40)}"
    # and no pack node is left out of the list (every node in the pack's category is one of them)
    assert sorted(n for n, v in info.items() if v.get("category") == CATEGORY) == sorted(PACK_NODES)
    problems = []
    for n in PACK_NODES:
        node = info[n]
        if not (node.get("description") or "").strip():
            problems.append(f"{n}: no description")
        for section, name, spec in _inputs(node):
            opts = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
            if not (opts.get("tooltip") or "").strip():
                problems.append(f"{n}.{section}.{name}: no tooltip")
    assert not problems, "\n".join(problems)


def test_object_info_single_node_and_tiny_checkpoint_listed(server):
    one = server.object_info("CheckpointLoaderSimple")
    names = one["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert checkpoint.CKPT_NAME in names, names


def test_core_prompt_saves_an_image(server):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint.CKPT_NAME}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a tiny red fox"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 7, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "ddiminv_server_basic"}},
    }
    entry = server.run(prompt, timeout=180)
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = entry["outputs"]["7"]["images"]
    assert len(images) == 1
    img = images[0]
    path = Path(server.output_dir) / img.get("subfolder", "") / img["filename"]
    assert path.exists() and path.stat().st_size > 0, path
    assert server.rss() > 0
