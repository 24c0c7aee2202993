"""The tiny in-code models are real ComfyUI models: right classes, right sampling, run by core KSampler."""
from __future__ import annotations


import pytest
import torch

from ddiminv_dev import host

FAMILIES = ("eps", "v", "flow", "flux")


@pytest.fixture(scope="module")
def tiny():
    host.boot()
    from ddiminv_dev import tiny_models
    return tiny_models


def _sampling_class(family):
    import comfy.model_sampling as ms
    return {"eps": ms.EPS, "v": ms.V_PREDICTION, "flow": ms.CONST, "flux": ms.CONST}[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_model_classes(tiny, family):
    import comfy.model_base as mb
    import comfy.model_patcher
    import comfy.model_sampling as ms
    import comfy.supported_models as sm

    mp = tiny.tiny_model(family)
    assert isinstance(mp, comfy.model_patcher.ModelPatcher)
    assert mp.load_device == torch.device("cpu") and mp.offload_device == torch.device("cpu")
    m = mp.model
    want_cfg = {"eps": sm.SD15, "v": sm.SD20, "flow": sm.SD3, "flux": sm.Flux}[family]
    want_model = {"eps": mb.BaseModel, "v": mb.BaseModel, "flow": mb.SD3, "flux": mb.Flux}[family]
    assert type(m.model_config) is want_cfg
    assert isinstance(m, want_model)
    assert isinstance(m.model_sampling, _sampling_class(family))
    if family in ("eps", "v"):
        assert isinstance(m.model_sampling, ms.ModelSamplingDiscrete)
        assert not isinstance(m.model_sampling, ms.V_PREDICTION) or family == "v"
    if family == "eps":
        assert not isinstance(m.model_sampling, ms.V_PREDICTION)
    if family == "flow":
        assert isinstance(m.model_sampling, ms.ModelSamplingDiscreteFlow)
        assert m.model_sampling.shift == pytest.approx(3.0)
    if family == "flux":
        assert isinstance(m.model_sampling, ms.ModelSamplingFlux)
        assert m.model_config.unet_config["guidance_embed"] is True
    assert m.latent_format.latent_channels == tiny.LATENT_CHANNELS[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_is_deterministic_and_conditioned(tiny, family):
    m1, m2 = tiny.tiny_model(family).model, tiny.tiny_model(family).model
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    c = tiny.tiny_conditioning(family, seed=1)
    c_other = tiny.tiny_conditioning(family, seed=2)
    x = torch.randn((1, tiny.LATENT_CHANNELS[family], 8, 8), generator=torch.Generator().manual_seed(0))

    def fwd(cond):
        extra = m1.extra_conds(noise=x, device=torch.device("cpu"), cross_attn=cond[0][0], **cond[0][1])
        kw = {k: v.cond for k, v in extra.items()}
        with torch.no_grad():
            return m1.apply_model(x, torch.tensor([0.7]), **kw)

    out = fwd(c)
    assert torch.equal(out, fwd(c))  # same threads, same input: bit-identical
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, fwd(c_other)), "the model ignores its conditioning"


def _ksampler_prompt(family, seed=3):
    return {
        "1": {"class_type": "TestTinyModel", "inputs": {"family": family, "seed": 0}},
        "2": {"class_type": "TestTinyConditioning", "inputs": {"family": family, "seed": 1}},
        "3": {"class_type": "TestTinyConditioning", "inputs": {"family": family, "seed": 2}},
        "4": {"class_type": "TestRandomLatent",
              "inputs": {"family": family, "batch": 1, "height": 64, "width": 64, "seed": 4}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": 4, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "6": {"class_type": "TestLatentSink", "inputs": {"samples": ["5", 0]}},
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_core_ksampler_runs_deterministically(tiny, family):
    a = host.run(_ksampler_prompt(family)).outputs("5")[0]["samples"]
    b = host.run(_ksampler_prompt(family)).outputs("5")[0]["samples"]
    assert a.shape == (1, tiny.LATENT_CHANNELS[family], 8, 8)
    assert a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    c = host.run(_ksampler_prompt(family, seed=4)).outputs("5")[0]["samples"]
    assert not torch.equal(a, c)


def test_random_latent_is_seeded_vae_space(tiny):
    a = tiny.random_latent("eps", 2, 64, 32, seed=5)["samples"]
    b = tiny.random_latent("eps", 2, 64, 32, seed=5)["samples"]
    assert a.shape == (2, 4, 8, 4) and a.dtype == torch.float32 and torch.equal(a, b)
    # VAE space: the model-space image of it is ~N(0, 1)
    z = tiny.latent_format("flux").process_in(tiny.random_latent("flux", 1, 256, 256, seed=0)["samples"])
    assert abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1) < 0.1
