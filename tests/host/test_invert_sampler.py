"""DDIM Invert + Inverted-Latent Sampler through the real ComfyUI executor (in-process host tier).

Fidelity on the analytic Gaussian-mixture MODEL (a real comfy BaseModel), compared case by case with core
FlipSigmas + SamplerCustom(euler) on the same model; interop with core samplers; batches, masks,
determinism and non-mutation; every family on tiny real architectures.
"""
import pytest
import torch

from ddiminv_dev import host

FAMILIES = ("eps", "v", "flow")


def sched_for(fam):
    return "simple" if fam == "flow" else "ddim_uniform"


def base(fam, comps="0,1,2", sample_seed=1):
    return {
        "m": {"class_type": "TestGMMModel", "inputs": {"family": fam, "seed": 4}},
        "pos": {"class_type": "TestGMMCond", "inputs": {"subset": "0,1,2"}},
        "neg": {"class_type": "TestGMMCond", "inputs": {"subset": ""}},
        "lat": {"class_type": "TestGMMLatent", "inputs": {"comps": comps, "seed": 4, "sample_seed": sample_seed}},
    }


def ours(fam, method, steps, cfg, **inv):
    p = base(fam)
    p["inv"] = {"class_type": "DDIMInvert", "inputs": {
        "model": ["m", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent": ["lat", 0],
        "steps": steps, "cfg": cfg, "scheduler": sched_for(fam), "method": method, **inv}}
    p["rec"] = {"class_type": "DDIMInvSampler", "inputs": {
        "model": ["m", 0], "positive": ["pos", 0], "negative": ["neg", 0], "trajectory": ["inv", 2], "cfg": cfg}}
    p["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["rec", 0]}}
    return p


def core_flip(fam, steps, cfg):
    p = base(fam)
    p.update({
        "sch": {"class_type": "BasicScheduler", "inputs": {"model": ["m", 0], "scheduler": sched_for(fam), "steps": steps, "denoise": 1.0}},
        "flip": {"class_type": "FlipSigmas", "inputs": {"sigmas": ["sch", 0]}},
        "eul": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "inv": {"class_type": "SamplerCustom", "inputs": {"model": ["m", 0], "add_noise": False, "noise_seed": 0, "cfg": cfg,
                "positive": ["pos", 0], "negative": ["neg", 0], "sampler": ["eul", 0], "sigmas": ["flip", 0], "latent_image": ["lat", 0]}},
        "rec": {"class_type": "SamplerCustom", "inputs": {"model": ["m", 0], "add_noise": False, "noise_seed": 0, "cfg": cfg,
                "positive": ["pos", 0], "negative": ["neg", 0], "sampler": ["eul", 0], "sigmas": ["sch", 0], "latent_image": ["inv", 0]}},
        "out": {"class_type": "PreviewAny", "inputs": {"source": ["rec", 0]}},
    })
    return p


def model_space(x):
    return x.float() * 0.18215          # SD15 latent format (the GMM model uses it)


def rel_err(res, src_node="lat", rec_node="rec"):
    src = model_space(res.outputs(src_node)[0]["samples"])
    rec = model_space(res.outputs(rec_node)[0]["samples"])
    if not torch.isfinite(rec).all():
        return float("inf")
    return float((rec - src).norm() / src.norm())


@pytest.fixture(scope="module", autouse=True)
def _boot():
    host.boot()


BARS = {  # (method, family-kind, steps) -> bar (the issue's figures)
    ("ddim", "vp", 50): 0.047, ("ddim", "vp", 10): 0.141, ("ddim", "flow", 50): 0.025, ("ddim", "flow", 10): 0.115,
    ("implicit", 50): 1e-4, ("implicit", 10): 1e-3, ("exact",): 1e-5,
}


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("cfg", [1.0, 7.5])
def test_fidelity_against_core_flipsigmas(fam, steps, cfg):
    core = rel_err(host.run(core_flip(fam, steps, cfg)))
    kind = "flow" if fam == "flow" else "vp"
    for method in ("ddim", "implicit", "exact"):
        res = host.run(ours(fam, method, steps, cfg))
        e = rel_err(res)
        traj = res.outputs("inv")[2]
        assert torch.isfinite(res.outputs("inv")[0]["samples"]).all()
        if method == "ddim":
            assert e <= BARS[("ddim", kind, steps)], (method, e)
            assert traj.nfe == steps
        elif method == "implicit":
            assert e <= BARS[("implicit", steps)], (method, e)
        else:
            assert e <= BARS[("exact",)] and traj.nfe == steps, (method, e)
        # at least as good as core FlipSigmas+SamplerCustom, and finite where it is not
        assert e <= core * 1.0001 or not (core < float("inf")), (method, e, core)
    if fam == "flow":
        assert core == float("inf")          # core FlipSigmas divides by 1 - sigma at sigma = 1


@pytest.mark.parametrize("fam", ["eps", "v"])
def test_noise_latent_regenerates_with_core_ksampler_advanced(fam):
    p = ours(fam, "ddim", 20, 1.0)
    p["ks"] = {"class_type": "KSamplerAdvanced", "inputs": {
        "model": ["m", 0], "add_noise": "disable", "noise_seed": 0, "steps": 20, "cfg": 1.0, "sampler_name": "euler",
        "scheduler": "ddim_uniform", "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["inv", 0],
        "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"}}
    p["out2"] = {"class_type": "PreviewAny", "inputs": {"source": ["ks", 0]}}
    res = host.run(p)
    a, b = res.outputs("ks")[0]["samples"], res.outputs("rec")[0]["samples"]
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    assert rel_err(res, rec_node="ks") <= 0.1          # 20 steps: between the 10- and 50-step bars


@pytest.mark.parametrize("fam", FAMILIES)
def test_noise_drives_core_sampler_custom_advanced(fam):
    # 10 steps: ddim_uniform makes exactly steps+1 sigmas there (for e.g. 12 it makes 14, which KSampler uses
    # whole and BasicScheduler truncates; DDIM Invert follows KSampler)
    p = ours(fam, "ddim", 10, 1.0)
    p.update({
        "sch": {"class_type": "BasicScheduler", "inputs": {"model": ["m", 0], "scheduler": sched_for(fam), "steps": 10, "denoise": 1.0}},
        "eul": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "g": {"class_type": "CFGGuider", "inputs": {"model": ["m", 0], "positive": ["pos", 0], "negative": ["neg", 0], "cfg": 1.0}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 3}},
        "sca": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["inv", 1], "guider": ["g", 0], "sampler": ["eul", 0],
                "sigmas": ["sch", 0], "latent_image": ["empty", 0]}},
        "out2": {"class_type": "PreviewAny", "inputs": {"source": ["sca", 0]}},
    })
    res = host.run(p)
    a, b = res.outputs("sca")[0]["samples"], res.outputs("rec")[0]["samples"]
    assert torch.isfinite(a).all()
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), float((a - b).abs().max())


def test_batch_of_three_matches_single_runs_and_is_deterministic():
    res = host.run(ours("eps", "implicit", 10, 7.5))
    traj = res.outputs("inv")[2]
    again = host.run(ours("eps", "implicit", 10, 7.5)).outputs("inv")[2]
    assert torch.equal(traj.states, again.states)                 # bit-identical on CPU
    for i, comps in enumerate(["0", "1", "2"]):
        p = ours("eps", "implicit", 10, 7.5)
        p["lat"]["inputs"].update(comps=comps)
        single = host.run(p).outputs("inv")[2]
        # the sample index inside the GMM sampler differs per batch position, so compare via the sampler's
        # own per-sample independence: re-run the same source alone
        src = traj.states[0, i:i + 1]
        assert single.states.shape[1] == 1 and torch.isfinite(single.states).all()
        assert not torch.equal(src, single.states[0]) or i == 0
    # independence: inverting sample 1 alone equals its row in the batch
    p = base("eps")
    p["one"] = {"class_type": "LatentFromBatch", "inputs": {"samples": ["lat", 0], "batch_index": 1, "length": 1}}
    p["inv"] = {"class_type": "DDIMInvert", "inputs": {"model": ["m", 0], "positive": ["pos", 0], "negative": ["neg", 0],
                "latent": ["one", 0], "steps": 10, "cfg": 7.5, "scheduler": "ddim_uniform", "method": "implicit"}}
    p["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["inv", 0]}}
    one = host.run(p).outputs("inv")[2]
    assert torch.allclose(one.states[:, 0], traj.states[:, 1], atol=1e-5)
    assert one.batch_index == [1]


def test_trajectory_contract_and_outputs():
    res = host.run(ours("flow", "exact", 8, 1.0))
    noise_latent, noise, traj = res.outputs("inv")
    import comfy.model_management as mm
    assert traj.states.shape[0] == 9 and traj.denoised.shape[0] == 8 and traj.sigmas.shape == (9,)
    assert bool((traj.sigmas[1:] > traj.sigmas[:-1]).all()) and float(traj.sigmas[-1]) == 1.0
    assert traj.method == "exact" and traj.nfe == 8 and traj.family == "flow"
    assert traj.latent_format == "SD15" and "ModelSamplingDiscreteFlow" in traj.model_sampling
    assert traj.states.device == mm.intermediate_device() and noise_latent["samples"].device == mm.intermediate_device()
    src = model_space(res.outputs("lat")[0]["samples"])
    assert torch.allclose(traj.states[0], src, atol=1e-6)
    assert hasattr(noise, "seed") and hasattr(noise, "generate_noise")


def test_masks_and_batch_index_are_kept_and_honoured():
    p = ours("eps", "ddim", 10, 1.0)
    p["mask"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 64}}
    p["full"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}}
    p["cm"] = {"class_type": "MaskComposite", "inputs": {"destination": ["full", 0], "source": ["mask", 0], "x": 0, "y": 0, "operation": "add"}}
    p["ml"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["lat", 0], "mask": ["cm", 0]}}
    p["inv"]["inputs"]["latent"] = ["ml", 0]
    p["edit"] = {"class_type": "TestGMMCond", "inputs": {"subset": "3"}}
    p["rec"]["inputs"].update(positive=["edit", 0], cfg=3.0)
    res = host.run(p)
    nl, _, traj = res.outputs("inv")
    assert "noise_mask" in nl and traj.noise_mask is not None
    out = res.outputs("rec")[0]
    assert "noise_mask" in out
    src, rec = res.outputs("lat")[0]["samples"], out["samples"]
    # right half (latent columns 4..7) is outside the mask: exactly the source
    assert torch.allclose(rec[..., 4:], src[..., 4:], atol=1e-4)
    assert float((rec[..., :4] - src[..., :4]).norm()) > 0.1 * float(src[..., :4].norm())


def test_inputs_are_not_mutated():
    p = ours("v", "exact", 6, 7.5)
    res = host.run(p)
    lat = res.outputs("lat")[0]
    before = lat["samples"].clone()
    keys = set(lat)
    host.run(p, executor=res.executor)        # cached upstream outputs are reused by the second run
    assert torch.equal(lat["samples"], before) and set(lat) == keys


@pytest.mark.parametrize("fam", ["eps", "v", "flow", "flux"])
def test_every_family_on_tiny_real_architectures(fam):
    p = {
        "m": {"class_type": "TestTinyModel", "inputs": {"family": fam, "seed": 0}},
        "c": {"class_type": "TestTinyConditioning", "inputs": {"family": fam, "seed": 0}},
        "n": {"class_type": "TestTinyConditioning", "inputs": {"family": fam, "seed": 1}},
        "lat": {"class_type": "TestRandomLatent", "inputs": {"family": fam, "batch": 2, "height": 32, "width": 32, "seed": 0}},
        "inv": {"class_type": "DDIMInvert", "inputs": {"model": ["m", 0], "positive": ["c", 0], "negative": ["n", 0],
                "latent": ["lat", 0], "steps": 4, "cfg": 3.0, "scheduler": "simple", "method": "exact"}},
        "rec": {"class_type": "DDIMInvSampler", "inputs": {"model": ["m", 0], "positive": ["c", 0], "negative": ["n", 0],
                "trajectory": ["inv", 2], "cfg": 3.0}},
        "out": {"class_type": "PreviewAny", "inputs": {"source": ["rec", 0]}},
    }
    res = host.run(p)
    traj = res.outputs("inv")[2]
    assert traj.family == ("flow" if fam in ("flow", "flux") else "vp")
    src, rec = res.outputs("lat")[0]["samples"], res.outputs("rec")[0]["samples"]
    assert torch.isfinite(res.outputs("inv")[0]["samples"]).all()
    assert float((rec - src).norm() / src.norm()) <= 1e-5


def test_sockets_have_their_issue_names_in_object_info():
    import server  # noqa: F401  (ComfyUI's node_info lives on the server module in 0.3.75)
    nodes = host.boot()
    want = {"DDIMInvert": ["noise_latent", "noise", "trajectory"], "DDIMInvSampler": ["latent"],
            "DDIMInvVAEEncode": ["latent", "vae_ceiling"], "DDIMInvTrajectoryPreview": ["images"]}
    for node_id, names in want.items():
        info = nodes.NODE_CLASS_MAPPINGS[node_id].GET_NODE_INFO_V1()
        assert list(info["output_name"]) == names, (node_id, info["output_name"])
        assert info["description"]
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), (node_id, name)
