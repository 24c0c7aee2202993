"""Trajectory Preview in the real host: frame selection, fast vs VAE decode, UI payload, errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ddiminv_dev import host

NODE = "DDIMInvTrajectoryPreview"


def _prompt(steps=10, batch=1, size=8, seed=0, latent_format="SD15", show="states", frames=4, decode="fast",
            vae=False, batch_index=0, channels=4):
    p = {
        "traj": {"class_type": "TestTrajectory", "inputs": {"steps": steps, "batch": batch, "channels": channels,
                                                           "size": size, "seed": seed,
                                                           "latent_format": latent_format}},
        "prev": {"class_type": NODE, "inputs": {"trajectory": ["traj", 0], "show": show, "frames": frames,
                                                "decode": decode, "batch_index": batch_index}},
    }
    if vae:
        p["vae"] = {"class_type": "TestTinyVAE", "inputs": {"seed": 0}}
        p["prev"]["inputs"]["vae"] = ["vae", 0]
    return p


def _run(**kw):
    r = host.run(_prompt(**kw))
    return r, r.outputs("prev")[0], r.ui("prev")


def _error(prompt=None, **kw) -> str:
    p = prompt or _prompt(**kw)
    assert host.validate(p)[0], "ComfyUI's validation rejected the prompt before the node's own check"
    r = host.run(p, expect_success=False)
    assert not r.success
    err = r.error() or {}
    assert err.get("node_id") == "prev" and err["exception_type"].endswith("InversionInputError"), err
    msg = err.get("exception_message", "")
    assert msg.startswith("Trajectory Preview: "), msg
    return msg


def _traj(f, **kw):
    return f.make_trajectory(**kw)


def _fast_ref(lat, fmt):
    factors = torch.tensor(fmt.latent_rgb_factors).T
    bias = torch.tensor(fmt.latent_rgb_factors_bias) if fmt.latent_rgb_factors_bias is not None else None
    rgb = torch.nn.functional.linear(lat.movedim(1, -1), factors, bias)
    return ((rgb + 1) / 2).clamp(0, 1)


def test_schema_documented(fx):
    nodes, _ = fx
    cls = nodes.NODE_CLASS_MAPPINGS[NODE]
    schema = cls.define_schema()
    assert schema.display_name == "Trajectory Preview" and schema.is_output_node
    assert schema.category == "sampling/ddim_inversion" and schema.description
    assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs)
    assert schema.inputs[0].io_type == "DDIM_TRAJECTORY"
    ids = [i.id for i in schema.inputs]
    assert ids[:5] == ["trajectory", "vae", "show", "frames", "decode"]


def test_states_frames_include_both_ends(fx):
    _, f = fx
    r, images, ui = _run(steps=10, frames=4)
    assert images.shape == (4, 8, 8, 3)
    data = ui["ddim_trajectory"][0]
    steps = [fr["step"] for fr in data["frames"]]
    assert steps == [0, 3, 7, 10]
    assert [fr["index"] for fr in data["frames"]] == [0, 1, 2, 3]
    t = _traj(f)
    assert [fr["sigma"] for fr in data["frames"]] == pytest.approx([float(t.sigmas[s]) for s in steps])
    assert data["steps"] == 10 and data["method"] == "ddim"
    assert data["sigma_max"] == pytest.approx(float(t.sigmas[-1]))
    assert data["figure_name"]


def test_more_frames_than_steps_shows_all(fx):
    _, images, ui = _run(steps=5, frames=50)
    assert images.shape[0] == 6
    assert [fr["step"] for fr in ui["ddim_trajectory"][0]["frames"]] == list(range(6))


def test_fast_decode_matches_latent_rgb_factors(fx):
    _, f = fx
    import comfy.latent_formats as lf
    for name in ("SD15", "SDXL"):  # SDXL has a bias
        _, images, ui = _run(frames=3, latent_format=name)
        t = _traj(f, latent_format=name)
        want = _fast_ref(t.states[[0, 5, 10], 0], getattr(lf, name)())
        assert torch.allclose(images, want, atol=1e-6)


def test_denoised_mode(fx):
    _, f = fx
    _, images, ui = _run(show="denoised", frames=3)
    t = _traj(f)
    frames = ui["ddim_trajectory"][0]["frames"]
    assert [fr["step"] for fr in frames] == [0, 4, 9]  # N=10 estimates: 0..9, both ends
    assert [fr["sigma"] for fr in frames] == pytest.approx([float(t.eval_sigmas[i]) for i in (0, 4, 9)])
    import comfy.latent_formats as lf
    assert torch.allclose(images, _fast_ref(t.denoised[[0, 4, 9], 0], lf.SD15()), atol=1e-6)


def test_both_side_by_side(fx):
    _, states, _ = _run(show="states", frames=4)
    _, both, ui = _run(show="both", frames=4)
    assert both.shape == (4, 8, 16, 3)
    assert torch.equal(both[:, :, :8], states)
    assert ui["ddim_trajectory"][0]["show"] == "both"


@torch.inference_mode()
def test_vae_decode(fx):
    _, f = fx
    _, images, _ = _run(frames=3, decode="vae", vae=True)
    assert images.shape == (3, 64, 64, 3)
    t = _traj(f)
    import comfy.latent_formats as lf
    want = f.tiny_vae(0).decode(lf.SD15().process_out(t.states[[0, 5, 10], 0]))
    assert torch.allclose(images, want, atol=1e-5)
    _, fast, _ = _run(frames=3, decode="fast", vae=True)  # a connected VAE is ignored by fast
    assert fast.shape == (3, 8, 8, 3)


def test_figure_is_x0_drift_from_source(fx):
    _, f = fx
    _, _, ui = _run(frames=4)
    t = _traj(f)
    src = t.states[0, 0]
    got = [fr["figure"] for fr in ui["ddim_trajectory"][0]["frames"]]
    want = [float(torch.sqrt(torch.mean((t.denoised[min(s, 9), 0] - src) ** 2))) for s in (0, 3, 7, 10)]
    assert got == pytest.approx(want, rel=1e-5)


def test_ui_images_saved_and_json_clean(fx):
    import folder_paths
    _, images, ui = _run(frames=5)
    assert len(ui["images"]) == 5
    for im in ui["images"]:
        assert im["type"] == "temp"
        assert im["filename"].endswith(".png")
        assert (Path(folder_paths.get_temp_directory()) / im["subfolder"] / im["filename"]).is_file()
    json.dumps(ui["ddim_trajectory"], allow_nan=False)


def test_deterministic_and_batch_index(fx):
    _, a, ui_a = _run(batch=2, batch_index=1, seed=4)
    _, b, ui_b = _run(batch=2, batch_index=1, seed=4)
    assert torch.equal(a, b)
    assert ui_a["ddim_trajectory"] == ui_b["ddim_trajectory"]
    _, c, _ = _run(batch=2, batch_index=0, seed=4)
    assert not torch.equal(a, c)


def test_vae_decode_without_vae_names_the_fix(fx):
    msg = _error(decode="vae")
    assert "VAE" in msg and "connect" in msg and "decode=fast" in msg


def test_unknown_latent_format(fx):
    msg = _error(latent_format="NoSuchFormat")
    assert "NoSuchFormat" in msg and "DDIM Invert" in msg


def test_channels_without_fast_factors_name_decode_vae(fx):
    msg = _error(channels=5)
    assert "5 latent channels" in msg and "decode=vae" in msg


@pytest.mark.parametrize("index", [5, 4096, 10**6])
@pytest.mark.parametrize("linked", [False, True])
def test_batch_index_out_of_range_is_the_same_error_however_large(fx, index, linked):
    """4096 used to exceed the widget's max (4095): ComfyUI's validation then dropped the preview from a prompt
    with other outputs, which ran with status success, while 5 got the node's error. Now every out-of-range
    index, typed or connected, reaches the node's own check, and the prompt fails."""
    p = _prompt(batch=1, batch_index=index)
    p["lat"] = {"class_type": "TestRandomLatent", "inputs": {"family": "eps", "batch": 1, "height": 8, "width": 8,
                                                             "seed": 0}}
    p["other"] = {"class_type": "PreviewAny", "inputs": {"source": ["lat", 0]}}     # another output node
    if linked:
        p["int"] = {"class_type": "PrimitiveInt", "inputs": {"value": index}}
        p["prev"]["inputs"]["batch_index"] = ["int", 0]
    msg = _error(prompt=p)
    assert f"batch_index {index} is out of range" in msg and "use 0..0" in msg


def test_trajectory_not_mutated(fx):
    nodes, f = fx
    cls = nodes.NODE_CLASS_MAPPINGS[NODE]
    t = _traj(f)
    before = (t.states.clone(), t.denoised.clone(), t.sigmas.clone())
    out = cls.execute(t, show="both", frames=3)
    assert torch.equal(t.states, before[0]) and torch.equal(t.denoised, before[1]) and torch.equal(t.sigmas, before[2])
    assert out.args[0].shape == (3, 8, 16, 3)
    assert math.isfinite(out.ui["ddim_trajectory"][0]["frames"][-1]["figure"])


def test_real_inversion_trajectory(fx):
    """DDIM Invert (GMM test model) -> Trajectory Preview: a real trajectory, both ends shown."""
    p = {
        "model": {"class_type": "TestGMMModel", "inputs": {"family": "eps", "seed": 0}},
        "cond": {"class_type": "TestGMMCond", "inputs": {"subset": "0,1,2"}},
        "lat": {"class_type": "TestGMMLatent", "inputs": {"comps": "0,1,2", "seed": 0, "sample_seed": 1}},
        "inv": {"class_type": "DDIMInvert", "inputs": {"model": ["model", 0], "positive": ["cond", 0],
                                                       "negative": ["cond", 0], "latent": ["lat", 0], "steps": 6,
                                                       "cfg": 1.0, "scheduler": "ddim_uniform", "method": "ddim"}},
        "prev": {"class_type": NODE, "inputs": {"trajectory": ["inv", 2], "show": "both", "frames": 3,
                                                "decode": "fast"}},
    }
    r = host.run(p)
    images = r.outputs("prev")[0]
    data = r.ui("prev")["ddim_trajectory"][0]
    assert images.shape[0] == 3 and images.shape[-1] == 3
    n = data["steps"]  # the scheduler decides the exact count (ddim_uniform may add one)
    assert n >= 6 and data["method"] == "ddim"
    steps = [f["step"] for f in data["frames"]]
    select = host.pack_submodule("inversion.imaging").select_frames
    assert steps[0] == 0 and steps[-1] == n and steps == select(n + 1, 3)
    assert data["frames"][0]["sigma"] < data["frames"][-1]["sigma"] == pytest.approx(data["sigma_max"])
    json.dumps(data, allow_nan=False)


def _null_text_preview(mode="null_text", show="both"):
    """Tiny SD1.5 model: DDIM Invert (cfg 1, 4 steps) -> Null-Text Inversion (cfg 7.5) -> Trajectory Preview."""
    p = {
        "m": {"class_type": "TestTinyModel", "inputs": {"family": "eps", "seed": 0}},
        "c": {"class_type": "TestTinyConditioning", "inputs": {"family": "eps", "seed": 0}},
        "n": {"class_type": "TestTinyConditioning", "inputs": {"family": "eps", "seed": 1}},
        "e": {"class_type": "TestRandomLatent", "inputs": {"family": "eps", "batch": 2, "height": 32, "width": 32,
                                                           "seed": 0}},
        "inv": {"class_type": "DDIMInvert", "inputs": {"model": ["m", 0], "positive": ["c", 0], "negative": ["n", 0],
                                                       "latent": ["e", 0], "steps": 4, "cfg": 1.0,
                                                       "scheduler": "ddim_uniform", "method": "ddim"}},
        "nt": {"class_type": "DDIMInvNullText", "inputs": {"model": ["m", 0], "positive": ["c", 0],
                                                           "negative": ["n", 0], "trajectory": ["inv", 2], "cfg": 7.5,
                                                           "mode": mode, "iterations": 2, "learning_rate": 0.1}},
        "prev": {"class_type": NODE, "inputs": {"trajectory": ["nt", 1], "show": show, "frames": 3,
                                                "decode": "fast", "batch_index": 1}},
    }
    r = host.run(p)
    return r, r.outputs("prev")[0], r.ui("prev")["ddim_trajectory"][0]


def test_a_null_text_trajectory_shows_its_reconstruction_below_the_pivot(fx):
    """The pivot on top, below it what the optimised negative reconstructs at the same levels (the sampler's
    states and guided x0 estimates the optimisation recorded), and per frame the RMS miss between the two
    states: 0 at the inverted noise (both start there), growing where guidance leaves the pivot."""
    import comfy.latent_formats as lf
    r, images, data = _null_text_preview()
    traj = r.outputs("nt")[1]
    info = traj.optimized_negative
    rec_states, rec_denoised = info["states"], info["denoised"]
    assert rec_states.shape == traj.states.shape and rec_denoised.shape == traj.denoised.shape
    steps = [f["step"] for f in data["frames"]]
    n = traj.steps
    assert steps == [0, n // 2, n] and images.shape == (3, 8, 8, 3)      # 4x4 latents: 2x2 panels of 4x4
    fmt = lf.SD15()
    top = torch.cat([_fast_ref(traj.states[steps, 1], fmt),
                     _fast_ref(traj.denoised[[min(s, n - 1) for s in steps], 1], fmt)], dim=2)
    bottom = torch.cat([_fast_ref(rec_states[steps, 1], fmt),
                        _fast_ref(rec_denoised[[min(s, n - 1) for s in steps], 1], fmt)], dim=2)
    assert torch.allclose(images[:, :4], top, atol=1e-6) and torch.allclose(images[:, 4:], bottom, atol=1e-6)
    assert not torch.allclose(images[:, 4:], top, atol=1e-3)          # the bottom is not the pivot again
    miss = [f["miss"] for f in data["frames"]]
    want = [float((rec_states[s, 1] - traj.states[s, 1]).pow(2).mean().sqrt()) for s in steps]
    assert miss == pytest.approx(want, rel=1e-5) and miss[-1] == 0.0 and miss[0] > 0
    assert data["reconstruction"] == "below: null-text reconstruction at cfg 7.5"
    json.dumps(data, allow_nan=False)


def test_a_negative_prompt_trajectory_shows_the_pivot_alone(fx):
    r, images, data = _null_text_preview(mode="negative_prompt", show="states")
    assert images.shape == (3, 4, 4, 3) and "reconstruction" not in data
    assert all("miss" not in f for f in data["frames"])
