"""Two experts (Wan 2.2 A14B) through DDIM Invert and the Inverted-Latent Sampler, VAE-less, on two differently
seeded tiny real Wan models. ComfyUI loads the A14B experts as ``WAN21_T2V`` (the same architecture as Wan 2.1
14B: 16-channel latent, flow sampling with shift 8), so the experts are two tiny WAN21_T2V instances.

* ``exact`` round-trips a clip across the switch (cfg 2: both CFG branches in every evaluation);
* the NOISE of a two-expert ``ddim`` inversion drives the standard Wan 2.2 workflow -- the high-noise half from
  the NOISE (SamplerCustomAdvanced on the first part of SplitSigmas, since KSamplerAdvanced draws its own
  noise) and the low-noise half a core ``KSamplerAdvanced`` with add_noise disabled from start_at_step = the
  switch -- and lands on our ddim replay;
* a mismatching pair is refused by the sampler with the fix."""
from __future__ import annotations

import pytest
import torch

from ddiminv_dev import host, tiny_families as tf

NAME = "WAN21_T2V"
STEPS = 6
CFG = 2.0
BOUNDARY = 0.875
SWITCH = 4          # 'simple' at 6 steps, shift 8: sigmas 1, .976, .941, .889 >= 0.875 > .8 (by hand)
EXACT_BAR = 1e-6    # exact: float64 recurrence, float32 latent in and out (measured: see the test's print)
CORE_GAP_BAR = 2e-5  # as test_families.py: float32 chains of core vs ours (measured: see the test's print)


def _base(method: str = "exact", high: bool = True, name: str = NAME) -> dict:
    p = {
        "lo": {"class_type": "TestFamilyModel", "inputs": {"name": name, "seed": 0}},
        "hi": {"class_type": "TestFamilyModel", "inputs": {"name": name, "seed": 5}},
        "c": {"class_type": "TestFamilyConditioning", "inputs": {"name": name, "seed": 1}},
        "n": {"class_type": "TestFamilyConditioning", "inputs": {"name": name, "seed": 2}},
        "l": {"class_type": "TestFamilyLatent", "inputs": {"name": name, "batch": 1, "seed": 3}},
        "inv": {"class_type": "DDIMInvert", "inputs": {
            "model": ["lo", 0], "positive": ["c", 0], "negative": ["n", 0], "latent": ["l", 0], "steps": STEPS,
            "cfg": CFG, "scheduler": "simple", "method": method}},
    }
    if high:
        p["inv"]["inputs"].update(model_high_noise=["hi", 0], boundary=BOUNDARY)
    return p


def _sampler(p: dict, key: str = "rec", model="lo", high="hi", **kw) -> dict:
    p[key] = {"class_type": "DDIMInvSampler", "inputs": {
        "model": [model, 0], "positive": ["c", 0], "negative": ["n", 0], "trajectory": ["inv", 2], "cfg": CFG, **kw}}
    if high:
        p[key]["inputs"]["model_high_noise"] = [high, 0]
    p[f"{key}_out"] = {"class_type": "TestLatentSink", "inputs": {"samples": [key, 0]}}
    return p


def _z(res, node: str, name: str = NAME) -> torch.Tensor:
    return tf.latent_format(name).process_in(res.outputs(node)[0]["samples"].double())


def _rel(res, node: str, src: str = "l", name: str = NAME) -> float:
    a, b = _z(res, node, name), _z(res, src, name)
    assert a.shape == b.shape and a.ndim == 5
    return float((a - b).norm() / b.norm())


def _text(res, node: str) -> str:
    return "\n".join(res.ui(node).get("text", []))


# WAN21_T2V: how ComfyUI loads each A14B expert; WAN22_T2V (the 5B's class, 48-channel Wan 2.2 latent, the same
# shift 8) as a second architecture with the same switch
@pytest.mark.parametrize("name", [NAME, "WAN22_T2V"])
def test_exact_round_trips_a_clip_across_the_switch(name):
    """exact with two experts reconstructs to float precision; the same trajectory replayed with one expert does
    not (the high-noise expert really ran the high-noise steps), and DDIM Invert names the switch step."""
    res = host.run(_sampler(_sampler(_base(name=name)), key="one", model="lo", high=None, exact_replay="bdia"),
                   expect_success=False)
    assert "model_high_noise is not connected" in res.error_text()   # the one-expert sampler is refused
    res = host.run(_sampler(_base(name=name), exact_replay="auto"))
    traj = res.outputs("inv")[2]
    assert traj.extra["experts"]["switch_step"] == SWITCH and traj.extra["experts"]["boundary"] == BOUNDARY
    assert "end_at_step / start_at_step 4" in _text(res, "inv")
    assert "exact_replay auto -> bdia" in _text(res, "rec")       # the recorded pair fingerprint matched
    err = _rel(res, "rec", name=name)
    one = host.run(_sampler(_base(high=False, name=name), high=None))
    moved = float((traj.noise - one.outputs("inv")[2].noise).norm() / traj.noise.norm())
    print(f"\nEXPERTS {name} exact: round trip {err:.3g} (one model: {_rel(one, 'rec', name=name):.3g}); noise "
          f"differs from one model's by {moved:.3g}")
    assert err <= EXACT_BAR, err
    assert moved > 1e-2


def _core(p: dict, switch: int = SWITCH, sfx: str = "") -> dict:
    """The standard Wan 2.2 two-sampler route from DDIM Invert's NOISE: high-noise SamplerCustomAdvanced on
    SplitSigmas' first part, then core KSamplerAdvanced (low-noise, add_noise disabled, start_at_step
    ``switch``); its nodes' keys end in ``sfx``."""
    p.update({
        "sch": {"class_type": "BasicScheduler", "inputs": {"model": ["lo", 0], "scheduler": "simple", "steps": STEPS,
                                                          "denoise": 1.0}},
        "split" + sfx: {"class_type": "SplitSigmas", "inputs": {"sigmas": ["sch", 0], "step": switch}},
        "eul": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "g": {"class_type": "CFGGuider", "inputs": {"model": ["hi", 0], "positive": ["c", 0], "negative": ["n", 0],
                                                     "cfg": CFG}},
        "sca" + sfx: {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["inv", 1], "guider": ["g", 0],
                                                                  "sampler": ["eul", 0], "sigmas": ["split" + sfx, 0],
                                                                  "latent_image": ["l", 0]}},
        "ksa" + sfx: {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["lo", 0], "add_noise": "disable", "noise_seed": 0, "steps": STEPS, "cfg": CFG,
            "sampler_name": "euler", "scheduler": "simple", "positive": ["c", 0], "negative": ["n", 0],
            "latent_image": ["sca" + sfx, 0], "start_at_step": switch, "end_at_step": 10000,
            "return_with_leftover_noise": "disable"}},
        "ksa_out" + sfx: {"class_type": "TestLatentSink", "inputs": {"samples": ["ksa" + sfx, 0]}},
    })
    return p


def test_noise_drives_the_two_sampler_workflow():
    """ddim with two experts: core's two-sampler route from the NOISE equals our two-expert ddim replay (float32
    chains), which itself is a (4-step-ddim-accurate) reconstruction."""
    res = host.run(_core(_sampler(_base(method="ddim"))))
    a, b = _z(res, "ksa"), _z(res, "rec")
    gap = float((a - b).norm() / b.norm())
    print(f"\nEXPERTS ddim: core two-sampler gap {gap:.3g}, round trip {_rel(res, 'rec'):.3g}")
    assert torch.isfinite(a).all() and gap <= CORE_GAP_BAR, gap


@pytest.mark.parametrize("model,high,words", [
    ("hi", "lo", "the experts are swapped"),
    ("lo", None, "model_high_noise is not connected"),
])
def test_a_mismatching_pair_is_refused(model, high, words):
    res = host.run(_sampler(_base(), model=model, high=high), expect_success=False)
    assert "Inverted-Latent Sampler: " in res.error_text() and words in res.error_text(), res.error_text()
    assert "; connect" in res.error_text()


def test_a_second_model_for_a_one_model_trajectory_is_refused():
    res = host.run(_sampler(_base(high=False), high="hi"), expect_success=False)
    assert "Inverted-Latent Sampler: model_high_noise is connected but the trajectory was inverted with one " \
           "model; disconnect model_high_noise" in res.error_text(), res.error_text()


def test_source_drift_pins_the_source_with_two_experts():
    """correction source_drift runs its own pass through both experts: at another cfg than the inversion's the
    replay drifts, the corrected one comes back to the source."""
    p = _sampler(_base(method="exact"), key="plain", cfg=3.0)
    p = _sampler(p, key="pinned", cfg=3.0, correction="source_drift")
    res = host.run(p)
    plain, pinned = _rel(res, "plain"), _rel(res, "pinned")
    print(f"\nEXPERTS cfg 3 replay of a cfg-2 inversion: plain {plain:.3g}, source_drift {pinned:.3g}")
    assert plain > 1e-2 and pinned <= 1e-5, (plain, pinned)


def test_null_text_refuses_a_two_expert_trajectory():
    p = _base(method="ddim")
    p["nt"] = {"class_type": "DDIMInvNullText", "inputs": {
        "model": ["lo", 0], "positive": ["c", 0], "negative": ["n", 0], "trajectory": ["inv", 2], "cfg": 3.0,
        "iterations": 1}}
    p["nt_out"] = {"class_type": "TestLatentSink", "inputs": {"samples": ["inv", 0]}}
    p["nt_sink"] = {"class_type": "DDIMInvSampler", "inputs": {
        "model": ["lo", 0], "positive": ["c", 0], "negative": ["nt", 0], "trajectory": ["nt", 1], "cfg": 3.0,
        "model_high_noise": ["hi", 0]}}
    p["nt_sink_out"] = {"class_type": "TestLatentSink", "inputs": {"samples": ["nt_sink", 0]}}
    res = host.run(p, expect_success=False)
    assert "Null-Text Inversion: the trajectory was inverted with two experts" in res.error_text(), \
        res.error_text()


def test_experts_on_different_schedules_are_refused():
    """Two experts must share the noise schedule (one schedule, one NOISE): another shift on one is refused."""
    p = _base()
    p["shifted"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["hi", 0], "shift": 3.0}}
    p["inv"]["inputs"]["model_high_noise"] = ["shifted", 0]
    p["inv_out"] = {"class_type": "TestLatentSink", "inputs": {"samples": ["inv", 0]}}
    res = host.run(p, expect_success=False)
    assert "DDIM Invert: the two experts sample on different noise schedules" in res.error_text(), res.error_text()
    assert "the same ModelSamplingSD3 shift" in res.error_text()


def test_progress_once_per_step_across_the_experts(hook):
    """Each step reports UI progress once, with a preview, whichever expert ran it: the high-noise expert's segment
    of the inversion does not report the replayed low-noise steps again (values 1..N over both guiders)."""
    res = host.run(_sampler(_base(method="ddim")))
    assert res.success
    inv = [c for c in hook if c[3] == "inv"]
    rec = [c for c in hook if c[3] == "rec"]
    assert [c[0] for c in inv] == list(range(1, STEPS + 1)) and all(c[1] == STEPS for c in inv)
    assert [c[0] for c in rec] == list(range(1, STEPS + 1))
    assert all(c[2] is not None for c in inv + rec)


# ------------------------------------------------------------------------------- the sampler's boundary (its switch)
# 'simple' at 6 steps, shift 8 (by hand, sigma = 8t / (1 + 7t)): 1, .9756, .9412, .8889, .8, .6154
B_EARLY = 0.95      # .9756 >= .95 > .9412: the switch at step 2 (the inversion's: 4)
B_SAME = 0.88       # .8889 >= .88 > .8: another sigma, the same switch step 4


def test_another_boundary_regenerates_with_that_switch():
    """A ddim trajectory inverted switching at step 4, regenerated with boundary 0.95: the sampler runs the
    low-noise expert from step 2 on, as the standard two-sampler workflow split at step 2 does (and not as the
    one split at 4); its text names the changed steps. Boundary 0.88 (the same step) is the default, bit for bit."""
    p = _sampler(_base(method="ddim"), key="early", boundary=B_EARLY)
    p = _sampler(_sampler(p, key="same", boundary=B_SAME), key="rec")
    res = host.run(_core(_core(p, switch=2, sfx="2"), switch=SWITCH))
    early = _z(res, "early")
    at2 = float((_z(res, "ksa2") - early).norm() / early.norm())
    at4 = float((_z(res, "ksa") - early).norm() / early.norm())
    print(f"\nEXPERTS boundary {B_EARLY}: vs the two-sampler route split at 2: {at2:.3g}, split at 4: {at4:.3g}")
    assert at2 <= CORE_GAP_BAR and at4 > 1e-3, (at2, at4)
    t = _text(res, "early")
    assert "boundary 0.95 switches at sampling step 2, the inversion at step 4: sampling steps 2-3 run the " \
           "low-noise expert where the inversion ran the high-noise one" in t and "does not reconstruct" in t, t
    assert "end_at_step / start_at_step 2" in t, t
    assert torch.equal(_z(res, "same"), _z(res, "rec"))
    assert "switches at the trajectory's step 4" in _text(res, "same")


def test_another_boundary_on_an_exact_trajectory():
    """On an exact trajectory: auto replays ddim when the switch moves onto a step the BDIA replay evaluates
    (bdia is refused when asked for), source_drift still reconstructs, and a start_step past the moved steps keeps
    the exact replay exact."""
    res = host.run(_sampler(_base(), boundary=B_EARLY, exact_replay="bdia"), expect_success=False)
    assert "Inverted-Latent Sampler: boundary 0.95 switches at sampling step 2, the inversion at step 4" \
           in res.error_text() and "; set boundary 0" in res.error_text(), res.error_text()
    p = _sampler(_base(), key="auto", boundary=B_EARLY)
    p = _sampler(p, key="drift", boundary=B_EARLY, correction="source_drift")     # auto: ddim + source_drift
    p = _sampler(p, key="bdrift", boundary=B_EARLY, correction="source_drift", exact_replay="bdia")
    p = _sampler(p, key="late", boundary=B_EARLY, start_step=3)     # bdia evaluates steps 4, 5 only
    res = host.run(p)
    assert "exact_replay auto -> ddim" in _text(res, "auto")
    assert "exact_replay auto -> bdia" in _text(res, "late") and "no step this replay evaluates" in _text(res, "late")
    drift, bdrift, late = _rel(res, "drift"), _rel(res, "bdrift"), _rel(res, "late")
    print(f"\nEXPERTS exact, boundary {B_EARLY}: auto (ddim) {_rel(res, 'auto'):.3g}, source_drift {drift:.3g} "
          f"(bdia {bdrift:.3g}), bdia from step 3 {late:.3g}")
    assert drift <= 1e-5 and bdrift <= 1e-5 and late <= EXACT_BAR, (drift, bdrift, late)
    assert "source_drift re-runs the stored states" in _text(res, "bdrift")
