"""The layering the README promises, checked on the source: the math core imports no ComfyUI, the nodes reach
ComfyUI's internals only through the adapter modules, and the shared declarations exist once."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ADAPTERS = {f.name for f in (ROOT / "nodes").glob("_comfy*.py")}   # the adapter modules: nodes/_comfy*.py
COMFY_INTERNALS = ("comfy", "latent_preview", "folder_paths", "nodes", "execution", "server", "comfy_extras")


def imports(path: Path) -> set:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
    return out


def test_the_math_core_imports_no_comfyui():
    for f in sorted((ROOT / "inversion").glob("*.py")):
        roots = {m.split(".")[0] for m in imports(f)}
        assert not roots & set(COMFY_INTERNALS) | (roots & {"comfy_api"}), (f.name, roots)


def test_only_the_adapters_touch_comfyui_internals():
    for f in sorted((ROOT / "nodes").glob("*.py")):
        roots = {m.split(".")[0] for m in imports(f)}
        if f.name in ADAPTERS:
            continue
        assert not roots & set(COMFY_INTERNALS), (f.name, roots & set(COMFY_INTERNALS))


def test_the_adapters_name_what_they_use():
    assert {"_comfy.py", "_comfy_image.py", "_comfy_grad.py", "_comfy_vae_grad.py"} <= ADAPTERS, ADAPTERS
    for name in ADAPTERS:
        f = ROOT / "nodes" / name
        doc = ast.get_docstring(ast.parse(f.read_text(encoding="utf-8"))) or ""
        for mod in sorted(m for m in imports(f) if m.split(".")[0] in COMFY_INTERNALS):
            assert mod in doc, f"{name}: its docstring does not name {mod}"


def test_category_and_trajectory_type_are_declared_once():
    for f in sorted((ROOT / "nodes").glob("*.py")):
        src = f.read_text(encoding="utf-8")
        if f.name == "types.py":
            assert 'CATEGORY = "sampling/ddim_inversion"' in src and 'io.Custom("DDIM_TRAJECTORY")' in src
        else:
            assert "sampling/ddim_inversion" not in src and "DDIM_TRAJECTORY\")" not in src, f.name
