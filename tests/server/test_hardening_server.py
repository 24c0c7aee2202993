"""A real ComfyUI server under abuse: interrupting an inversion, memory over many runs, malformed prompts."""
from __future__ import annotations

import math
import time
import urllib.error

import pytest
import torch

from ddiminv_dev import tiny_checkpoint as checkpoint
from ddiminv_dev.server import ServerError


def base_prompt(text="a tiny red fox", steps=2, method="ddim", prefix="hard", cfg=1.0, extra=None):
    p = {
        "ck": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint.CKPT_NAME}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ck", 1], "text": text}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ck", 1], "text": ""}},
        "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "inv": {"class_type": "DDIMInvert", "inputs": {
            "model": ["ck", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent": ["lat", 0],
            "steps": steps, "cfg": cfg, "scheduler": "ddim_uniform", "method": method}},
        "smp": {"class_type": "DDIMInvSampler", "inputs": {
            "model": ["ck", 0], "positive": ["pos", 0], "negative": ["neg", 0], "trajectory": ["inv", 2], "cfg": cfg}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["smp", 0], "filename_prefix": prefix}},
    }
    if extra:
        p["inv"]["inputs"].update(extra)
    return p


def status_of(entry) -> str:
    return (entry.get("status") or {}).get("status_str", "")


def events_of(entry) -> list:
    return [m[0] for m in (entry.get("status") or {}).get("messages", [])]


def saved_latent(server, prefix) -> torch.Tensor:
    import safetensors.torch
    files = sorted(server.output_dir.rglob(f"{prefix}*.latent"))
    assert files, f"no {prefix}*.latent in {server.output_dir}"
    return safetensors.torch.load_file(str(files[-1]))["latent_tensor"]


def wait_running(server, prompt_id, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        q = server.queue()
        if any(item[1] == prompt_id for item in q.get("queue_running", [])):
            return True
        time.sleep(0.1)
    return False


# --------------------------------------------------------------------------------------- (a) interrupt
def test_interrupt_mid_inversion_then_results_are_exact(server, server_factory):
    long = base_prompt(text="interrupt me", steps=400, method="implicit", prefix="long",
                       extra={"tolerance": 1e-12, "max_iters": 50})
    pid = server.post_prompt(long)
    assert wait_running(server, pid), "the long inversion never started"
    time.sleep(1.5)
    server.interrupt()
    t0 = time.monotonic()
    entry = server.wait(pid, timeout=60)
    assert time.monotonic() - t0 < 30, "the inversion did not stop promptly after /interrupt"
    assert "execution_interrupted" in events_of(entry), entry.get("status")
    assert not list(server.output_dir.rglob("long*.latent")), "an interrupted inversion saved a result"

    normal = base_prompt(text="after the interrupt", steps=3, method="exact", prefix="after", cfg=2.0)
    entry = server.run(normal, timeout=120)
    assert status_of(entry) == "success"
    got = saved_latent(server, "after")
    assert torch.isfinite(got).all()

    fresh = server_factory()
    fresh.run(normal, timeout=120)
    want = saved_latent(fresh, "after")
    assert torch.equal(got, want), "a run after an interrupt differs from the same run on a fresh server"


# --------------------------------------------------------------------------------------- (b) memory
@pytest.mark.slow  # ~50 short prompts: minutes on 2 busy cores; still runs by default (slow is not deselected)
def test_rss_is_flat_over_50_inversions(server):
    rss = []
    t0 = time.monotonic()
    for i in range(50):
        # a new prompt text each time: nothing downstream of CLIPTextEncode is served from the cache
        entry = server.run(base_prompt(text=f"memory run {i}", steps=1, prefix=f"mem{i:02d}_"), timeout=120)
        assert status_of(entry) == "success"
        rss.append(server.rss())
    took = time.monotonic() - t0
    warm = rss[9]
    worst = max(rss[10:])
    print(f"50 inversions in {took:.1f}s; rss after 10: {warm / 2**20:.1f} MiB, max after: {worst / 2**20:.1f} MiB, "
          f"last: {rss[-1] / 2**20:.1f} MiB")
    assert worst <= warm * 1.05, f"RSS grew by {100 * (worst / warm - 1):.1f}% after warm-up: " + \
        ", ".join(f"{r / 2**20:.0f}" for r in rss)


# --------------------------------------------------------------------------------------- (c) API fuzz
def _malformed():
    ok = base_prompt(prefix="fuzz")
    cases = []

    def variant(name, fn):
        p = base_prompt(prefix="fuzz")
        fn(p)
        cases.append((name, p))

    def drop(node, key):
        return lambda p: p[node]["inputs"].pop(key)

    def put(node, key, val):
        return lambda p: p[node]["inputs"].__setitem__(key, val)

    for key in ("model", "positive", "negative", "latent", "steps", "cfg", "scheduler", "method"):
        variant(f"missing inv.{key}", drop("inv", key))
    for key in ("model", "positive", "trajectory", "cfg"):
        variant(f"missing smp.{key}", drop("smp", key))
    bad_values = [
        ("steps", "ten"), ("steps", 10**12), ("steps", -1), ("steps", 0), ("steps", 2.5), ("steps", None),
        ("steps", [1]), ("steps", {"a": 1}), ("cfg", "high"), ("cfg", 1e308), ("cfg", -5.0), ("cfg", float("nan")),
        ("scheduler", "nope"), ("scheduler", 3), ("method", "magic"), ("method", ""), ("method", None),
        ("start_step", 10**9), ("start_step", "x"), ("end_step", -7), ("tolerance", "tiny"), ("tolerance", 0),
        ("max_iters", 10**9), ("damping", 5.0), ("gamma", 0.0), ("eval_sigma", "sideways"),
        ("latent", ["nope", 0]), ("latent", ["lat", 7]), ("latent", ["pos", 0]), ("model", ["lat", 0]),
        ("positive", ["ck", 0]), ("latent", "lat"), ("latent", ["lat"]), ("sigmas", ["lat", 0]),
        ("sigmas", ["inv", 0]),
    ]
    for key, val in bad_values:
        variant(f"inv.{key}={val!r}", put("inv", key, val))
    for key, val in [("trajectory", ["inv", 0]), ("trajectory", ["lat", 0]), ("start_step", 999),
                     ("correction", "all"), ("cfg", "x"), ("trajectory", ["inv", 9])]:
        variant(f"smp.{key}={val!r}", put("smp", key, val))
    variant("unknown class", lambda p: p.__setitem__("inv", dict(p["inv"], class_type="DDIMInvertNope")))
    variant("no class_type", lambda p: p["inv"].pop("class_type"))
    variant("cycle", lambda p: p["lat"].__setitem__("inputs", {"samples": ["smp", 0]}) or
            p["lat"].__setitem__("class_type", "LatentUpscaleBy") or p["lat"]["inputs"].update(
                {"upscale_method": "nearest-exact", "scale_by": 1.0}))
    assert ok
    return cases


CASES = _malformed()


def test_malformed_prompts_are_answered_and_server_keeps_serving(server):
    assert len(CASES) >= 50, len(CASES)
    answered = {"rejected": 0, "error": 0, "success": 0}
    outcome = {}
    pending = []
    for name, p in CASES:
        try:
            out = server.request("POST", "/prompt", {"prompt": p, "client_id": server.client_id}, timeout=60)
        except ServerError as e:          # HTTP 400 (+ node_errors), raised by the handle
            assert "HTTP 400" in str(e), (name, str(e))
            answered["rejected"] += 1
            outcome[name] = "rejected"
            continue
        except urllib.error.HTTPError as e:
            assert e.code == 400, (name, e.code)
            answered["rejected"] += 1
            outcome[name] = "rejected"
            continue
        if isinstance(out, dict) and (out.get("node_errors") or out.get("error")) and not out.get("prompt_id"):
            answered["rejected"] += 1
            outcome[name] = "rejected"
            continue
        assert isinstance(out, dict) and out.get("prompt_id"), (name, out)
        pending.append((name, out["prompt_id"]))
    for name, pid in pending:
        entry = server.wait(pid, timeout=120)
        st = status_of(entry)
        assert st in ("success", "error"), (name, entry.get("status"))
        if st == "error":
            msgs = dict((m[0], m[1]) for m in entry["status"]["messages"])
            err = msgs.get("execution_error", {})
            assert err.get("exception_message"), (name, entry["status"])
            answered["error"] += 1
            outcome[name] = "error"
            # a bad value that passes ComfyUI's validation meets the pack's own check, not a crash elsewhere
            assert "ddim-inversion" in err.get("exception_type", ""), (name, err.get("exception_type"),
                                                                       err.get("exception_message"))
        else:
            answered["success"] += 1
            outcome[name] = "success"
    print(f"{len(CASES)} malformed prompts: {answered}")
    # the one case that is valid after ComfyUI's own coercion (an INT widget takes 2.5 as 2)
    assert {k for k, v in outcome.items() if v == "success"} == {"inv.steps=2.5"}, outcome
    # measured: 45 rejected + 10 pack errors on 0.3.75; 52 + 3 on 0.33 (its validation rejects bad combo values)
    assert answered["rejected"] >= 40, answered
    # the server still serves a valid prompt, with our nodes
    entry = server.run(base_prompt(text="still alive", prefix="alive"), timeout=120)
    assert status_of(entry) == "success"
    assert torch.isfinite(saved_latent(server, "alive")).all()
    assert not math.isnan(float(saved_latent(server, "alive").sum()))
