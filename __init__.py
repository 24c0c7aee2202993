"""ddim-inversion: DDIM inversion nodes for ComfyUI (V3 node API).

Exports ``comfy_entrypoint`` and ``WEB_DIRECTORY`` only. Importing this package outside ComfyUI does
not fail: the math core in ``inversion/`` is pure torch and the nodes are loaded only when the host's
``comfy_api`` is importable.
"""
WEB_DIRECTORY = "./js"

try:  # the host's V3 API; absent when the math core is used on its own
    import comfy_api.latest  # noqa: F401
    _HAVE_COMFY = True
except Exception:  # pragma: no cover - exercised by the unit tier without ComfyUI on sys.path
    _HAVE_COMFY = False

# only as a package (ComfyUI loads it as one; pytest may import this file as a plain module)
_LOAD_NODES = _HAVE_COMFY and bool(__package__)
if _LOAD_NODES:
    from .nodes import comfy_entrypoint  # noqa: F401

__all__ = ["WEB_DIRECTORY"] + (["comfy_entrypoint"] if _LOAD_NODES else [])
