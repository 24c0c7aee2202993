"""The learned tiny SD1.5 checkpoint: its trainer runs, the assembled file loads through ComfyUI's own
``CheckpointLoaderSimple`` as SD15 (MODEL, CLIP, VAE) and computes what the low-rank model computes, its
weights fit the budget, its VAE reconstructs held-out crops and the sample classifier works."""
from __future__ import annotations

import pytest
import torch

from ddiminv_dev.learned import build, data, lowrank, train
from ddiminv_dev.tiny_checkpoint import UNET_CONFIG

# measured by `python -m ddiminv_dev.learned.evaluate` (RESULTS.md); the tests allow a small margin
VAE_CEILING_DB = 27.7   # measured on the committed weights (RESULTS.md); the aim was >= 24
VAE_MARGIN_DB = 1.0
CLASSIFIER_BAR = 0.9


def _load_lowrank():
    from safetensors.torch import load_file
    return lowrank.load_lowrank_unet(UNET_CONFIG, load_file(str(build.weight_paths()[1])))


@pytest.fixture(scope="module")
def loaded(booted):
    name = build.register_model_dir().name
    return booted.CheckpointLoaderSimple().load_checkpoint(name)


def test_trainer_writes_loadable_weights(tmp_path):
    from safetensors.torch import load_file
    vae = train.train_vae(tmp_path, iterations=2, batch=2, save_every=1, calib_per_class=1)
    unet = train.train_unet(tmp_path, vae, iterations=2, batch=4, n_per_class=1, rank=2, save_every=1)
    m = train.load_taesd(vae)
    z = m.encode(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert z.shape == (1, 4, 8, 8) and torch.isfinite(z).all()
    sd = load_file(str(unet))
    assert all(v.dtype == torch.float16 for v in sd.values())
    u = lowrank.load_lowrank_unet(UNET_CONFIG, sd)
    out = u(torch.randn(1, 4, 8, 8), torch.tensor([500.0]), context=torch.randn(1, 77, 768))
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


def test_merged_plain_unet_equals_lowrank():
    """Loading the merged weights into a plain UNetModel gives the same model (float32)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    import comfy.ops
    from safetensors.torch import load_file
    lr = _load_lowrank()
    plain = UNetModel(**UNET_CONFIG, dtype=torch.float32, device=torch.device("cpu"),
                      operations=comfy.ops.disable_weight_init)
    plain.load_state_dict(lowrank.merge_state_dict(load_file(str(build.weight_paths()[1]))))
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x, t, context=c), lr(x, t, context=c), rtol=1e-4, atol=1e-4)


def test_checkpoint_loads_as_sd15_and_matches_lowrank(loaded):
    import comfy.model_sampling as ms
    import comfy.supported_models as sm
    import comfy.taesd.taesd
    model, clip, vae = loaded
    assert type(model.model.model_config) is sm.SD15
    assert isinstance(model.model.model_sampling, ms.EPS)
    assert clip is not None and isinstance(vae.first_stage_model, comfy.taesd.taesd.TAESD)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([50.0, 900.0])
    c = train.caption_contexts()[[0, len(data.CAPTIONS)]]
    dm = model.model.diffusion_model
    with torch.no_grad():
        got = dm(x.to(dm.dtype), t, context=c.to(dm.dtype)).float()
        want = _load_lowrank()(x, t, context=c)
    # the checkpoint stores the merged weights in fp16
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()


def test_checkpoint_clip_is_what_training_saw(loaded):
    clip = loaded[1]
    cond, _ = clip.encode_from_tokens(clip.tokenize(data.CAPTIONS[1]), return_pooled=True)
    torch.testing.assert_close(cond[0].float(), train.caption_contexts()[1], rtol=1e-3, atol=1e-3)


def test_weights_fit_budget():
    assert sum(p.stat().st_size for p in build.weight_paths()) <= 8_000_000


def test_vae_ceiling(loaded):
    from ddiminv_dev.learned.evaluate import vae_ceiling
    r = vae_ceiling(loaded[2], per_class=2)
    assert r["psnr_db"] >= VAE_CEILING_DB - VAE_MARGIN_DB
    assert 4.0 <= r["latent_std"] <= 7.0  # SD1.5 scale: 1/0.18215 = 5.49


def test_classifier():
    from ddiminv_dev.learned import classifier
    acc = classifier.heldout_accuracy()
    assert acc >= CLASSIFIER_BAR
    x, y = data.heldout_crops(1, 999)
    assert classifier.predict_captions(x[:3]) == [data.CAPTIONS[i] for i in classifier.predict(x[:3])]


def test_data_api():
    assert len(data.CAPTIONS) == len(data.NAMES) == 15 and data.caption_index("a cat") == 1
    with pytest.raises(ValueError, match="an astronaut"):
        data.caption_index("a dog")
    img = data.demo_image("the moon")
    assert img.shape == (1, 64, 64, 3) and 0 <= float(img.min()) and float(img.max()) <= 1
    x, y = data.heldout_crops(2, 0)
    assert x.shape == (30, 3, 64, 64) and y.tolist() == sorted(y.tolist())
