"""DDIM Invert paths users reach that had no test (issue 19): the implicit method's text when steps are left
unsolved or end just above the tolerance, and the NOISE output given a latent of another size."""
from __future__ import annotations

from ddiminv_dev import host


def _implicit(**kw):
    inv = {"model": ["model", 0], "positive": ["cond", 0], "negative": ["cond", 0], "latent": ["lat", 0],
           "steps": 6, "cfg": 1.0, "scheduler": "ddim_uniform", "method": "implicit", **kw}
    return {"model": {"class_type": "TestGMMModel", "inputs": {"family": "eps", "seed": 0}},
            "cond": {"class_type": "TestGMMCond", "inputs": {"subset": "0,1,2"}},
            "lat": {"class_type": "TestGMMLatent", "inputs": {"comps": "0,1,2", "seed": 0, "sample_seed": 1}},
            "inv": {"class_type": "DDIMInvert", "inputs": inv},
            "o": {"class_type": "PreviewAny", "inputs": {"source": ["inv", 0]}}}


def _text(res) -> str:
    return "\n".join(res.ui("inv").get("text", []))


def test_implicit_steps_left_unsolved_are_counted_in_the_text_with_what_to_do():
    """One evaluation per step and no restart cannot solve a step (residual 0.31 against 1e-6): the text says
    how many steps are unsolved, out of how many, and what to change."""
    res = host.run(_implicit(max_iters=1, restarts=0))
    traj = res.outputs("inv")[2]
    o = traj.options
    assert o["steps_unsolved"] == traj.steps and traj.nfe == traj.steps
    t = _text(res)
    assert f"; {traj.steps} of {traj.steps} steps unsolved (residual above 10 x tolerance" in t, t
    assert "more restarts/max_iters" in t and f"max residual {o['max_residual']:.2g}" in t, t
    assert "within 10 x tolerance" not in t
    assert "the solver's budget is too small" in t and "cfg" not in t.split("unsolved")[1], t   # cfg 1: not cfg's fault
    guided = _text(host.run(_implicit(max_iters=1, restarts=0, cfg=7.5)))
    assert "unsolved (residual above 10 x tolerance: a strong cfg folds some steps" in guided, guided


def test_implicit_steps_just_above_the_tolerance_are_float32s_floor_not_unsolved():
    """A tolerance of 1e-7 is at float32's precision for these values: some steps end above it but within
    10 x, which the text reports as the precision floor, not as unsolved steps."""
    res = host.run(_implicit(tolerance=1e-7))
    o = res.outputs("inv")[2].options
    t = _text(res)
    assert o["steps_unsolved"] == 0 and o["steps_above_tolerance"] >= 1, o
    steps = res.outputs("inv")[2].steps
    assert f"; {o['steps_above_tolerance']} of {steps} steps ended within 10 x tolerance, at float32's" in t, t
    assert "unsolved" not in t
    clean = host.run(_implicit())                    # the default tolerance: nothing to report
    assert "unsolved" not in _text(clean) and "within 10 x" not in _text(clean)


def test_the_noise_output_given_a_latent_of_another_size_is_the_packs_error(run_error):
    """SamplerCustomAdvanced with DDIM Invert's NOISE and an empty latent of another size: the NOISE refuses
    it with the pack's error naming what to connect (not a shape error deep in the sampler)."""
    p = _implicit(method="ddim")
    p["empty"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    p["g"] = {"class_type": "CFGGuider", "inputs": {"model": ["model", 0], "positive": ["cond", 0],
                                                    "negative": ["cond", 0], "cfg": 1.0}}
    p["sch"] = {"class_type": "BasicScheduler", "inputs": {"model": ["model", 0], "scheduler": "ddim_uniform",
                                                           "steps": 6, "denoise": 1.0}}
    p["eul"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    p["s"] = {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["inv", 1], "guider": ["g", 0],
                                                                "sampler": ["eul", 0], "sigmas": ["sch", 0],
                                                                "latent_image": ["empty", 0]}}
    p["so"] = {"class_type": "PreviewAny", "inputs": {"source": ["s", 0]}}
    msg, _ = run_error(p, "s", "DDIM Invert (noise)", "the latent given to the sampler has shape (1, 4, 8, 8)",
                       "connect DDIM Invert's noise_latent")
    assert "; connect" in msg


def test_one_ddim_invert_probes_the_model_family_once(monkeypatch):
    """The family (its noise_scaling probe, the refusal and the untested-family check) is decided once per DDIM
    Invert call, not again for the schedule, the latent, the loop and the text (it was four times)."""
    C = host.pack_submodule("nodes._comfy")
    calls = []
    probe = C.noise_probe
    monkeypatch.setattr(C, "noise_probe", lambda model: calls.append(1) or probe(model))
    res = host.run(_implicit(method="ddim"))
    assert res.outputs("inv")[2].family == "vp" and len(calls) == 1, len(calls)
