"""Property test: DDIM Invert + Inverted-Latent Sampler through the real executor with random valid and
invalid inputs. Properties: ComfyUI's validation rejects the prompt, or it runs to success with finite
outputs, or it fails with the pack's own InversionInputError; never another exception, never a hang, and
the source latent / conditioning are never mutated."""
from __future__ import annotations

import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.host.test_errors import ERR, assert_unchanged, prompt
from ddiminv_dev import host

PER_RUN_S = 20.0      # a single prompt of this size takes well under a second


@pytest.fixture(scope="module")
def hard():
    host.boot()
    from ddiminv_dev.fixtures import hardening_nodes as nodes_hardening
    return nodes_hardening


@st.composite
def cases(draw):
    from ddiminv_dev.fixtures.hardening_nodes import MASKS, SIGMA_KINDS
    batch = draw(st.integers(1, 3))
    lat = dict(
        batch=batch,
        channels=draw(st.sampled_from([4, 4, 4, 4, 3, 16])),
        height=draw(st.integers(1, 12)),
        width=draw(st.integers(1, 12)),
        seed=draw(st.integers(0, 1000)),
        dtype=draw(st.sampled_from(["float32", "float16", "bfloat16"])),
        poison=draw(st.sampled_from(["none"] * 6 + ["nan", "inf", "neg_inf", "huge", "all_nan"])),
        mask=draw(st.sampled_from(["none"] * 3 + list(MASKS[1:]))),
        scale=draw(st.sampled_from([1.0, 1.0, 0.0, 1e-6, 50.0, 1e4])),
    )
    method = draw(st.sampled_from(["ddim", "implicit", "exact"]))
    steps = draw(st.integers(1, 6))
    inv = dict(
        steps=steps,
        cfg=draw(st.sampled_from([1.0, 1.0, 0.0, 2.5, 7.0, 100.0, float("nan")])),
        scheduler=draw(st.sampled_from(["ddim_uniform", "normal", "karras", "simple", "beta"])),
        method=method,
        start_step=draw(st.integers(0, 7)),
        end_step=draw(st.sampled_from([10000, 10000, 1, 3, 6])),
        eval_sigma=draw(st.sampled_from(["auto", "current", "destination"])),
        tolerance=draw(st.sampled_from([1e-6, 1e-3, 1e-12, float("nan")])),
        max_iters=draw(st.sampled_from([30, 1, 3, 0])),
        damping=draw(st.sampled_from([1.0, 0.5, 0.01])),
        gamma=draw(st.sampled_from([1.0, 0.5, 0.05])),
    )
    cond = dict(mean=draw(st.sampled_from([0.5, -1.0, 0.0, 40.0])),
                batch=draw(st.sampled_from([1, 1, batch, batch + 1])), empty=draw(st.integers(0, 9)) == 0,
                poison=draw(st.integers(0, 14)) == 0)
    sampler = dict(cfg=draw(st.sampled_from([1.0, inv["cfg"], 4.0])), start_step=draw(st.integers(0, 6)),
                   correction=draw(st.sampled_from(["none", "none", "source_drift"])))
    family = draw(st.sampled_from(["eps", "v", "flow"]))
    sigmas = draw(st.sampled_from([None] * 6 + list(SIGMA_KINDS)))
    return dict(lat=lat, inv=inv, cond=cond, sampler=sampler, model={"family": family}, sigmas=sigmas)


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.float()).all())


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(case=cases())
def test_fuzz_invert_and_sample(hard, case):
    p = prompt(inv=case["inv"], lat=case["lat"], cond=case["cond"], sampler=case["sampler"], model=case["model"])
    if case["sigmas"] is not None:
        p["sg"] = {"class_type": "TestHardSigmas", "inputs": {"kind": case["sigmas"], "steps": case["inv"]["steps"]}}
        p["inv"]["inputs"]["sigmas"] = ["sg", 0]
    ok = host.validate(p)
    if not ok[0]:
        # ComfyUI's own validation (widget min/max) rejected the prompt: a clean rejection naming the node
        assert ok[3], ok
        for node_id, errs in ok[3].items():
            assert errs["errors"], errs
        return
    t0 = time.monotonic()
    r = host.run(p, expect_success=False)
    took = time.monotonic() - t0
    assert took < PER_RUN_S, f"one prompt took {took:.1f}s (hang?)"
    if r.success:
        inv_out = r.outputs("inv")
        assert _finite(inv_out[0]["samples"]), "DDIM Invert gave a non-finite noise latent"
        traj = inv_out[2]
        assert _finite(traj.states) and _finite(traj.noise)
        out = r.outputs("s")[0]["samples"]
        assert _finite(out), "Inverted-Latent Sampler gave a non-finite latent"
        assert out.shape == inv_out[0]["samples"].shape
    else:
        e = r.error()
        assert e is not None, r.server.messages
        assert e["exception_type"].endswith(ERR), (e["exception_type"], e["exception_message"], case)
        assert e["exception_message"].strip()
    assert_unchanged(hard, r, p)
