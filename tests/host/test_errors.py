"""Bad inputs: the pack's own error ("<Node>: <what is wrong>; <the fix>"), raised before any model evaluation,
with no input mutated.

Every case is reached by the pack's check, not by ComfyUI's: prompts use values that pass ComfyUI's widget
validation (``run_error`` asserts that they do); where the widget limits would reject a value first, the node's
``execute`` is called directly, as another node pack or a script would.
"""
from __future__ import annotations

import math

import pytest
import torch

from ddiminv_dev import host
from ddiminv_dev.prompts import hard_prompt as prompt

INV, SMP = "DDIM Invert", "Inverted-Latent Sampler"


def node(name):
    return host.boot().NODE_CLASS_MAPPINGS[name]


@pytest.fixture
def direct(hard, pack_error):
    """``direct(**overrides)``: DDIMInvert.execute on hardening inputs, expecting the pack's error; returns the
    message (it must start with "DDIM Invert: ")."""
    def call(*words, model=None, **kw):
        m = model or hard.hard_model("eps")
        args = dict(model=m, positive=hard.hard_cond(0.5), negative=hard.hard_cond(0.0),
                    latent=hard.hard_latent(), steps=4, cfg=1.0, scheduler="ddim_uniform", method="ddim")
        args.update(kw)
        with pytest.raises(pack_error) as e:
            node("DDIMInvert").execute(**args)
        msg = str(e.value)
        assert type(e.value) is pack_error and msg.startswith(INV + ": "), msg
        for w in words:
            assert w.lower() in msg.lower(), (w, msg)
        assert m.model.diffusion_model.calls == 0, "the model was evaluated before the input error"
        return msg
    return call


def expect(run_error, calls, assert_unchanged, p, where, display, *words, evaluated=False):
    msg, r = run_error(p, where, display, *words)
    if not evaluated:
        assert calls(r) == 0, "the model was evaluated before the input error"
    assert_unchanged(r, p)
    return msg


# --------------------------------------------------------------------------------------- baseline
def test_valid_prompt_runs_and_mutates_nothing(calls, assert_unchanged):
    p = prompt(lat={"batch": 2, "mask": "bhw"}, cond={"batch": 2})
    r = host.run(p)
    assert torch.isfinite(r.outputs("s")[0]["samples"]).all()
    assert calls(r) > 0
    assert_unchanged(r, p)


# --------------------------------------------------------------------------------------- steps / ranges
@pytest.mark.parametrize("steps", [0, -3])
def test_steps_below_one(direct, steps):
    direct("steps must be >= 1", f"got {steps}", steps=steps)


@pytest.mark.parametrize("start,end,words", [
    (3, 2, ("start_step", "end_step", "lower start_step")),
    (4, 10000, ("start_step", "steps=4")),
    (50, 10000, ("start_step",)),
    (2, 2, ("start_step", "end_step")),
])
def test_start_end_step_out_of_range_or_inverted(run_error, calls, assert_unchanged, start, end, words):
    expect(run_error, calls, assert_unchanged, prompt(inv={"start_step": start, "end_step": end}), "inv", INV, *words)


def test_start_and_end_step_beyond_the_widget_limits(direct, hard):
    direct("start_step must be >= 0", start_step=-1)
    direct("start_step (0) must be smaller than end_step (0", end_step=0)
    # an end_step past the schedule is capped at the last step: the same result as the default
    args = dict(positive=hard.hard_cond(0.5), negative=hard.hard_cond(0.0), latent=hard.hard_latent(), steps=4,
                cfg=1.0, scheduler="ddim_uniform", method="ddim")
    a = node("DDIMInvert").execute(model=hard.hard_model("eps"), end_step=20000, **args).args[0]["samples"]
    b = node("DDIMInvert").execute(model=hard.hard_model("eps"), **args).args[0]["samples"]
    assert torch.equal(a, b)


def test_sampler_start_step_out_of_range(run_error):
    msg, _ = run_error(prompt(sampler={"start_step": 4}), "s", SMP, "start_step", "[0, 3]", "4-step")
    assert "choose a step inside" in msg


# --------------------------------------------------------------------------------------- SIGMAS
@pytest.mark.parametrize("kind,words", [
    ("ascending", ("sigmas", "ascending", "FlipSigmas")),
    ("duplicate", ("sigmas", "strictly decreasing", "duplicated")),
    ("unsorted", ("sigmas", "strictly decreasing")),
    ("nan", ("sigmas", "NaN", "scheduler node")),
    ("inf", ("sigmas", "Inf")),
    ("negative", ("sigmas", "negative")),
    ("single", ("sigmas", "at least 2")),
    ("empty", ("sigmas", "at least 2")),
])
def test_invalid_sigmas(run_error, calls, assert_unchanged, kind, words):
    expect(run_error, calls, assert_unchanged, prompt(sigmas=kind), "inv", INV, *words)


def test_core_flipped_sigmas_rejected(run_error, calls, assert_unchanged):
    p = prompt()
    p["bs"] = {"class_type": "BasicScheduler",
               "inputs": {"model": ["m", 0], "scheduler": "normal", "steps": 4, "denoise": 1.0}}
    p["flip"] = {"class_type": "FlipSigmas", "inputs": {"sigmas": ["bs", 0]}}
    p["inv"]["inputs"]["sigmas"] = ["flip", 0]
    expect(run_error, calls, assert_unchanged, p, "inv", INV, "sigmas", "FlipSigmas")


def test_core_basic_scheduler_sigmas_accepted(assert_unchanged):
    p = prompt()
    p["bs"] = {"class_type": "BasicScheduler",
               "inputs": {"model": ["m", 0], "scheduler": "normal", "steps": 4, "denoise": 1.0}}
    p["inv"]["inputs"]["sigmas"] = ["bs", 0]
    r = host.run(p)
    assert torch.isfinite(r.outputs("s")[0]["samples"]).all()
    assert_unchanged(r, p)


@pytest.mark.parametrize("method", ["ddim", "implicit"])
@pytest.mark.parametrize("model", [{"class_type": "TestHardModel", "inputs": {"family": "eps", "latent": "sd15"}},
                                   {"class_type": "TestHardModel", "inputs": {"family": "flow", "latent": "sd15"}},
                                   {"class_type": "TestTinyModel", "inputs": {"family": "flux", "seed": 0}}],
                         ids=["sd15", "sd3-flow", "flux"])
def test_a_scheduler_that_makes_nan_sigmas_is_an_error_naming_the_fix(run_error, model, method):
    """kl_optimal at 1 step divides 0 by 0: the scheduler's own output is checked like a connected schedule
    (it used to give a NaN latent with status success (ddim) or a ValueError (implicit))."""
    p = prompt(inv={"scheduler": "kl_optimal", "steps": 1, "method": method})
    p["m"] = model
    if model["class_type"] == "TestTinyModel":
        p["l"]["inputs"]["channels"] = 16
        p["c"] = {"class_type": "TestTinyConditioning", "inputs": {"family": "flux", "seed": 0}}
        p["n"] = {"class_type": "TestTinyConditioning", "inputs": {"family": "flux", "seed": 1}}
    run_error(p, "inv", INV, "the kl_optimal scheduler at 1 step", "NaN or Inf", "another scheduler or more steps")


def test_flow_model_refuses_sigmas_above_one(run_error, calls, assert_unchanged):
    p = prompt(model={"family": "flow"}, sigmas="valid")        # 10 .. 0: an EPS-style schedule
    expect(run_error, calls, assert_unchanged, p, "inv", INV, "reaches sigma 10", "flow model", "ends at 1")
    ok = prompt(model={"family": "flow"}, sigmas="unit")        # 1 .. 0 runs
    assert torch.isfinite(host.run(ok).outputs("s")[0]["samples"]).all()


# --------------------------------------------------------------------------------------- method options
@pytest.mark.parametrize("tol", [0.0, -1e-6])
def test_tolerance_not_positive(direct, tol):
    direct("tolerance must be a number > 0", method="implicit", tolerance=tol)


def test_tolerance_nan_passes_widget_check_but_pack_rejects(run_error, calls, assert_unchanged):
    expect(run_error, calls, assert_unchanged, prompt(inv={"method": "implicit", "tolerance": float("nan")}),
           "inv", INV, "tolerance", "> 0")


@pytest.mark.parametrize("iters", [0, -5])
def test_max_iters_below_one(direct, iters):
    direct("max_iters must be >= 1", method="implicit", max_iters=iters)


@pytest.mark.parametrize("field", ["damping", "gamma"])
def test_damping_gamma_nan(run_error, calls, assert_unchanged, field):
    expect(run_error, calls, assert_unchanged, prompt(inv={"method": "implicit", field: float("nan")}), "inv", INV,
           field, "(0, 1]")


@pytest.mark.parametrize("where", ["inv", "s"])
def test_cfg_nan_is_an_error_not_a_nan_latent(run_error, calls, assert_unchanged, where):
    # NaN passes ComfyUI's min/max widget check (every comparison is False): the pack must reject it
    p = prompt(inv={"cfg": float("nan")} if where == "inv" else None,
               sampler={"cfg": float("nan")} if where == "s" else None)
    expect(run_error, calls, assert_unchanged, p, where, INV if where == "inv" else SMP, "cfg", "finite",
           evaluated=where == "s")


def test_cfg_inf_rejected(direct):
    direct("cfg must be a finite number", cfg=float("inf"))


def test_exact_with_a_small_gamma_is_an_error_not_a_nan_latent(run_error):
    """gamma 0.05 at 50 steps: BDIA divides by gamma every step, the states overflow to Inf/NaN."""
    p = prompt(inv={"method": "exact", "gamma": 0.05, "steps": 50})
    run_error(p, "inv", INV, "NaN or Inf", "method exact", "50 steps", "cfg 1", "gamma 0.05", "use gamma 1.0")


# --------------------------------------------------------------------------------------- latent vs model
def test_latent_channels_vs_model_format(run_error, calls, assert_unchanged):
    # an SD1.5 4-channel latent into a model with a 16-channel (SD3) latent format
    msg = expect(run_error, calls, assert_unchanged, prompt(model={"latent": "sd3"}), "inv", INV, "latent",
                 "4 channels", "16", "VAE")
    assert "SD3" in msg


def test_16_channel_latent_into_4_channel_model(run_error, calls, assert_unchanged):
    expect(run_error, calls, assert_unchanged, prompt(lat={"channels": 16}), "inv", INV, "latent", "16 channels",
           "uses 4", "VAE")


def test_sd15_latent_into_tiny_flow_model(run_error, assert_unchanged):
    p = prompt()
    p["m"] = {"class_type": "TestTinyModel", "inputs": {"family": "flow", "seed": 0}}
    _, r = run_error(p, "inv", INV, "4 channels", "16")
    assert_unchanged(r, p)


def test_a_video_shaped_latent_into_an_image_model(run_error, calls, assert_unchanged):
    """A 5-D [B,C,T,H,W] latent used to reach ComfyUI and crash there (IndexError in common_dit.py)."""
    expect(run_error, calls, assert_unchanged, prompt(lat={"frames": 2}), "inv", INV, "shape (1, 4, 2, 8, 8)",
           "image model", "[B,C,H,W]")


def test_trajectory_into_model_with_other_latent_shape(run_error):
    p = prompt(sampler_model={"family": "eps", "latent": "sd3"})
    msg, r = run_error(p, "s", SMP, "trajectory", "4 channels", "16", "model that made the trajectory")
    assert r.outputs("m2")[0].model.diffusion_model.calls == 0


# --------------------------------------------------------------------------------------- conditioning
@pytest.mark.parametrize("cond_batch,lat_batch,ok",
                         [(1, 3, True), (3, 3, True), (2, 3, False), (3, 1, False), (2, 4, False)])
def test_conditioning_batch_vs_latent_batch(run_error, calls, assert_unchanged, cond_batch, lat_batch, ok):
    p = prompt(lat={"batch": lat_batch}, cond={"batch": cond_batch})
    if ok:
        r = host.run(p)
        out = r.outputs("s")[0]["samples"]
        assert out.shape[0] == lat_batch and torch.isfinite(out).all()
        assert_unchanged(r, p)
    else:
        expect(run_error, calls, assert_unchanged, p, "inv", INV, "positive", f"batch {cond_batch}",
               f"batch {lat_batch}")


@pytest.mark.parametrize("which", ["c", "n"])
def test_empty_conditioning(run_error, calls, assert_unchanged, which):
    name = "positive" if which == "c" else "negative"
    p = prompt(cond={"empty": True} if which == "c" else None, neg={"empty": True} if which == "n" else None)
    expect(run_error, calls, assert_unchanged, p, "inv", INV, name, "empty", "CONDITIONING")


def test_nan_conditioning(run_error, calls, assert_unchanged):
    expect(run_error, calls, assert_unchanged, prompt(cond={"poison": True}), "inv", INV, "positive", "NaN")


@pytest.mark.parametrize("pooled,words", [("nan", ("positive.pooled_output", "NaN")),
                                          ("wrong_batch", ("pooled_output", "batch 2", "batch 1"))])
def test_conditioning_extras_are_checked(run_error, calls, assert_unchanged, pooled, words):
    expect(run_error, calls, assert_unchanged, prompt(cond={"pooled": pooled}), "inv", INV, *words)


def test_sampler_conditioning_batch_mismatch(run_error):
    p = prompt(lat={"batch": 2})
    p["c3"] = {"class_type": "TestHardCond", "inputs": {"mean": 0.5, "batch": 3, "empty": False, "poison": False}}
    p["s"]["inputs"]["positive"] = ["c3", 0]
    run_error(p, "s", SMP, "positive", "batch 3", "batch 2")


# --------------------------------------------------------------------------------------- non-finite data, masks
@pytest.mark.parametrize("poison", ["nan", "inf", "neg_inf", "all_nan"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_non_finite_latent_is_a_clear_error(run_error, calls, assert_unchanged, poison, dtype):
    expect(run_error, calls, assert_unchanged, prompt(lat={"poison": poison, "dtype": dtype}), "inv", INV,
           "latent", "NaN or Inf")


@pytest.mark.parametrize("mask,words", [("nan", ("noise_mask", "NaN")), ("one_d", ("noise_mask", "[H,W]"))])
def test_bad_noise_mask_is_a_clear_error(run_error, calls, assert_unchanged, mask, words):
    expect(run_error, calls, assert_unchanged, prompt(lat={"mask": mask}), "inv", INV, *words,
           "Set Latent Noise Mask")


@pytest.mark.parametrize("mask,clamped,span", [("above_one", "ones", "[2, 2]"), ("negative", "zeros", "[-1.5, -1.5]")])
def test_mask_values_outside_0_1_are_clamped_and_reported(hard, assert_unchanged, mask, clamped, span):
    """A mask of 2.0 or -1.5 used to scale the result 160x: it is clamped to [0, 1] and the node says so. The
    trajectory records the clamped mask; one from another pack with such values is clamped by the sampler."""
    p = prompt(lat={"mask": mask}, sampler={"cfg": 3.0})
    r = host.run(p)
    assert_unchanged(r, p)
    text = "\n".join(r.ui("inv")["text"])
    assert "WARNING" in text and span in text and "clamped to [0, 1]" in text, text
    want = host.run(prompt(lat={"mask": clamped}, sampler={"cfg": 3.0})).outputs("s")[0]["samples"]
    assert torch.equal(r.outputs("s")[0]["samples"], want)
    traj = r.outputs("inv")[2]
    raw = hard.hard_latent(mask=mask)["noise_mask"]
    out = node("DDIMInvSampler").execute(model=hard.hard_model("eps"), positive=hard.hard_cond(0.5),
                                         negative=hard.hard_cond(0.0), trajectory=traj.with_(noise_mask=raw), cfg=3.0)
    assert torch.equal(out.args[0]["samples"], want)
    text = "\n".join(out.ui["text"]) if isinstance(out.ui, dict) else str(out.ui.as_dict())
    assert "WARNING" in text and span in text and "clamped" in text, text


def test_huge_latent_values_stay_finite(assert_unchanged):
    """A float32 latent scaled by 1e30 is finite: it inverts and regenerates to finite values."""
    p = prompt(lat={"poison": "huge"})
    r = host.run(p)
    for where in ("inv", "s"):
        assert torch.isfinite(r.outputs(where)[0]["samples"]).all(), where
    assert_unchanged(r, p)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_latents_are_not_mutated_and_output_float(assert_unchanged, dtype):
    p = prompt(lat={"dtype": dtype, "mask": "b1hw", "batch": 2})
    r = host.run(p)
    out = r.outputs("s")[0]["samples"]
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and not math.isnan(float(out.sum()))
    assert_unchanged(r, p)


# --------------------------------------------------------------------------------------- trajectories from elsewhere
def test_a_malformed_trajectory_from_another_pack_is_refused(hard, pack_error):
    res = host.run(prompt())
    traj = res.outputs("inv")[2]
    cls = node("DDIMInvSampler")
    m, c, n = hard.hard_model("eps"), hard.hard_cond(0.5), hard.hard_cond(0.0)
    bad = {
        "NaN states": traj.with_(states=traj.states * float("nan")),
        "extra": traj.with_(extra=["not", "a", "dict"]),
        "fingerprint": traj.with_(extra={"guidance_fingerprint": 42}),
        "sigmas": traj.with_(sigmas=traj.sigmas.flip(0)),
        "mask": traj.with_(noise_mask=torch.full((1, 8, 8), float("nan"))),
        "method": traj.with_(method="edict"),
    }
    for name, t in bad.items():
        with pytest.raises(pack_error) as e:
            cls.execute(model=m, positive=c, negative=n, trajectory=t, cfg=1.0)
        assert str(e.value).startswith(SMP + ": ") and "trajectory" in str(e.value), (name, str(e.value))
    assert m.model.diffusion_model.calls == 0


# --------------------------------------------------------------------------------------- the sampler's choices
@pytest.mark.parametrize("field,value,words", [
    ("correction", "pinned", ("correction 'pinned' is unknown", "none, source_drift")),
    ("exact_replay", "fast", ("exact_replay 'fast' is unknown", "auto, bdia, ddim")),
    ("null_text", "on", ("null_text 'on' is unknown", "auto, off")),
])
def test_sampler_choices_outside_the_lists(hard, pack_error, field, value, words):
    """Another pack or a script can pass any string (ComfyUI's combo check only guards the UI)."""
    res = host.run(prompt())
    m = hard.hard_model("eps")
    with pytest.raises(pack_error) as e:
        node("DDIMInvSampler").execute(model=m, positive=hard.hard_cond(0.5), negative=hard.hard_cond(0.0),
                                       trajectory=res.outputs("inv")[2], cfg=1.0, **{field: value})
    msg = str(e.value)
    assert type(e.value) is pack_error and msg.startswith(SMP + ": "), msg
    assert all(w in msg for w in words), msg
    assert m.model.diffusion_model.calls == 0


# --------------------------------------------------------------------------------------- null-text schedules
def test_a_schedule_null_text_cannot_bind_to_steps(run_error):
    """A pivot inverted on a zero-terminal-SNR model with karras sigmas (485 and 4519, both above the plain
    model's sigma_max 14.6), given to Null-Text Inversion with the plain model: its percent scale cannot give
    step 1 a range of its own. The pack's error names the step and the fix (was a bare ValueError)."""
    p = {
        "m": {"class_type": "TestTinyModel", "inputs": {"family": "eps", "seed": 0}},
        "z": {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["m", 0], "sampling": "eps", "zsnr": True}},
        "c": {"class_type": "TestTinyConditioning", "inputs": {"family": "eps", "seed": 0}},
        "n": {"class_type": "TestTinyConditioning", "inputs": {"family": "eps", "seed": 1}},
        "e": {"class_type": "TestRandomLatent", "inputs": {"family": "eps", "batch": 1, "height": 32, "width": 32,
                                                           "seed": 0}},
        "inv": {"class_type": "DDIMInvert", "inputs": {
            "model": ["z", 0], "positive": ["c", 0], "negative": ["n", 0], "latent": ["e", 0], "steps": 4,
            "cfg": 1.0, "scheduler": "karras", "method": "ddim"}},
        "nt": {"class_type": "DDIMInvNullText", "inputs": {
            "model": ["m", 0], "positive": ["c", 0], "negative": ["n", 0], "trajectory": ["inv", 2], "cfg": 7.5,
            "iterations": 1}},
        "o": {"class_type": "PreviewAny", "inputs": {"source": ["nt", 0]}},
    }
    run_error(p, "nt", "Null-Text Inversion", "step 1", "sigma 485.5", "cannot be bound",
              "use the model that made the trajectory")
