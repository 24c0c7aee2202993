"""Static safety checks over what the pack ships (__init__.py, nodes/, inversion/, js/) that ruff cannot make:
no file writes from Python, no unescaped innerHTML / eval in the JS. (eval/exec, subprocess and network or
installer imports are ruff's job: rules S and TID251 in pyproject.toml, run by `make test`.)"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PY_DIRS = ("nodes", "inversion")


def shipped_python():
    files = [ROOT / "__init__.py"]
    for d in PY_DIRS:
        files += sorted((ROOT / d).rglob("*.py"))
    return [f for f in files if f.exists() and "__pycache__" not in f.parts]


def shipped_js():
    js = ROOT / "js"
    if not js.exists():
        return []
    skip = {"tests", "node_modules", "test"}
    return sorted(f for f in js.rglob("*") if f.suffix in (".js", ".mjs", ".cjs")
                  and not (set(f.relative_to(js).parts[:-1]) & skip))


def _ids(files):
    return [str(f.relative_to(ROOT)) for f in files]


PY = shipped_python()
JS = shipped_js()


def test_the_checks_see_the_pack():
    names = set(_ids(PY))
    assert "__init__.py" in names and "nodes/invert.py" in names and "inversion/methods.py" in names
    assert not any(n.startswith(("tests/", "tools/", "bench/", "ddiminv_dev/")) for n in names)
    assert {"js/ddim_inversion.js", "js/lib/frames.js"} <= set(_ids(JS))


def test_the_write_check_catches_a_write(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("open('x', 'w').write('y')\n")
    with pytest.raises(AssertionError, match="opens a file for writing"):
        test_no_file_writes(bad)


def test_the_js_check_catches_raw_html(tmp_path):
    bad = tmp_path / "bad.js"
    bad.write_text("el.innerHTML = userText;\n")
    with pytest.raises(AssertionError, match="innerHTML assigned without the escape helper"):
        test_js_no_unescaped_innerhtml_eval(bad)


def _tree(f: Path) -> ast.AST:
    return ast.parse(f.read_text(encoding="utf-8"), filename=str(f))


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else None
            yield name, node


def _write_mode(call: ast.Call):
    mode = None
    if len(call.args) >= 2 and isinstance(call.args[1], ast.Constant):
        mode = call.args[1].value
    for kw in call.keywords:
        if kw.arg == "mode" and isinstance(kw.value, ast.Constant):
            mode = kw.value.value
    return mode


PY_IN_DIRS = [p for p in PY if p.parent.name in PY_DIRS]


@pytest.mark.parametrize("f", PY_IN_DIRS, ids=_ids(PY_IN_DIRS))
def test_no_file_writes(f):
    tree = _tree(f)
    for name, call in _calls(tree):
        if name == "open":
            mode = _write_mode(call)
            assert mode is not None or len(call.args) <= 1, f"{f.name}:{call.lineno} open() with a computed mode"
            assert mode is None or not set(str(mode)) & set("wax+"), f"{f.name}:{call.lineno} opens a file for writing"
        assert name not in ("write_text", "write_bytes", "unlink", "rmtree", "remove", "rename", "makedirs", "mkdir"), \
            f"{f.name}:{call.lineno} writes or deletes files ({name})"
        if name == "save" and isinstance(call.func, ast.Attribute):
            base = call.func.value
            assert not (isinstance(base, ast.Name) and base.id in ("torch", "np", "numpy")), \
                f"{f.name}:{call.lineno} saves a file"


def _strip_js_comments(src: str) -> str:
    src = re.sub(r"/\*.*?\*/", "", src, flags=re.S)
    return re.sub(r"(^|[^:])//[^\n]*", r"\1", src)


@pytest.mark.parametrize("f", JS, ids=_ids(JS))
def test_js_no_unescaped_innerhtml_eval(f):
    src = _strip_js_comments(f.read_text(encoding="utf-8"))
    assert not re.search(r"(?<![\w.$])eval\s*\(|new\s+Function\s*\(", src), f"{f.name} uses eval/new Function"
    assert not re.search(r"\.outerHTML\s*=|insertAdjacentHTML\s*\(|document\.write\s*\(", src), \
        f"{f.name} writes raw HTML"
    for m in re.finditer(r"\.innerHTML\s*(\+?=)\s*([^;\n]+)", src):
        rhs = m.group(2).strip()
        literal = re.fullmatch(r"""(['"])[^'"`]*\1|``|''|\"\"""", rhs)
        assert literal or re.search(r"\bescape\w*\s*\(|\besc\w*\s*\(", rhs), \
            f"{f.name}: innerHTML assigned without the escape helper: {m.group(0)!r}"
