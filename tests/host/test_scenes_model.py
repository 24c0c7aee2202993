"""The scenes SD1.5-format model: its trainer runs and resumes, and the assembled checkpoint loads through core
``CheckpointLoaderSimple`` as SD15 and computes what the trained low-rank UNet and TAESD compute."""
from __future__ import annotations

import pytest
import torch

from ddiminv_dev.learned import lowrank
from ddiminv_dev.learned import train as LT
from ddiminv_dev.scenes import build, train
from ddiminv_dev.tiny_checkpoint import UNET_CONFIG

@pytest.fixture(scope="module")
def trained(tmp_path_factory, trainer_checks):
    d = tmp_path_factory.mktemp("scenes-weights")
    vae = train.train_vae(d, iterations=2, batch=2, n_scenes=4)
    train.train_unet(d, vae, iterations=2, batch=2, captions=trainer_checks[0])
    return d


def test_trainer_writes_fp16_weights_and_resumes(trained, tmp_path, trainer_checks):
    """Two iterations then a resumed third give the weights of three iterations in one run."""
    trainer_checks[1](train.train_unet, trained, tmp_path, train.VAE_FILE, train.UNET_FILE, "unet_state.pt", train.RANK)


def _merge64(sd: dict) -> dict:
    """``B @ A`` of every low-rank layer in float64, and the absolute product ``|B| @ |A|`` the error bounds use."""
    out = {}
    for k, a in sd.items():
        if k.endswith("A.weight"):
            b = sd[k[: -len("A.weight")] + "B.weight"]
            a, b = a.double().flatten(1), b.double().flatten(1)
            out[k] = (b @ a, b.abs() @ a.abs(), a.shape[0])
    return out


@pytest.mark.precision
def test_rank_extension_keeps_the_model():
    """``extend_rank`` pads ``A`` with random rows and ``B`` with zero columns, so every merged weight ``B @ A`` is
    the same sum with exact zeros added. What that guarantees is checked where it holds, not bit for bit in
    float32 (the longer inner dimension lets the BLAS kernel sum in another order: MKL's AVX-512 path does):
    * float64 (the products of the float32 factors are exact there): the two sums agree to float64 rounding of an
      r-term dot product, |diff| <= 2 r 2^-53 (|B| @ |A|) -- a new ``B`` column of 1e-12 already breaks it;
    * float32, the weights the model loads (``lowrank.merge_state_dict``): they agree to float32 rounding of that
      dot product, |diff| <= 2 r 2^-24 (|B| @ |A|) (each side is within r 2^-24 |B||A| of the exact sum)."""
    from ddiminv_dev.learned.build import UNET_FILE, WEIGHTS
    from safetensors.torch import load_file
    sd = load_file(str(WEIGHTS / UNET_FILE))
    ext = train.extend_rank(sd, train.RANK, seed=0)
    assert any(v.shape[0] == train.RANK for k, v in ext.items() if k.endswith(".A.weight"))
    assert all(v.shape[0] < train.RANK for k, v in sd.items() if k.endswith(".A.weight"))
    old64, new64 = _merge64(sd), _merge64(ext)
    assert old64.keys() == new64.keys()
    for k, (w, mag, r) in old64.items():
        bound = 2 * r * 2.0 ** -53 * mag
        assert bool(((new64[k][0] - w).abs() <= bound).all()), (k, float((new64[k][0] - w).abs().max()))
    a, b = lowrank.merge_state_dict(sd), lowrank.merge_state_dict(ext)
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith("weight") and k[: -len("weight")] + "A.weight" in sd:
            _, mag, r = old64[k[: -len("weight")] + "A.weight"]
            bound = (2 * r * 2.0 ** -24 * mag).reshape(a[k].shape).float()
            assert bool(((a[k] - b[k]).abs() <= bound).all()), (k, float((a[k] - b[k]).abs().max()))
        else:                                                   # biases and plain layers: copied, unchanged
            assert torch.equal(a[k], b[k]), k


def test_assembled_checkpoint_loads_as_sd15_and_is_the_trained_model(booted, trained):
    """Core CheckpointLoaderSimple on the assembled file gives the same UNet and VAE as the trained weights."""
    import comfy.supported_models as sm
    import comfy.taesd.taesd
    from safetensors.torch import load_file
    path = build.register_model_dir(trained)
    model, clip, vae = booted.CheckpointLoaderSimple().load_checkpoint(path.name)[:3]
    assert type(model.model.model_config) is sm.SD15 and clip is not None
    assert isinstance(vae.first_stage_model, comfy.taesd.taesd.TAESD)
    g = torch.Generator().manual_seed(3)
    x, t, c = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([30.0, 800.0]), torch.randn(2, 77, 768, generator=g)
    dm = model.model.diffusion_model
    want = lowrank.load_lowrank_unet(UNET_CONFIG, load_file(str(trained / train.UNET_FILE)))
    with torch.no_grad():
        got, ref = dm(x.to(dm.dtype), t, context=c.to(dm.dtype)).float(), want(x, t, context=c)
        assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()  # merged in fp32, stored fp16
        px = torch.rand(1, 3, 64, 64, generator=g)
        m = LT.load_taesd(trained / train.VAE_FILE)
        z_ref = m.encode(px * 2 - 1)
        z = vae.encode(px.movedim(1, -1))
        assert (z.float() - z_ref).abs().max() <= 2e-2 * z_ref.abs().max()


def test_a_time_budget_stops_after_saving(trained, tmp_path, trainer_checks):
    """``minutes`` ends the run early (here after its first iteration) with the weights saved, so the next run
    resumes from there instead of losing the work."""
    trainer_checks[2](train.train_unet, trained, tmp_path, train.VAE_FILE, train.UNET_FILE, "unet_state.pt")
