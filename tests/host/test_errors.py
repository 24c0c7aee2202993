"""Bad inputs through the real executor: the pack's own clear error (naming the input and the fix), raised
before any model evaluation, and no input mutated. Where ComfyUI's widget validation (min/max) rejects a
value first, that rejection is asserted instead."""
from __future__ import annotations

import math

import pytest
import torch

from ddiminv_dev import host

ERR = "InversionInputError"
LATENT = dict(batch=1, channels=4, height=8, width=8, seed=0, dtype="float32", poison="none", mask="none", scale=1.0)
COND = dict(mean=0.5, batch=1, empty=False, poison=False)
NEG = dict(mean=0.0, batch=1, empty=False, poison=False)


@pytest.fixture(scope="module")
def hard():
    host.boot()
    from ddiminv_dev.fixtures import hardening_nodes as nodes_hardening
    return nodes_hardening


def prompt(inv=None, lat=None, cond=None, neg=None, model=None, sampler=None, sigmas=None, sampler_model=None):
    p = {
        "m": {"class_type": "TestHardModel", "inputs": {"family": "eps", "latent": "sd15"}},
        "c": {"class_type": "TestHardCond", "inputs": dict(COND)},
        "n": {"class_type": "TestHardCond", "inputs": dict(NEG)},
        "l": {"class_type": "TestHardLatent", "inputs": dict(LATENT)},
        "inv": {"class_type": "DDIMInvert", "inputs": {
            "model": ["m", 0], "positive": ["c", 0], "negative": ["n", 0], "latent": ["l", 0],
            "steps": 4, "cfg": 1.0, "scheduler": "ddim_uniform", "method": "ddim"}},
        "s": {"class_type": "DDIMInvSampler", "inputs": {
            "model": ["m", 0], "positive": ["c", 0], "negative": ["n", 0], "trajectory": ["inv", 2], "cfg": 1.0}},
        "out": {"class_type": "TestHardSink", "inputs": {"samples": ["s", 0]}},
        "out_inv": {"class_type": "TestHardSink", "inputs": {"samples": ["inv", 0]}},
    }
    for key, upd in (("inv", inv), ("l", lat), ("c", cond), ("n", neg), ("m", model), ("s", sampler)):
        if upd:
            p[key]["inputs"].update(upd)
    if sigmas is not None:
        p["sg"] = {"class_type": "TestHardSigmas", "inputs": {"kind": sigmas, "steps": 4}}
        p["inv"]["inputs"]["sigmas"] = ["sg", 0]
    if sampler_model is not None:
        p["m2"] = {"class_type": "TestHardModel", "inputs": sampler_model}
        p["s"]["inputs"]["model"] = ["m2", 0]
    return p


def assert_unchanged(hard, r, p):
    """The cached outputs of the source nodes equal a fresh build of the same inputs (nothing mutated)."""
    want = hard.hard_latent(**p["l"]["inputs"])
    got = r.outputs("l")[0]
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) or (
            torch.equal(torch.isnan(got[k]), torch.isnan(want[k]))
            and torch.equal(torch.nan_to_num(got[k]), torch.nan_to_num(want[k]))), f"latent[{k!r}] was mutated"
    for node in ("c", "n"):
        want_c = hard.hard_cond(**p[node]["inputs"])
        got_c = r.outputs(node)[0]
        assert len(got_c) == len(want_c)
        for (gt, gd), (wt, wd) in zip(got_c, want_c):
            assert torch.equal(torch.nan_to_num(gt), torch.nan_to_num(wt)), f"conditioning {node} was mutated"
            assert gd == wd


def model_calls(r, node="m") -> int:
    return r.outputs(node)[0].model.diffusion_model.calls


def expect_error(hard, p, node, *words, model_node="m", calls=0):
    ok = host.validate(p)
    assert ok[0], f"ComfyUI validation rejected the prompt: {ok[1]} {ok[3]}"
    r = host.run(p, expect_success=False)
    assert not r.success
    e = r.error()
    assert e is not None and e["node_id"] == node, e
    assert e["exception_type"].endswith(ERR), e["exception_type"]
    msg = e["exception_message"]
    for w in words:
        assert w.lower() in msg.lower(), f"{w!r} not in {msg!r}"
    if calls is not None:
        assert model_calls(r, model_node) == calls, "the model was evaluated before the input error"
    assert_unchanged(hard, r, p)
    return msg


def expect_rejected(p, node, input_name):
    ok = host.validate(p)
    assert not ok[0]
    assert node in ok[3], ok[3]
    details = " ".join(str(e.get("details", "")) + str(e.get("extra_info", {}).get("input_name", ""))
                       for e in ok[3][node]["errors"])
    assert input_name in details, ok[3]


def expect_pack_error_or_rejected(hard, p, node, input_name, *words):
    if host.validate(p)[0]:
        expect_error(hard, p, node, input_name, *words)
    else:
        expect_rejected(p, node, input_name)


# --------------------------------------------------------------------------------------- baseline
def test_valid_prompt_runs_and_mutates_nothing(hard):
    p = prompt(lat={"batch": 2, "mask": "bhw"}, cond={"batch": 2})
    r = host.run(p)
    assert torch.isfinite(r.outputs("s")[0]["samples"]).all()
    assert model_calls(r) > 0
    assert_unchanged(hard, r, p)


# --------------------------------------------------------------------------------------- steps / ranges
@pytest.mark.parametrize("steps", [0, -3])
def test_steps_below_one(hard, steps):
    expect_pack_error_or_rejected(hard, prompt(inv={"steps": steps}), "inv", "steps")


@pytest.mark.parametrize("start,end,words", [
    (3, 2, ("start_step", "end_step")),
    (4, 10000, ("start_step", "steps=4")),
    (50, 10000, ("start_step",)),
    (2, 2, ("start_step", "end_step")),
])
def test_start_end_step_out_of_range_or_inverted(hard, start, end, words):
    expect_error(hard, prompt(inv={"start_step": start, "end_step": end}), "inv", *words)


@pytest.mark.parametrize("start,end", [(-1, 10000), (0, 0), (0, 20000)])
def test_start_end_step_beyond_widget_limits(hard, start, end):
    p = prompt(inv={"start_step": start, "end_step": end})
    expect_pack_error_or_rejected(hard, p, "inv", "start_step" if start < 0 else "end_step")


def test_sampler_start_step_out_of_range(hard):
    msg = expect_error(hard, prompt(sampler={"start_step": 4}), "s", "start_step", "[0, 3]", calls=None)
    assert "4-step" in msg


# --------------------------------------------------------------------------------------- SIGMAS
@pytest.mark.parametrize("kind,words", [
    ("ascending", ("sigmas", "ascending", "FlipSigmas")),
    ("duplicate", ("sigmas", "strictly decreasing", "duplicated")),
    ("unsorted", ("sigmas", "strictly decreasing")),
    ("nan", ("sigmas", "NaN")),
    ("inf", ("sigmas", "Inf")),
    ("negative", ("sigmas", "negative")),
    ("single", ("sigmas", "at least 2")),
    ("empty", ("sigmas", "at least 2")),
])
def test_invalid_sigmas(hard, kind, words):
    expect_error(hard, prompt(sigmas=kind), "inv", *words)


def test_core_flipped_sigmas_rejected(hard):
    p = prompt()
    p["bs"] = {"class_type": "BasicScheduler", "inputs": {"model": ["m", 0], "scheduler": "normal", "steps": 4, "denoise": 1.0}}
    p["flip"] = {"class_type": "FlipSigmas", "inputs": {"sigmas": ["bs", 0]}}
    p["inv"]["inputs"]["sigmas"] = ["flip", 0]
    expect_error(hard, p, "inv", "sigmas", "FlipSigmas")


def test_core_basic_scheduler_sigmas_accepted(hard):
    p = prompt()
    p["bs"] = {"class_type": "BasicScheduler", "inputs": {"model": ["m", 0], "scheduler": "normal", "steps": 4, "denoise": 1.0}}
    p["inv"]["inputs"]["sigmas"] = ["bs", 0]
    r = host.run(p)
    assert torch.isfinite(r.outputs("s")[0]["samples"]).all()
    assert_unchanged(hard, r, p)


# --------------------------------------------------------------------------------------- method options
@pytest.mark.parametrize("tol", [0.0, -1e-6])
def test_tolerance_not_positive(hard, tol):
    expect_pack_error_or_rejected(hard, prompt(inv={"method": "implicit", "tolerance": tol}), "inv", "tolerance")


def test_tolerance_nan_passes_widget_check_but_pack_rejects(hard):
    expect_error(hard, prompt(inv={"method": "implicit", "tolerance": float("nan")}), "inv", "tolerance", "> 0")


@pytest.mark.parametrize("iters", [0, -5])
def test_max_iters_below_one(hard, iters):
    expect_pack_error_or_rejected(hard, prompt(inv={"method": "implicit", "max_iters": iters}), "inv", "max_iters")


@pytest.mark.parametrize("field", ["damping", "gamma"])
def test_damping_gamma_nan(hard, field):
    expect_error(hard, prompt(inv={"method": "implicit", field: float("nan")}), "inv", field)


@pytest.mark.parametrize("node", ["inv", "s"])
@pytest.mark.parametrize("value", [float("nan")])
def test_cfg_nan_is_an_error_not_a_nan_latent(hard, node, value):
    # NaN passes ComfyUI's min/max widget check (every comparison is False): the pack must reject it
    p = prompt(inv={"cfg": value} if node == "inv" else None, sampler={"cfg": value} if node == "s" else None)
    expect_error(hard, p, node, "cfg", "finite", calls=None if node == "s" else 0)


def test_cfg_inf_rejected(hard):
    expect_pack_error_or_rejected(hard, prompt(inv={"cfg": float("inf")}), "inv", "cfg")


# --------------------------------------------------------------------------------------- latent vs model
def test_latent_channels_vs_model_format(hard):
    # an SD1.5 4-channel latent into a model with a 16-channel (SD3) latent format
    msg = expect_error(hard, prompt(model={"latent": "sd3"}), "inv", "latent", "4 channels", "16", "VAE")
    assert "SD3" in msg


def test_16_channel_latent_into_4_channel_model(hard):
    expect_error(hard, prompt(lat={"channels": 16}), "inv", "latent", "16 channels", "uses 4", "VAE")


def test_sd15_latent_into_tiny_flow_model(hard):
    p = prompt()
    p["m"] = {"class_type": "TestTinyModel", "inputs": {"family": "flow", "seed": 0}}
    ok = host.validate(p)
    assert ok[0], ok
    r = host.run(p, expect_success=False)
    e = r.error()
    assert not r.success and e["node_id"] == "inv" and e["exception_type"].endswith(ERR)
    assert "4 channels" in e["exception_message"] and "16" in e["exception_message"]
    assert_unchanged(hard, r, p)


def test_trajectory_into_model_with_other_latent_shape(hard):
    p = prompt(sampler_model={"family": "eps", "latent": "sd3"})
    msg = expect_error(hard, p, "s", "trajectory", "4 channels", "16", model_node="m2")
    assert "model that made the trajectory" in msg


@pytest.mark.parametrize("shape", [(1, 4, 8), (1, 1, 4, 2, 8, 8)])
def test_latent_rank(hard, shape):
    # a latent of the wrong rank, built in-process (no node makes one), goes through the pack's check
    nodes = host.boot()
    mod = host.pack_submodule("nodes._comfy")
    model = hard.hard_model("eps")
    with pytest.raises(mod.InversionInputError, match=r"\[B,C,H,W\]"):
        mod.check_latent(model, torch.zeros(shape))
    assert nodes is not None


# --------------------------------------------------------------------------------------- conditioning
@pytest.mark.parametrize("cond_batch,lat_batch,ok", [(1, 3, True), (3, 3, True), (2, 3, False), (3, 1, False), (2, 4, False)])
def test_conditioning_batch_vs_latent_batch(hard, cond_batch, lat_batch, ok):
    p = prompt(lat={"batch": lat_batch}, cond={"batch": cond_batch})
    if ok:
        r = host.run(p)
        out = r.outputs("s")[0]["samples"]
        assert out.shape[0] == lat_batch and torch.isfinite(out).all()
        assert_unchanged(hard, r, p)
    else:
        expect_error(hard, p, "inv", "positive", f"batch {cond_batch}", f"batch {lat_batch}")


@pytest.mark.parametrize("which", ["c", "n"])
def test_empty_conditioning(hard, which):
    name = "positive" if which == "c" else "negative"
    p = prompt(cond={"empty": True} if which == "c" else None, neg={"empty": True} if which == "n" else None)
    expect_error(hard, p, "inv", name, "empty", "CONDITIONING")


def test_nan_conditioning(hard):
    expect_error(hard, prompt(cond={"poison": True}), "inv", "positive", "NaN")


def test_sampler_conditioning_batch_mismatch(hard):
    p = prompt(lat={"batch": 2})
    p["c3"] = {"class_type": "TestHardCond", "inputs": dict(COND, batch=3)}
    p["s"]["inputs"]["positive"] = ["c3", 0]
    r = host.run(p, expect_success=False)
    e = r.error()
    assert not r.success and e["node_id"] == "s" and e["exception_type"].endswith(ERR)
    assert "positive" in e["exception_message"] and "batch 3" in e["exception_message"]


# --------------------------------------------------------------------------------------- non-finite data
@pytest.mark.parametrize("poison", ["nan", "inf", "neg_inf", "all_nan"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_non_finite_latent_is_a_clear_error(hard, poison, dtype):
    expect_error(hard, prompt(lat={"poison": poison, "dtype": dtype}), "inv", "latent", "NaN or Inf")


@pytest.mark.parametrize("mask", ["nan", "one_d"])
def test_bad_noise_mask_is_a_clear_error(hard, mask):
    p = prompt(lat={"mask": mask})
    ok = host.validate(p)
    assert ok[0]
    r = host.run(p, expect_success=False)
    e = r.error()
    assert not r.success, "a malformed noise_mask must not give a (NaN) latent"
    assert e["exception_type"].endswith(ERR), e
    assert "noise_mask" in e["exception_message"]
    assert_unchanged(hard, r, p)


def test_huge_latent_gives_finite_output_or_clear_error(hard):
    p = prompt(lat={"poison": "huge"})
    r = host.run(p, expect_success=False)
    if r.success:
        for node in ("inv", "s"):
            assert torch.isfinite(r.outputs(node)[0]["samples"]).all(), f"{node} output is not finite"
    else:
        assert r.error()["exception_type"].endswith(ERR)
    assert_unchanged(hard, r, p)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_latents_are_not_mutated_and_output_float(hard, dtype):
    p = prompt(lat={"dtype": dtype, "mask": "b1hw", "batch": 2})
    r = host.run(p)
    out = r.outputs("s")[0]["samples"]
    assert torch.isfinite(out).all() and not math.isnan(float(out.sum()))
    assert_unchanged(hard, r, p)
