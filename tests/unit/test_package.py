"""Packaging facts: the V3 entry point, no V1 mappings, importable without ComfyUI, registry metadata."""
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_package_imports_without_comfyui_and_exports_only_v3():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('ddim_inversion', r'{ROOT / '__init__.py'}',"
        f" submodule_search_locations=[r'{ROOT}'])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['ddim_inversion'] = m; spec.loader.exec_module(m)\n"
        "assert m.WEB_DIRECTORY == './js'\n"
        "assert not hasattr(m, 'NODE_CLASS_MAPPINGS')\n"
        "assert 'comfy' not in sys.modules and 'comfy_api' not in sys.modules\n"
        "from ddim_inversion.inversion import invert, sample, Trajectory\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_entrypoint_is_v3_in_source():
    src = (ROOT / "__init__.py").read_text()
    assert "comfy_entrypoint" in src and "NODE_CLASS_MAPPINGS" not in src
    nodes_src = (ROOT / "nodes" / "__init__.py").read_text()
    assert "class DDIMInversionExtension(ComfyExtension)" in nodes_src and "async def get_node_list" in nodes_src


def test_registry_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    proj, comfy = meta["project"], meta["tool"]["comfy"]
    assert proj["name"] == "ddim-inversion" and proj["dependencies"] == []
    major, minor, patch = (int(v) for v in proj["version"].split("."))
    assert proj["description"] and (ROOT / "LICENSE").exists()
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["requires-comfyui"] == ">=0.3.75"
    # the floor is the oldest ComfyUI the suite runs on: the version setup installs
    setup = (ROOT / "tools" / "setup.sh").read_text()
    assert '[ "$ver" = "0.3.75" ]' in setup


def test_requirements_list_no_packages():
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert [line for line in lines if line and not line.startswith("#")] == []


def test_only_the_named_adapters_import_comfyui():
    """nodes/_comfy.py's docstring names the adapters that may import ComfyUI: every module that does is named
    there, and every module named there exists (the list was stale: _comfy_vae_grad.py was missing)."""
    import ast
    doc = ast.get_docstring(ast.parse((ROOT / "nodes" / "_comfy.py").read_text()))
    named = {p for p in (ROOT / "nodes").glob("_comfy*.py") if f"nodes/{p.name}" in doc or p.name == "_comfy.py"}
    importing = set()
    for p in (ROOT / "nodes").glob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(m == "comfy" or m.startswith(("comfy.", "latent_preview")) for m in mods):
                importing.add(p)
    assert importing <= named, sorted(p.name for p in importing - named)
    assert named == set((ROOT / "nodes").glob("_comfy*.py")), sorted(p.name for p in named)
