"""Property tests through the real ComfyUI modules (hypothesis, derandomized).

1. DDIM Invert + Inverted-Latent Sampler with random valid and invalid inputs: ComfyUI's validation rejects the
   prompt, or it runs to success with finite outputs, or it fails with the pack's own InversionInputError
   ("<Node>: ..."); never another exception, the source latent / conditioning never mutated, and the implicit
   solver never spends more than its budget.
2. Every schedule ComfyUI's schedulers make (schedulers x step counts 1-5, 50, 1000 x model samplings EPS, V,
   SD3-style flow and Flux at two shifts) either fails the pack's schedule check with a message naming the fix
   or is an invertible schedule; a few of them run through the real node and give finite latents.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ddiminv_dev import host
from ddiminv_dev.prompts import hard_prompt as prompt

ERR = "InversionInputError"
STEP_COUNTS = [1, 2, 3, 4, 5, 50, 1000]
SAMPLINGS = ["eps", "v", "flow", "flux-1.15", "flux-3.0"]


@st.composite
def cases(draw):
    from ddiminv_dev.fixtures.hardening_nodes import MASKS, POOLED, SIGMA_KINDS
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
        frames=draw(st.sampled_from([0] * 8 + [2])),
    )
    method = draw(st.sampled_from(["ddim", "implicit", "exact"]))
    steps = draw(st.integers(1, 6))
    inv = dict(
        steps=steps,
        cfg=draw(st.sampled_from([1.0, 1.0, 0.0, 2.5, 7.0, 100.0, float("nan")])),
        scheduler=draw(st.sampled_from(["ddim_uniform", "normal", "karras", "simple", "beta", "kl_optimal",
                                        "linear_quadratic", "exponential", "sgm_uniform"])),
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
                poison=draw(st.integers(0, 14)) == 0, pooled=draw(st.sampled_from(list(POOLED) + ["none"] * 4)))
    sampler = dict(cfg=draw(st.sampled_from([1.0, inv["cfg"], 4.0])), start_step=draw(st.integers(0, 6)),
                   correction=draw(st.sampled_from(["none", "none", "source_drift"])),
                   exact_replay=draw(st.sampled_from(["auto", "auto", "bdia", "ddim"])))
    family = draw(st.sampled_from(["eps", "v", "flow"]))
    sigmas = draw(st.sampled_from([None] * 6 + list(SIGMA_KINDS)))
    return dict(lat=lat, inv=inv, cond=cond, sampler=sampler, model={"family": family}, sigmas=sigmas)


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.float()).all())


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(case=cases())
def test_fuzz_invert_and_sample(assert_unchanged, case):
    p = prompt(inv=case["inv"], lat=case["lat"], cond=case["cond"], sampler=case["sampler"], model=case["model"],
               sigmas=case["sigmas"], sigma_steps=case["inv"]["steps"])
    ok = host.validate(p)
    if not ok[0]:
        # ComfyUI's own validation (widget min/max) rejected the prompt: a clean rejection naming the node
        assert ok[3], ok
        for errs in ok[3].values():
            assert errs["errors"], errs
        return
    r = host.run(p, expect_success=False)
    if r.success:
        inv_out = r.outputs("inv")
        assert _finite(inv_out[0]["samples"]), "DDIM Invert gave a non-finite noise latent"
        traj = inv_out[2]
        assert _finite(traj.states) and _finite(traj.noise)
        if traj.method == "implicit":     # the budget holds: per sample at most 2 x steps x max_iters evaluations
            assert max(traj.options["evaluations_per_sample"]) <= 2 * traj.steps * traj.options["max_iters"]
        out = r.outputs("s")[0]["samples"]
        assert _finite(out), "Inverted-Latent Sampler gave a non-finite latent"
        assert out.shape == inv_out[0]["samples"].shape
    else:
        e = r.error()
        assert e is not None, r.server.messages
        assert e["exception_type"].endswith(ERR), (e["exception_type"], e["exception_message"], case)
        display = {"inv": "DDIM Invert", "s": "Inverted-Latent Sampler"}[e["node_id"]]
        assert e["exception_message"].startswith(display + ": "), e["exception_message"]
    assert_unchanged(r, p)


# --------------------------------------------------------------------------------------- every scheduler's schedule
def _sampling(kind: str):
    """(model_sampling, family) of a real ComfyUI model: SD1.5 EPS/V, SD3-style discrete flow (shift 3), Flux."""
    from ddiminv_dev.fixtures import hardening_nodes
    if kind.startswith("flux"):         # as core's ModelSamplingFlux node builds it
        import comfy.model_sampling as cms

        class ModelSamplingAdvanced(cms.ModelSamplingFlux, cms.CONST):
            pass
        ms = ModelSamplingAdvanced()
        ms.set_parameters(shift=float(kind.split("-")[1]))
        return ms, "flow"
    model = hardening_nodes.hard_model(kind)
    return model.get_model_object("model_sampling"), "flow" if kind == "flow" else "vp"


@pytest.fixture(scope="module")
def samplings():
    return {k: _sampling(k) for k in SAMPLINGS}


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(scheduler=st.sampled_from(["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta",
                                  "normal", "linear_quadratic", "kl_optimal"]),
       steps=st.sampled_from(STEP_COUNTS), kind=st.sampled_from(SAMPLINGS))
@example(scheduler="kl_optimal", steps=1, kind="eps")      # NaN sigmas (0/0): refused, naming the fix
@example(scheduler="kl_optimal", steps=1, kind="flow")
@example(scheduler="kl_optimal", steps=1, kind="flux-1.15")
@example(scheduler="beta", steps=1000, kind="flux-3.0")
def test_every_scheduler_schedule_is_checked(samplings, pack_error, scheduler, steps, kind):
    import comfy.samplers
    schedule = host.pack_submodule("inversion.schedule")
    ms, family = samplings[kind]
    sig = comfy.samplers.calculate_sigmas(ms, scheduler, steps).cpu().float()
    source = f"the {scheduler} scheduler at {steps} steps"
    try:
        s = schedule.check_sampling_sigmas(sig, family=family, source=source)
    except pack_error as e:
        assert str(e).startswith(source) and ("scheduler" in str(e) or "steps" in str(e)), str(e)
        assert not (torch.isfinite(sig).all() and (sig[:-1] > sig[1:]).all() and (sig >= 0).all()
                    and (family != "flow" or float(sig.max()) <= 1 + 1e-5)), "a valid schedule was refused"
        return
    assert torch.isfinite(s).all() and (s[:-1] > s[1:]).all() and (s >= 0).all() and s.numel() >= 2
    assert family != "flow" or float(s.max()) <= 1 + 1e-5


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(scheduler=st.sampled_from(["kl_optimal", "beta", "linear_quadratic", "karras", "exponential", "ddim_uniform"]),
       steps=st.sampled_from([1, 2, 3]), family=st.sampled_from(["eps", "v", "flow"]),
       method=st.sampled_from(["ddim", "implicit", "exact"]))
def test_real_inversions_over_schedulers_error_or_finite(scheduler, steps, family, method):
    p = prompt(inv={"scheduler": scheduler, "steps": steps, "method": method}, model={"family": family})
    r = host.run(p, expect_success=False)
    if r.success:
        assert _finite(r.outputs("inv")[0]["samples"]) and _finite(r.outputs("s")[0]["samples"])
    else:
        e = r.error()
        assert e["exception_type"].endswith(ERR) and e["exception_message"].startswith("DDIM Invert: "), e
