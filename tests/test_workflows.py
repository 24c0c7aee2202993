"""The example workflows: every UI workflow and its API twin describe the same graph.

Pure JSON checks; the real host is booted only to read the node definitions (widget names and order,
socket types, display names), so a twin that drifts from its UI workflow, or a workflow that drifts from
the nodes' schemas, fails here.

Layout: ``example_workflows/<name>.json`` (UI format, what the frontend saves; ComfyUI's template browser
lists every top-level ``*.json`` there), ``example_workflows/<name>.jpg`` (its thumbnail) and
``example_workflows/api/<name>.api.json`` (the API-format twin, kept out of the template browser).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ddiminv_dev import host

ROOT = Path(__file__).resolve().parents[1]
WF_DIR = ROOT / "example_workflows"
API_DIR = WF_DIR / "api"
EXPECTED = ("invert_and_reconstruct", "invert_and_edit", "core_interop", "flow_model",
            "nulltext_reconstruct", "nulltext_edit", "attention_edit", "flow_attention_edit",
            "video_two_experts")
UI_ONLY = {"Note", "MarkdownNote"}  # frontend-only nodes: never in the API prompt
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
THUMB_MAX_BYTES = 100 * 1024
# combos listing the user's files (models, input images and videos): their values are names the user must provide
FILE_INPUTS = {"image", "file", "ckpt_name", "unet_name", "clip_name", "clip_name1", "clip_name2", "clip_name3",
               "vae_name"}
MEDIA_INPUTS = ("image", "file")   # Load Image's picture, Load Video's clip: the user's media, not models


def _names() -> list:
    return sorted(p.stem for p in WF_DIR.glob("*.json"))


def _load(name):
    ui = json.loads((WF_DIR / f"{name}.json").read_text())
    api = json.loads((API_DIR / f"{name}.api.json").read_text())
    return ui, api


@pytest.fixture(scope="module")
def nodes():
    return host.boot()


def _spec(cls) -> dict:
    """input name -> (type, options, required) in the node's input order (required first, then optional)."""
    it = cls.INPUT_TYPES()
    out = {}
    for section in ("required", "optional"):
        for name, spec in (it.get(section) or {}).items():
            t = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            out[name] = (t, opts, section == "required")
    return out


def _is_widget(t, opts) -> bool:
    if opts.get("forceInput") or opts.get("rawLink"):
        return False
    return isinstance(t, list) or (isinstance(t, str) and t in WIDGET_TYPES)


def widget_slots(cls) -> list:
    """What the frontend stores in ``widgets_values``, in order: the widget input's name, or None for the
    extra values some widgets add (the seed's control_after_generate, Load Image's upload button)."""
    slots = []
    for name, (t, opts, _req) in _spec(cls).items():
        if not _is_widget(t, opts):
            continue
        slots.append(name)
        if opts.get("control_after_generate"):
            slots.append(None)
        if opts.get("image_upload") or opts.get("video_upload") or opts.get("audio_upload"):
            slots.append(None)
    return slots


def _combo_options(t, opts):
    if isinstance(t, list):
        return t
    if t == "COMBO":
        return opts.get("options")
    return None


def test_the_expected_workflows_ship_with_twins_and_thumbnails():
    names = _names()
    assert set(EXPECTED) <= set(names), f"missing UI workflows: {set(EXPECTED) - set(names)}"
    for name in names:
        assert (API_DIR / f"{name}.api.json").exists(), f"{name}.json has no API twin api/{name}.api.json"
        thumbs = [p for p in (WF_DIR / f"{name}.jpg", WF_DIR / f"{name}.webp") if p.exists()]
        assert thumbs, f"{name} has no thumbnail {name}.jpg/.webp for the template browser"
        for p in thumbs:
            assert p.stat().st_size < THUMB_MAX_BYTES, f"{p.name} is {p.stat().st_size} bytes (keep < 100 KB)"
    twins = sorted(p.name[: -len(".api.json")] for p in API_DIR.glob("*.api.json"))
    assert twins == names, f"API twins without a UI workflow: {set(twins) - set(names)}"


def test_template_folder_holds_only_ui_workflows():
    """The template browser offers every top-level *.json; an API prompt there would be a broken template."""
    for p in WF_DIR.glob("*.json"):
        data = json.loads(p.read_text())
        assert isinstance(data.get("nodes"), list) and "links" in data, f"{p.name} is not a UI-format workflow"


@pytest.mark.parametrize("name", EXPECTED)
def test_ui_workflow_is_self_consistent(name, nodes):
    ui, _ = _load(name)
    ids = [n["id"] for n in ui["nodes"]]
    assert len(ids) == len(set(ids)), "duplicate node ids"
    assert ui["last_node_id"] >= max(ids)
    link_ids = [link[0] for link in ui["links"]]
    assert len(link_ids) == len(set(link_ids)), "duplicate link ids"
    assert ui["last_link_id"] >= max(link_ids, default=0)
    by_id = {n["id"]: n for n in ui["nodes"]}
    for lid, src, src_slot, dst, dst_slot, ltype in ui["links"]:
        out = by_id[src]["outputs"][src_slot]
        inp = by_id[dst]["inputs"][dst_slot]
        assert lid in (out["links"] or []), f"link {lid} missing from node {src}'s output {src_slot}"
        assert inp["link"] == lid, f"node {dst} input {inp['name']} does not point back at link {lid}"
        assert out["type"] == ltype == inp["type"], f"link {lid} types: {out['type']} -> {ltype} -> {inp['type']}"
        # the socket types are the node definitions' own
        src_cls = nodes.NODE_CLASS_MAPPINGS[by_id[src]["type"]]
        assert str(src_cls.RETURN_TYPES[src_slot]) == ltype, f"node {src} output {src_slot} is not {ltype}"
        t, _opts, _req = _spec(nodes.NODE_CLASS_MAPPINGS[by_id[dst]["type"]])[inp["name"]]
        assert str(t) == ltype, f"node {dst} input {inp['name']} is {t}, link {lid} carries {ltype}"
    for n in ui["nodes"]:
        for k, out in enumerate(n.get("outputs") or []):
            for lid in out["links"] or []:
                assert [lid, n["id"], k] == next(link[:3] for link in ui["links"] if link[0] == lid)
        for inp in n.get("inputs") or []:
            if inp.get("link") is not None:
                assert inp["link"] in link_ids
    # execution order is a topological order
    order = {n["id"]: n["order"] for n in ui["nodes"]}
    for _, src, _, dst, _, _ in ui["links"]:
        assert order[src] < order[dst], f"node {src} must come before node {dst} in 'order'"


@pytest.mark.parametrize("name", EXPECTED)
def test_ui_and_api_twins_match(name, nodes):
    ui, api = _load(name)
    ui_nodes = {str(n["id"]): n for n in ui["nodes"] if n["type"] not in UI_ONLY}
    for n in ui["nodes"]:
        assert n["type"] in UI_ONLY or n["type"] in nodes.NODE_CLASS_MAPPINGS, f"unknown node type {n['type']}"
    # same nodes, same classes
    assert sorted(ui_nodes) == sorted(api), "UI and API workflows have different node ids"
    for nid, n in ui_nodes.items():
        assert api[nid]["class_type"] == n["type"], f"node {nid}: {n['type']} vs {api[nid]['class_type']}"
        title = n.get("title") or nodes.NODE_DISPLAY_NAME_MAPPINGS.get(n["type"], n["type"])
        assert api[nid].get("_meta", {}).get("title") == title, f"node {nid}: title differs"

    # same links: (dst, input name) -> [src, slot]
    by_id = {n["id"]: n for n in ui["nodes"]}
    ui_links = {}
    for _lid, src, src_slot, dst, dst_slot, _t in ui["links"]:
        ui_links[(str(dst), by_id[dst]["inputs"][dst_slot]["name"])] = [str(src), src_slot]
    api_links = {(nid, k): v for nid, node in api.items() for k, v in node["inputs"].items()
                 if isinstance(v, list)}
    assert api_links == ui_links, "links differ between the UI workflow and its API twin"

    # same widget values, mapped by the node definition's widget order
    for nid, n in ui_nodes.items():
        cls = nodes.NODE_CLASS_MAPPINGS[n["type"]]
        slots = widget_slots(cls)
        values = n.get("widgets_values") or []
        assert len(values) == len(slots), (
            f"node {nid} ({n['type']}): {len(values)} widgets_values for widgets {slots}")
        ui_widgets = {s: v for s, v in zip(slots, values, strict=True) if s is not None}
        api_widgets = {k: v for k, v in api[nid]["inputs"].items() if not isinstance(v, list)}
        assert api_widgets == ui_widgets, f"node {nid} ({n['type']}): widget values differ"


@pytest.mark.parametrize("name", EXPECTED)
def test_api_workflow_fits_the_node_schemas(name, nodes):
    """Every required input is given, every widget value has the widget's type and a fixed-choice combo
    value is one of the choices (file lists such as ckpt_name depend on the user's models: not checked)."""
    _, api = _load(name)
    for nid, node in api.items():
        spec = _spec(nodes.NODE_CLASS_MAPPINGS[node["class_type"]])
        for iname, (_t, _opts, req) in spec.items():
            if req:
                assert iname in node["inputs"], f"node {nid} ({node['class_type']}) lacks required input {iname}"
        for iname, v in node["inputs"].items():
            assert iname in spec, f"node {nid} ({node['class_type']}) has no input {iname}"
            if isinstance(v, list):
                continue
            t, opts, _ = spec[iname]
            choices = _combo_options(t, opts)
            if t == "INT":
                assert isinstance(v, int) and not isinstance(v, bool)
                assert opts.get("min", v) <= v <= opts.get("max", v), f"node {nid} {iname}={v} out of range"
            elif t == "FLOAT":
                assert isinstance(v, (int, float)) and not isinstance(v, bool)
                assert opts.get("min", v) <= v <= opts.get("max", v), f"node {nid} {iname}={v} out of range"
            elif t == "BOOLEAN":
                assert isinstance(v, bool)
            elif t == "STRING":
                assert isinstance(v, str)
            elif iname in FILE_INPUTS:
                assert isinstance(v, str) and v
            else:  # a fixed list of choices (schedulers, methods, ...)
                assert choices, f"node {nid} ({node['class_type']}) {iname}: not a known widget type {t}"
                assert v in choices, f"node {nid} ({node['class_type']}) {iname}={v!r} not in {choices}"


@pytest.mark.parametrize("name", EXPECTED)
def test_loader_nodes_say_where_their_models_come_from(name):
    """The frontend offers to download a missing model from the node's properties.models entry."""
    ui, api = _load(name)
    for n in ui["nodes"]:
        node = api.get(str(n["id"]))
        files = {v for k, v in (node or {}).get("inputs", {}).items() if k in FILE_INPUTS and k not in MEDIA_INPUTS}
        listed = {m["name"]: m for m in n.get("properties", {}).get("models", [])}
        assert files == set(listed), f"node {n['id']} ({n['type']}): models {sorted(listed)} vs widgets {sorted(files)}"
        for m in listed.values():
            assert m["url"].startswith("https://huggingface.co/") and m["url"].endswith(".safetensors"), m
            assert m["directory"] in ("checkpoints", "diffusion_models", "text_encoders", "vae"), m


# Attention Control's widgets_values as the example workflows saved them before feature_block / feature_end were
# added (10 values; what users' saved workflows hold), and a pnp one made the same way from the node's defaults
SAVED_BEFORE_FEATURES = {
    "attention_edit": ["p2p", "replace", -1.0, -1.0, -1.0, "", "", 2.0, "cat, dog", 0.3],
    "flow_attention_edit": ["v_inject", "replace", -1.0, -1.0, -1.0, "", "", 2.0, "", 0.3],
    "pnp": ["pnp", "replace", -1.0, -1.0, -1.0, "", "", 2.0, "", 0.3],
}


def _frontend_widgets(cls, values) -> dict:
    """What the frontend gives the node from a saved ``widgets_values``: each value to the widget at its place,
    a widget without a saved value keeps its default."""
    spec = _spec(cls)
    out = {}
    for k, name in enumerate(widget_slots(cls)):
        if name is not None:
            out[name] = values[k] if k < len(values) else spec[name][1].get("default")
    return out


def test_attention_control_from_workflows_saved_before_its_feature_widgets_does_what_it_did(nodes):
    """The Attention Control widgets added since (PnP's feature_block and feature_end) come last with defaults
    that keep the Control: a workflow saved with 10 values (the examples as they were, a pnp one), the examples
    as saved now and their API twins all give the Control the node gave before those widgets existed."""
    A = host.pack_submodule("inversion.attention")
    cls = nodes.NODE_CLASS_MAPPINGS["DDIMInvAttentionControl"]
    W = A.Window
    before = {   # the Controls the node made from these values before the feature widgets
        "attention_edit": A.Control("p2p", blend_words=("cat", "dog")),
        "flow_attention_edit": A.Control("v_inject", self_window=W(0.0, 0.1), cross_window=W(), blocks=A.FAMILY),
        "pnp": A.Control("pnp", self_window=W(0.0, 0.5), cross_window=W(), blocks=("output", 4, 11),
                         feature_window=W(0.0, 0.8), feature_block=4),
    }
    for name, values in SAVED_BEFORE_FEATURES.items():
        got = cls.execute(**_frontend_widgets(cls, values)).result[0]
        assert got == before[name], (name, got)
        if name == "pnp":
            continue
        ui, api = _load(name)
        (node,) = [n for n in ui["nodes"] if n["type"] == "DDIMInvAttentionControl"]
        assert node["widgets_values"][:len(values)] == values      # the old values are a prefix of today's
        assert cls.execute(**_frontend_widgets(cls, node["widgets_values"])).result[0] == before[name]
        (inputs,) = [n["inputs"] for n in api.values() if n["class_type"] == "DDIMInvAttentionControl"]
        old_api = {k: v for k, v in inputs.items() if k not in ("feature_block", "feature_end")}
        for prompt in (inputs, old_api):                            # an API prompt queued with or without them
            assert cls.execute(**{k: v for k, v in prompt.items() if not isinstance(v, list)}).result[0] == before[name]
