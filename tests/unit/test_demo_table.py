"""The README's demo table is the demo's own output: `tools/demo.py --write-readme` writes both the table and
docs/demo_metrics.json, and this test fails when one is edited without the other."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _demo():
    spec = importlib.util.spec_from_file_location("ddiminv_demo_tool", ROOT / "tools" / "demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_demo_table_is_the_recorded_run():
    demo = _demo()
    text = (ROOT / "README.md").read_text()
    assert text.count(demo.TABLE_START) == 1 and text.count(demo.TABLE_END) == 1, "README lost its demo-table markers"
    block = text.split(demo.TABLE_START, 1)[1].split(demo.TABLE_END, 1)[0].strip()
    metrics = json.loads(demo.DEMO_METRICS.read_text())
    assert block == demo.format_table(metrics), "README demo table drifted: rerun `python tools/demo.py --write-readme`"
    # the recorded run is the built-in learned model, within the demo's promise
    assert metrics["model"] == "learned" and metrics["total_seconds"] < 180
    kinds = {r["kind"] for r in metrics["results"]}
    assert kinds == {"reconstruction", "edit"}
    assert all(r["psnr_db"] <= r["vae_ceiling_db"] + 0.5 for r in metrics["results"] if r["kind"] == "reconstruction")
