"""API-format prompt builders the host tests share (plain dicts; nothing is executed here).

* :func:`gmm_base`, :func:`gmm_invert_sample`, :func:`gmm_core_flip`: the analytic Gaussian-mixture MODEL
  (``TestGMMModel``) inverted by the pack or by core FlipSigmas + SamplerCustom;
* :func:`hard_prompt`: the hardening fixture nodes (``TestHardModel``/``TestHardLatent``/...) wired through
  DDIM Invert and the Inverted-Latent Sampler;
* :func:`model_space`, :func:`rel_err`: the round-trip error of a result.
"""
from __future__ import annotations

GMM_SEED = 4                 # the oracle the fidelity tables use (ddiminv_dev/fixtures/gmm_nodes.py DEFAULT_SEED)
FAMILIES = ("eps", "v", "flow")
HARD_LATENT = dict(batch=1, channels=4, height=8, width=8, seed=0, dtype="float32", poison="none", mask="none",
                   scale=1.0)
HARD_COND = dict(mean=0.5, batch=1, empty=False, poison=False)
HARD_NEG = dict(mean=0.0, batch=1, empty=False, poison=False)


def scheduler_for(fam: str) -> str:
    return "simple" if fam == "flow" else "ddim_uniform"


def gmm_base(fam: str, comps: str = "0,1,2", sample_seed: int = 1, seed: int = GMM_SEED, prompt: str = "0,1,2") -> dict:
    return {
        "m": {"class_type": "TestGMMModel", "inputs": {"family": fam, "seed": seed}},
        "pos": {"class_type": "TestGMMCond", "inputs": {"subset": prompt}},
        "neg": {"class_type": "TestGMMCond", "inputs": {"subset": ""}},
        "lat": {"class_type": "TestGMMLatent", "inputs": {"comps": comps, "seed": seed, "sample_seed": sample_seed}},
    }


def gmm_invert_sample(fam: str, method: str, steps: int, cfg: float, *, seed: int = GMM_SEED, comps: str = "0,1,2",
                      prompt: str = "0,1,2", **inv) -> dict:
    """lat -> DDIM Invert ("inv") -> Inverted-Latent Sampler ("rec") with the same prompt and cfg."""
    p = gmm_base(fam, comps=comps, seed=seed, prompt=prompt)
    p["inv"] = {"class_type": "DDIMInvert", "inputs": {
        "model": ["m", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent": ["lat", 0],
        "steps": steps, "cfg": cfg, "scheduler": scheduler_for(fam), "method": method, **inv}}
    p["rec"] = {"class_type": "DDIMInvSampler", "inputs": {
        "model": ["m", 0], "positive": ["pos", 0], "negative": ["neg", 0], "trajectory": ["inv", 2], "cfg": cfg}}
    p["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["rec", 0]}}
    return p


def gmm_core_flip(fam: str, steps: int, cfg: float) -> dict:
    """Core FlipSigmas + SamplerCustom(euler) inversion and regeneration of the same latent."""
    p = gmm_base(fam)
    p.update({
        "sch": {"class_type": "BasicScheduler", "inputs": {"model": ["m", 0], "scheduler": scheduler_for(fam),
                                                          "steps": steps, "denoise": 1.0}},
        "flip": {"class_type": "FlipSigmas", "inputs": {"sigmas": ["sch", 0]}},
        "eul": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "inv": {"class_type": "SamplerCustom", "inputs": {
            "model": ["m", 0], "add_noise": False, "noise_seed": 0, "cfg": cfg, "positive": ["pos", 0],
            "negative": ["neg", 0], "sampler": ["eul", 0], "sigmas": ["flip", 0], "latent_image": ["lat", 0]}},
        "rec": {"class_type": "SamplerCustom", "inputs": {
            "model": ["m", 0], "add_noise": False, "noise_seed": 0, "cfg": cfg, "positive": ["pos", 0],
            "negative": ["neg", 0], "sampler": ["eul", 0], "sigmas": ["sch", 0], "latent_image": ["inv", 0]}},
        "out": {"class_type": "PreviewAny", "inputs": {"source": ["rec", 0]}},
    })
    return p


def model_space(x):
    return x.float() * 0.18215          # SD15 latent format (the GMM model uses it)


def rel_err(res, src_node: str = "lat", rec_node: str = "rec") -> float:
    import torch
    src = model_space(res.outputs(src_node)[0]["samples"])
    rec = model_space(res.outputs(rec_node)[0]["samples"])
    if not torch.isfinite(rec).all():
        return float("inf")
    return float((rec - src).norm() / src.norm())


def hard_prompt(inv=None, lat=None, cond=None, neg=None, model=None, sampler=None, sigmas=None,
                sampler_model=None, sigma_steps: int = 4) -> dict:
    """TestHard* sources -> DDIM Invert ("inv") -> Inverted-Latent Sampler ("s"), both ending in sinks."""
    p = {
        "m": {"class_type": "TestHardModel", "inputs": {"family": "eps", "latent": "sd15"}},
        "c": {"class_type": "TestHardCond", "inputs": dict(HARD_COND)},
        "n": {"class_type": "TestHardCond", "inputs": dict(HARD_NEG)},
        "l": {"class_type": "TestHardLatent", "inputs": dict(HARD_LATENT)},
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
        p["sg"] = {"class_type": "TestHardSigmas", "inputs": {"kind": sigmas, "steps": sigma_steps}}
        p["inv"]["inputs"]["sigmas"] = ["sg", 0]
    if sampler_model is not None:
        p["m2"] = {"class_type": "TestHardModel", "inputs": sampler_model}
        p["s"]["inputs"]["model"] = ["m2", 0]
    return p
