"""Property tests through the real ComfyUI modules (hypothesis, derandomized).

1. DDIM Invert + Inverted-Latent Sampler, two strategies:
   * valid inputs (any family, method, replay, scheduler, eval_sigma, shape, batch, mask, latent dtype, prompt,
     cfg, start_step, correction): the prompt must run, with finite outputs, the implicit budget kept, nothing
     mutated, and a round trip (same prompt and cfg) within a per-method bound;
   * the same inputs with exactly one field made invalid: the prompt must fail in the node that reads that
     field, with the pack's error, "<Node>: ..." naming that field.
   Each valid-input test (one route and correction) counts what it drew and asserts that every example ran to
   its end and that every family (eps, v, flow) occurred; each invalid-field test (one field) runs two draws of
   every method and asserts that each reached the failure branch's checks.
2. Every schedule ComfyUI's schedulers make (schedulers x step counts 1-5, 50, 1000 x model samplings EPS, V,
   SD3-style flow and Flux at two shifts) either fails the pack's schedule check with a message naming the fix
   or is an invertible schedule; a few of them run through the real node and give finite latents.
"""
from __future__ import annotations

import copy
import math
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from ddiminv_dev import host
from ddiminv_dev.prompts import hard_prompt as prompt

ERR = "InversionInputError"
STEP_COUNTS = [1, 2, 3, 4, 5, 50, 1000]
SAMPLINGS = ["eps", "v", "flow", "flux-1.15", "flux-3.0"]
DISPLAY = {"inv": "DDIM Invert", "s": "Inverted-Latent Sampler"}
# round-trip bound (relative latent error, same prompt and cfg as the inversion) per route, from the largest error
# measured over the valid strategy's draws, which change with this file's source (derandomize hashes it): 1.5x
# over 8 draws did not hold. source_drift pins every stored state (any method: measured 1.29e-6) and the BDIA
# replay is exact (7.99e-7), both to float32 rounding: 5e-6 leaves ~4x. The implicit inverse stops at its
# tolerance (1e-6 here), which a large step amplifies: 1.47e-6 over the draws, 2.08e-5 in a case hypothesis
# found (2 steps, normal scheduler, a 2x2 latent) when the old 1.2e-6 bar failed; 1e-4 leaves 5x.
ROUND_TRIP = {"source_drift": 5e-6, "exact/bdia": 5e-6, "implicit": 1e-4}
# plain ddim at 2-6 steps on this prior, and the ddim replay of an exact trajectory, are far from the source
# (errors up to 4.3 measured, and a replay returning zeros has error 1.0): no bound on the error can tell a broken
# replay, so those routes are held to a DDIM replay written in the test (ddim_reference_gap): measured <= 4.7e-8
# over 40 draws, the same with MKL_ENABLE_INSTRUCTIONS=SSE4_2 (float32 chains); the bar leaves 20x
REPLAY_GAP_BAR = 1e-6


ROUTES = ("ddim", "implicit", "exact/bdia", "exact/ddim")      # method / replay the sampler runs
CORRECTIONS = ("none", "source_drift")


@st.composite
def valid_cases(draw, route=None, correction=None):
    batch = draw(st.integers(1, 2))
    steps = draw(st.integers(2, 6))
    route = route or draw(st.sampled_from(ROUTES))
    method = route.split("/")[0]
    family = draw(st.sampled_from(["eps", "v", "flow"]))
    cfg = draw(st.sampled_from([1.0, 1.0, 2.5]))
    lat = dict(batch=batch, channels=4, height=draw(st.integers(2, 8)), width=draw(st.integers(2, 8)),
               seed=draw(st.integers(0, 1000)), dtype=draw(st.sampled_from(["float32", "float32", "float16",
                                                                              "bfloat16"])),
               poison="none", mask=draw(st.sampled_from(["none", "none", "hw", "bhw", "b1hw", "ones"])),
               scale=draw(st.sampled_from([1.0, 0.5, 2.0])), frames=0)
    inv = dict(steps=steps, cfg=cfg, method=method, start_step=0, end_step=10000,
               scheduler=draw(st.sampled_from(["ddim_uniform", "normal", "karras", "simple", "beta",
                                               "sgm_uniform", "exponential", "linear_quadratic"])),
               eval_sigma=draw(st.sampled_from(["auto", "current", "destination"])), tolerance=1e-6,
               max_iters=draw(st.sampled_from([30, 10])), damping=1.0, gamma=1.0)
    cond = dict(mean=draw(st.sampled_from([0.5, -1.0, 0.0])), batch=draw(st.sampled_from([1, batch])), empty=False,
                poison=False, pooled=draw(st.sampled_from(["none", "finite"])))
    replay = {"exact/bdia": draw(st.sampled_from(["auto", "bdia"])), "exact/ddim": "ddim"}.get(route, "auto")
    sampler = dict(cfg=cfg, start_step=draw(st.integers(0, steps - 2)),
                   correction=correction or draw(st.sampled_from(CORRECTIONS)), exact_replay=replay)
    return dict(lat=lat, inv=inv, cond=cond, neg={}, sampler=sampler, model={"family": family}, sigmas=None,
                sampler_model=None)


def _nan(case):
    return float("nan")


# field -> (node that reads it, words its message must contain, how to make it invalid)
MUTATIONS = {
    "lat.poison": ("inv", ("latent", "NaN"), lambda c: "nan"),
    "lat.channels": ("inv", ("latent", "16 channels"), lambda c: 16),
    "lat.mask": ("inv", ("noise_mask",), lambda c: "nan"),
    "cond.empty": ("inv", ("positive", "empty"), lambda c: True),
    "cond.poison": ("inv", ("positive", "NaN"), lambda c: True),
    "cond.batch": ("inv", ("positive", "batch"), lambda c: c["lat"]["batch"] + 1),
    "neg.empty": ("inv", ("negative", "empty"), lambda c: True),
    "inv.cfg": ("inv", ("cfg",), _nan),
    "inv.tolerance": ("inv", ("tolerance",), _nan),
    "inv.damping": ("inv", ("damping",), _nan),
    "inv.gamma": ("inv", ("gamma",), _nan),
    "inv.start_step": ("inv", ("start_step",), lambda c: c["inv"]["steps"]),
    "sigmas": ("inv", ("sigmas",), lambda c: "ascending"),
    "sampler.cfg": ("s", ("cfg",), _nan),
    "sampler.start_step": ("s", ("start_step",), lambda c: c["inv"]["steps"]),
    "sampler_model": ("s", ("model that made the trajectory",), lambda c: {"family": c["model"]["family"],
                                                                           "latent": "sd3"}),
}


def mutate(case: dict, field: str) -> dict:
    """A copy of ``case`` with exactly ``field`` made invalid."""
    bad = copy.deepcopy(case)
    value = MUTATIONS[field][2](case)
    if "." in field:
        group, key = field.split(".")
        bad[group][key] = value
    else:
        bad[field] = value
    return bad


def flatten(case) -> dict:
    out = {}
    for group, v in case.items():
        if isinstance(v, dict) and group not in ("sampler_model",):
            out.update({f"{group}.{k}": x for k, x in v.items()})
        else:
            out[group] = v
    return out


def build(case) -> dict:
    return prompt(inv=case["inv"], lat=case["lat"], cond=case["cond"], neg=case["neg"] or None,
                  sampler=case["sampler"], model=case["model"], sigmas=case["sigmas"],
                  sampler_model=case["sampler_model"], sigma_steps=case["inv"]["steps"])


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.float()).all())


def round_trip_error(r) -> float:
    src = r.outputs("l")[0]["samples"].double()
    rec = r.outputs("s")[0]["samples"].double()
    return float((rec - src).norm() / src.norm())


def ddim_reference_gap(r, case) -> float:
    """||sampler output - a DDIM replay written here|| / ||replay||, both in model space: from the trajectory's
    stored state at start_step, x <- (t/s) x + (1 - t/s) D(x, s) down the trajectory's sigmas, D the guided model
    of the same (model, positive, negative, cfg) through the pack's CFGGuider plumbing (nodes._comfy.run_guided),
    so only the replay's own loop is independent: a replay returning zeros (or skipping a step) has gap ~1."""
    C, checks = host.pack_submodule("nodes._comfy"), host.pack_submodule("inversion.checks")
    model, traj = r.outputs("m")[0], r.outputs("inv")[2]
    j0, shape = traj.steps - case["sampler"]["start_step"], tuple(traj.states.shape[1:])
    sig = [float(v) for v in traj.sigmas.tolist()]
    mask = checks.check_mask(traj.noise_mask, shape, "mask")[0]
    m = None if mask is None else C.prepare_mask(mask, shape, model).float()

    def loop(model_fn, device, progress):
        x = traj.states[j0].to(device, torch.float32)
        for i in range(j0, 0, -1):
            d, ratio = model_fn(x, sig[i]).to(torch.float32), sig[i - 1] / sig[i]
            x = d if sig[i - 1] == 0 else x * ratio + d * (1.0 - ratio)
            if m is not None:  # outside the mask, pinned to the stored state
                x = x * m.to(device) + traj.states[i - 1].to(device, torch.float32) * (1 - m.to(device))
        return x

    ref = C.run_guided(model, r.outputs("c")[0], r.outputs("n")[0], case["sampler"]["cfg"], shape,
                       traj.sampling_sigmas(), loop, steps=j0, label="reference").double()
    out = C.to_model_space(model, r.outputs("s")[0]["samples"]).double()
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("correction", CORRECTIONS)
@pytest.mark.parametrize("route", ROUTES)
def test_fuzz_valid_inputs_run_and_round_trip(assert_unchanged, route, correction):
    seen, worst = Counter(), [0.0]
    kind = "source_drift" if correction == "source_drift" else route

    @settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(case=valid_cases(route=route, correction=correction))
    def check(case):
        p = build(case)
        ok = host.validate(p)
        assert ok[0], ("ComfyUI rejected a valid prompt", ok[1], ok[3], case)
        r = host.run(p, expect_success=False)
        assert r.success, (r.error_text(), case)
        inv_out = r.outputs("inv")
        traj = inv_out[2]
        assert traj.method == route.split("/")[0]
        assert _finite(inv_out[0]["samples"]) and _finite(traj.states) and _finite(traj.noise)
        if traj.method == "implicit":     # the budget holds: per sample at most 2 x steps x max_iters evaluations
            assert max(traj.options["evaluations_per_sample"]) <= 2 * traj.steps * traj.options["max_iters"]
        out = r.outputs("s")[0]["samples"]
        assert out.shape == inv_out[0]["samples"].shape and _finite(out)
        text = "".join(r.ui("s").get("text", []))
        assert f"replay {'bdia' if route == 'exact/bdia' else 'ddim'}" in text, text
        e = round_trip_error(r)
        worst[0] = max(worst[0], e)
        if kind in ROUND_TRIP:
            assert e <= ROUND_TRIP[kind], (kind, e, case)
        else:
            assert math.isfinite(e) and (gap := ddim_reference_gap(r, case)) <= REPLAY_GAP_BAR, (kind, gap, case)
        assert_unchanged(r, p)
        for label in (f"family={case['model']['family']}", f"mask={case['lat']['mask'] != 'none'}",
                      f"dtype={case['lat']['dtype']}", f"start_step={case['sampler']['start_step'] > 0}"):
            seen[label] += 1
            event(label)

    check()
    print(f"FUZZ {route} {correction}: worst round trip {worst[0]:.3g}; drew {dict(seen)}")
    assert sum(seen.values()) == 4 * 8, seen          # every example ran to the end (none was filtered out)
    assert {k for k in seen if k.startswith("family=")} == {"family=eps", "family=v", "family=flow"}, seen


@pytest.mark.parametrize("field", sorted(MUTATIONS))
def test_fuzz_one_invalid_field_is_named(assert_unchanged, field):
    seen = Counter()
    node, words, _ = MUTATIONS[field]

    def check(case):
        p = build(mutate(case, field))
        ok = host.validate(p)
        assert ok[0], ("ComfyUI's validation rejected the prompt before the pack's check", field, ok[3])
        r = host.run(p, expect_success=False)
        assert not r.success, (field, case)
        e = r.error()
        assert e is not None and e["node_id"] == node, (field, e)
        assert e["exception_type"].endswith(ERR), (field, e["exception_type"], e["exception_message"])
        msg = e["exception_message"]
        assert msg.startswith(DISPLAY[node] + ": "), (field, msg)
        for w in words:
            assert w.lower() in msg.lower(), (field, w, msg)
        assert_unchanged(r, p)
        for label in (f"method={case['inv']['method']}", f"family={case['model']['family']}"):
            seen[label] += 1
            event(label)

    for route in ("ddim", "implicit", "exact/bdia"):  # every method meets every invalid field: 2 draws each
        settings(max_examples=2, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))(
            given(case=valid_cases(route=route))(check))()
    assert {k for k in seen if k.startswith("method=")} == {"method=ddim", "method=implicit", "method=exact"}, seen
    assert sum(seen.values()) == 2 * 3 * 2, seen      # every example reached the failure branch's checks


@pytest.mark.parametrize("field", sorted(MUTATIONS))
def test_a_mutated_case_differs_from_its_valid_case_in_exactly_one_field(field):
    @settings(max_examples=20, derandomize=True)
    @given(valid=valid_cases())
    def check(valid):
        a, b = flatten(valid), flatten(mutate(valid, field))
        diff = [k for k in set(a) | set(b) if not (a.get(k) == b.get(k) or (isinstance(a.get(k), float) and
                                                                           isinstance(b.get(k), float) and
                                                                           math.isnan(a[k]) and math.isnan(b[k])))]
        assert diff == [field], (field, diff)
    check()


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
