"""Null-Text Inversion on the paths users reach beyond the basic one, through the real executor on the tiny
SD1.5-architecture model (and the tiny SDXL / SD3 ones where a mismatch needs them): a batch of two, a pivot
from a partial inversion, a masked latent, a pivot inverted at cfg != 1, an early stop nothing misses, a
model that differs from the trajectory's, and every way the optimisation itself can fail (as the pack's one
error, "Null-Text Inversion: <what>; <fix>").

Few steps and iterations (8 steps x 4 iterations, 32 x 32 pixels) keep each run well under a second."""
from __future__ import annotations

import math

import pytest
import torch

from ddiminv_dev import host

ERR = "InversionInputError"
DISPLAY = "Null-Text Inversion"
STEPS, ITERS, LR = 8, 4, 0.1


def prompt(fam="eps", steps=STEPS, batch=1, inv=None, nt=None, sched=None):
    """source (the model's own cfg-1 sample) -> DDIM Invert (cfg 1) -> Null-Text Inversion (cfg 7.5) ->
    Inverted-Latent Sampler with the source prompt ("ours"), and the same sampler on the plain pivot ("plain")."""
    sched = sched or ("simple" if fam == "flow" else "ddim_uniform")
    p = {
        "m": {"class_type": "TestTinyModel", "inputs": {"family": fam, "seed": 0}},
        "c": {"class_type": "TestTinyConditioning", "inputs": {"family": fam, "seed": 0}},
        "n": {"class_type": "TestTinyConditioning", "inputs": {"family": fam, "seed": 1, "near_seed": 0,
                                                               "distance": 0.3}},
        "e": {"class_type": "TestRandomLatent", "inputs": {"family": fam, "batch": batch, "height": 32,
                                                           "width": 32, "seed": 0}},
        "src": {"class_type": "KSampler", "inputs": {
            "model": ["m", 0], "seed": 5, "steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": sched,
            "positive": ["c", 0], "negative": ["n", 0], "latent_image": ["e", 0], "denoise": 1.0}},
        "inv": {"class_type": "DDIMInvert", "inputs": {
            "model": ["m", 0], "positive": ["c", 0], "negative": ["n", 0], "latent": ["src", 0], "steps": steps,
            "cfg": 1.0, "scheduler": sched, "method": "ddim", **(inv or {})}},
        "nt": {"class_type": "DDIMInvNullText", "inputs": {
            "model": ["m", 0], "positive": ["c", 0], "negative": ["n", 0], "trajectory": ["inv", 2], "cfg": 7.5,
            "mode": "null_text", "iterations": ITERS, "learning_rate": LR, "early_stop": 1e-5, **(nt or {})}},
        "ours": {"class_type": "DDIMInvSampler", "inputs": {
            "model": ["m", 0], "positive": ["c", 0], "negative": ["n", 0], "trajectory": ["nt", 1], "cfg": 7.5}},
        "plain": {"class_type": "DDIMInvSampler", "inputs": {
            "model": ["m", 0], "positive": ["c", 0], "negative": ["n", 0], "trajectory": ["inv", 2], "cfg": 7.5}},
    }
    for k in ("ours", "plain"):
        p[k + "_out"] = {"class_type": "PreviewAny", "inputs": {"source": [k, 0]}}
    return p


def text(res, node="nt") -> str:
    return "\n".join(res.ui(node).get("text", []))


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def source(res):
    return res.outputs("src")[0]["samples"]


def node_cls():
    return host.pack_submodule("nodes.nulltext").DDIMInvNullText


def pack_error():
    return host.pack_submodule("inversion.errors").InversionInputError


# ---------------------------------------------------------------------------------------------- batch
def test_a_batch_of_two_gives_each_image_its_own_negative_as_a_single_run_would():
    """One embedding row per image, optimised independently: each row is the run of that image alone, and
    the sampler with the batch's negative reconstructs both images. Not bit-equal here (it is on the oracle,
    tests/unit/test_nulltext.py): the UNet's batched float32 arithmetic differs from the single run's in the
    last bits, which Adam's normalised steps and the early-stop decisions amplify. Measured: embeddings within
    1.7% (relative), reconstructions within 2.2e-4; a shared or swapped row is ~100% off."""
    p = prompt(batch=2)
    for b in (0, 1):
        p[f"one{b}"] = {"class_type": "LatentFromBatch", "inputs": {"samples": ["src", 0], "batch_index": b,
                                                                     "length": 1}}
        p[f"inv{b}"] = dict(p["inv"], inputs=dict(p["inv"]["inputs"], latent=[f"one{b}", 0]))
        p[f"nt{b}"] = dict(p["nt"], inputs=dict(p["nt"]["inputs"], trajectory=[f"inv{b}", 2]))
        p[f"nt{b}_out"] = {"class_type": "PreviewAny", "inputs": {"source": [f"nt{b}", 0]}}
    res = host.run(p)
    neg = res.outputs("nt")[0]
    assert len(neg) == STEPS and all(t.shape[0] == 2 for t, _ in neg)
    info = res.outputs("nt")[1].optimized_negative
    assert info["states"].shape[:2] == (STEPS + 1, 2)
    for b in (0, 1):
        single = res.outputs(f"nt{b}")[0]
        worst = max(rel(neg[k][0][b], single[k][0][0]) for k in range(STEPS))
        x1 = res.outputs(f"nt{b}")[1].optimized_negative["states"][0][0]
        print(f"\n[batch] row {b}: embeddings {worst:.2e}, reconstruction {rel(info['states'][0][b], x1):.2e}")
        assert worst <= 0.025 and rel(info["states"][0][b], x1) <= 4e-4, (b, worst)
    src, ours, plain = source(res), res.outputs("ours")[0]["samples"], res.outputs("plain")[0]["samples"]
    for b in (0, 1):
        assert rel(ours[b], src[b]) * 5 <= rel(plain[b], src[b]), (b, rel(ours[b], src[b]), rel(plain[b], src[b]))


# ---------------------------------------------------------------------------------------------- partial pivot
def test_a_pivot_from_a_partial_inversion_is_retraced_by_core_ksampler_advanced():
    """DDIM Invert with start_step 3 / end_step 7 of 10 (an SDEdit-style segment): the negative's ranges bind
    to the segment's steps, so core KSamplerAdvanced run over the same steps (start_at_step 3, end_at_step 7,
    leftover noise kept) reproduces the Inverted-Latent Sampler, and both land on the source latent."""
    p = prompt(steps=10, inv={"start_step": 3, "end_step": 7})
    p["core"] = {"class_type": "KSamplerAdvanced", "inputs": {
        "model": ["m", 0], "add_noise": "disable", "noise_seed": 0, "steps": 10, "cfg": 7.5, "sampler_name": "euler",
        "scheduler": "ddim_uniform", "positive": ["c", 0], "negative": ["nt", 0], "latent_image": ["inv", 0],
        "start_at_step": 3, "end_at_step": 7, "return_with_leftover_noise": "enable"}}
    p["core_out"] = {"class_type": "PreviewAny", "inputs": {"source": ["core", 0]}}
    res = host.run(p)
    traj = res.outputs("nt")[1]
    assert traj.steps == 4 and float(traj.sigmas[0]) > 0                # a segment that ends above sigma 0
    assert len(res.outputs("nt")[0]) == 4
    src, ours = source(res), res.outputs("ours")[0]["samples"]
    core, plain = res.outputs("core")[0]["samples"], res.outputs("plain")[0]["samples"]
    assert rel(core, ours) <= 1e-4, rel(core, ours)
    print(f"\n[partial pivot] ours {rel(ours, src):.2e} plain {rel(plain, src):.2e}")
    assert rel(ours, src) * 5 <= rel(plain, src), (rel(ours, src), rel(plain, src))


# ---------------------------------------------------------------------------------------------- mask
def test_a_masked_latent_optimises_only_the_regenerated_region():
    """A noise_mask recorded by DDIM Invert: the loss counts only the masked region and the outside follows
    the source's states, as the Inverted-Latent Sampler does with that mask, so the sampler's output keeps the
    outside exactly and reconstructs the inside."""
    p = prompt()
    p["mask"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 32, "height": 32}}
    p["box"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 16, "height": 32}}
    p["cm"] = {"class_type": "MaskComposite", "inputs": {"destination": ["mask", 0], "source": ["box", 0], "x": 0,
                                                         "y": 0, "operation": "add"}}
    p["ml"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["src", 0], "mask": ["cm", 0]}}
    p["inv"]["inputs"]["latent"] = ["ml", 0]
    res = host.run(p)
    t = text(res)
    assert "masked: the loss counts only the region the mask regenerates" in t, t
    info = res.outputs("nt")[1].optimized_negative
    pivot = res.outputs("inv")[2].states
    inside = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    inside[..., :2] = True
    out = (~inside).expand_as(pivot[0])
    for i in range(STEPS + 1):                                        # the outside is the pivot at every level
        assert torch.equal(info["states"][i][out], pivot[i][out]), i
    src, ours, plain = source(res), res.outputs("ours")[0]["samples"], res.outputs("plain")[0]["samples"]
    assert torch.allclose(ours[out], src[out], atol=1e-6)
    ins = inside.expand_as(src)
    assert rel(ours[ins], src[ins]) * 5 <= rel(plain[ins], src[ins]), (rel(ours[ins], src[ins]),
                                                                         rel(plain[ins], src[ins]))


# ---------------------------------------------------------------------------------------------- notes
def test_a_pivot_inverted_at_another_cfg_gets_a_note_and_a_cfg_1_pivot_none():
    res = host.run(prompt(inv={"cfg": 3.0}))
    t = text(res)
    assert "note: the pivot was inverted at cfg 3, not 1" in t and "invert at cfg 1" in t, t
    # null-text still retraces that pivot: the sampler at 7.5 lands near the source
    assert rel(res.outputs("ours")[0]["samples"], source(res)) * 5 <= rel(res.outputs("plain")[0]["samples"],
                                                                          source(res))
    plain = host.run(prompt())
    assert "pivot was inverted at cfg" not in text(plain) and "WARNING" not in text(plain), text(plain)


def test_an_early_stop_nothing_misses_warns_that_nothing_was_optimised():
    p = prompt(nt={"early_stop": 1.0})
    p["nt"]["inputs"]["negative"] = ["c", 0]   # the source prompt as the start: the cfg-1 path, a small loss
    res = host.run(p)
    t = text(res)
    info = res.outputs("nt")[1].optimized_negative
    assert info["backward"] == 0 and "0 backward passes" in t
    assert "WARNING: nothing was optimised" in t and "lower early_stop" in t, t
    # and the negative is the input one at every step
    n = res.outputs("c")[0][0][0]
    assert all(torch.equal(e, n) for e, _ in res.outputs("nt")[0])


# ---------------------------------------------------------------------------------------------- model mismatch
def test_another_model_family_is_the_same_warning_in_null_text_and_the_sampler():
    """One policy across the nodes: a model whose family / sampling / latent format differ from the
    trajectory's (but whose latents have the same shape) is a WARNING in both nodes' text, from the one
    ``compatibility_warnings``; only a latent the model cannot take is an error (next test). Here: an SD3
    flow trajectory, and the same network patched to EPS sampling (ModelSamplingDiscrete)."""
    p = prompt("flow", steps=4)
    p["m2"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["m", 0], "sampling": "eps",
                                                                  "zsnr": False}}
    p["nt"]["inputs"]["model"] = ["m2", 0]
    p["ours"]["inputs"]["model"] = ["m2", 0]
    res = host.run(p)
    t_nt, t_s = text(res), text(res, "ours")
    for t in (t_nt, t_s):
        assert "WARNING: model family differs: trajectory flow, model vp" in t, t
        assert "WARNING: model sampling differs" in t, t


def test_another_latent_format_warns_and_another_channel_count_is_refused(pack_error):
    """An SD1.5 trajectory with the tiny SDXL model (4 channels too, another latent format): a warning; with
    the tiny SD3 model (16 channels): the error naming the fix."""
    res = host.run(prompt())
    traj = res.outputs("inv")[2]
    xl = host.run({"m": {"class_type": "TestTinyModel", "inputs": {"family": "sdxl", "seed": 0}},
                   "c": {"class_type": "TestTinyConditioning", "inputs": {"family": "sdxl", "seed": 0}},
                   "o": {"class_type": "PreviewAny", "inputs": {"source": ["c", 0]}},
                   "o2": {"class_type": "PreviewAny", "inputs": {"source": ["m", 0]}}})
    model, cond = xl.outputs("m")[0], xl.outputs("c")[0]
    out = node_cls().execute(model, cond, cond, traj, 7.5, iterations=1)
    t = "\n".join(out.ui.as_dict()["text"])
    assert "WARNING: latent format differs: trajectory SD15, model SDXL" in t, t
    sd3 = host.run({"m": {"class_type": "TestTinyModel", "inputs": {"family": "flow", "seed": 0}},
                    "c": {"class_type": "TestTinyConditioning", "inputs": {"family": "flow", "seed": 0}},
                    "o": {"class_type": "PreviewAny", "inputs": {"source": ["c", 0]}},
                    "o2": {"class_type": "PreviewAny", "inputs": {"source": ["m", 0]}}})
    with pytest.raises(pack_error) as e:
        node_cls().execute(sd3.outputs("m")[0], sd3.outputs("c")[0], sd3.outputs("c")[0], traj, 7.5)
    msg = str(e.value)
    assert msg.startswith(DISPLAY + ": ") and "4 channels" in msg and "; connect the model that made" in msg, msg


# ---------------------------------------------------------------------------------------------- errors
def _wrapped(model, fn):
    m = model.clone()
    m.set_model_unet_function_wrapper(fn)
    return m


def _real_inputs():
    res = host.run(prompt(steps=4))
    return res.outputs("m")[0], res.outputs("c")[0], res.outputs("n")[0], res.outputs("inv")[2]


def test_a_non_finite_loss_is_the_packs_error_naming_the_step_and_the_fix(pack_error):
    model, pos, neg, traj = _real_inputs()

    def overflow(apply, args):   # a model whose prediction overflows (e.g. an fp16 model that saturates)
        return apply(args["input"], args["timestep"], **args["c"]) * math.inf

    with pytest.raises(pack_error) as e:
        node_cls().execute(_wrapped(model, overflow), pos, neg, traj, 7.5, iterations=2)
    msg = str(e.value)
    assert type(e.value) is pack_error
    assert msg.startswith(DISPLAY + ": the loss of sample(s) [0] is not finite at sampling step 0"), msg
    assert "; run the model in float32, or lower learning_rate" in msg


def test_inference_tensors_in_the_negative_branch_are_the_packs_error_saying_what_to_do(pack_error):
    """A model patch that makes a tensor under torch.inference_mode() inside the model call: autograd cannot
    save it for the backward pass. The node's own weights are handled (autograd_view); this is reported."""
    model, pos, neg, traj = _real_inputs()

    def inference_scale(apply, args):
        out = apply(args["input"], args["timestep"], **args["c"])
        with torch.inference_mode():
            w = torch.ones(1, device=out.device, dtype=out.dtype)
        return out * w

    with pytest.raises(pack_error) as e:
        node_cls().execute(_wrapped(model, inference_scale), pos, neg, traj, 7.5, iterations=2)
    msg = str(e.value)
    assert type(e.value) is pack_error and msg.startswith(DISPLAY + ": the negative branch was computed with "
                                                          "tensors created under torch.inference_mode()"), msg
    assert "; the model must run with normal tensors" in msg


def test_a_schedule_that_cannot_be_bound_to_ranges_is_the_packs_error(pack_error):
    """An SD1.5 trajectory (sigmas up to 14.6) with the same network patched to flow sampling (sigmas <= 1):
    no start/end percent range of this model reaches those sigmas, so core samplers could never meet the
    steps' negatives. Refused before any optimisation, naming the fix."""
    model, pos, neg, traj = _real_inputs()
    p = {"m": {"class_type": "TestTinyModel", "inputs": {"family": "eps", "seed": 0}},
         "m2": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["m", 0], "shift": 3.0}},
         "o": {"class_type": "PreviewAny", "inputs": {"source": ["m2", 0]}}}
    flow_model = host.run(p).outputs("m2")[0]
    calls = []

    def count(apply, args):
        calls.append(1)
        return apply(args["input"], args["timestep"], **args["c"])

    with pytest.raises(pack_error) as e:
        node_cls().execute(_wrapped(flow_model, count), pos, neg, traj, 7.5, iterations=1)
    msg = str(e.value)
    assert msg.startswith(DISPLAY + ": the schedule's step 0 (sigma ") and "cannot be bound" in msg, msg
    assert "; use the model that made the trajectory" in msg and calls == []
