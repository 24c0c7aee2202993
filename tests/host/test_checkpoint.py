"""The tiny SD1.5-format checkpoint loads through ComfyUI's own detection and runs a core txt2img graph."""
from __future__ import annotations

import time

import pytest
import torch

from ddiminv_dev import host


@pytest.fixture(scope="module")
def ckpt():
    host.boot()
    from ddiminv_dev import tiny_checkpoint as checkpoint
    t0 = time.perf_counter()
    path = checkpoint.register_model_dir()
    print(f"tiny checkpoint ready in {time.perf_counter() - t0:.1f}s: {path}")
    return path


def test_detected_as_sd15_with_clip_and_vae(ckpt):
    import comfy.model_sampling as ms
    import comfy.sd
    import comfy.supported_models as sm

    t0 = time.process_time()  # CPU time: wall time is noise on a shared CI box
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=True, output_clip=True)[:3]
    assert time.process_time() - t0 < 20
    assert type(model.model.model_config) is sm.SD15
    assert isinstance(model.model.model_sampling, ms.EPS)
    assert clip is not None and vae is not None
    assert vae.latent_channels == 4


def _txt2img(ckpt_name, seed=1):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a tiny red fox"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }


def test_core_txt2img_graph(ckpt):
    res = host.run(_txt2img(ckpt.name))
    latent = res.outputs("5")[0]["samples"]
    image = res.outputs("6")[0]
    assert latent.shape == (1, 4, 8, 8) and torch.isfinite(latent).all()
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert res.ui("7").get("images")
