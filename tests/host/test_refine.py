"""VAE Encode (Inversion) ``refine`` (decoder inversion) in the real host: refine 0 is today's node bit for bit,
refine > 0 never returns a worse ceiling, through the executor on the tiny SD VAE and the learned model's TAESD,
windows for large images, progress / preview / interrupt, nothing mutated, no autograd graph on the outputs, a
decoder without gradient falls back to the mean and says so, non-finite losses in the pack's error style. The
optimiser itself is unit-tested in tests/unit/test_refine.py."""
from __future__ import annotations

import math

import pytest
import torch

from ddiminv_dev import host

NODE = "DDIMInvVAEEncode"


def _prompt(width=64, height=64, seed=0, vae=None, **enc):
    vae = vae or {"class_type": "TestTinyVAE", "inputs": {"seed": 0}}
    return {
        "img": {"class_type": "TestNoiseImage", "inputs": {"width": width, "height": height, "batch": 1,
                                                          "channels": 3, "seed": seed, "poison": "none"}},
        "vae": vae,
        "enc": {"class_type": NODE, "inputs": {"pixels": ["img", 0], "vae": ["vae", 0 if "seed" in vae["inputs"]
                                                                                 else 2], **enc}},
        "out": {"class_type": "PreviewAny", "inputs": {"source": ["enc", 1]}},
    }


def _run(**kw):
    r = host.run(_prompt(**kw))
    latent, ceiling = r.outputs("enc")
    return r, latent["samples"], ceiling


def _text(r) -> str:
    return r.ui("enc")["text"][0]


def test_refine_zero_is_todays_node_bit_for_bit(fx):
    _, old, c_old = _run(seed=1)                       # no refine input at all: the node as it was
    r, new, c_new = _run(seed=1, refine=0, refine_lr=0.3, refine_anchor=2.0)
    assert torch.equal(old, new) and c_old == c_new
    assert "refine" not in _text(r)


def test_refine_raises_the_ceiling_and_reports_it(fx):
    _, mean, c0 = _run(seed=2)
    r, lat, c1 = _run(seed=2, refine=12)
    assert c1 > c0 + 0.45, (c0, c1)                    # measured +0.67 dB (random tiny VAE, noise image)
    text = _text(r)
    assert f"refine: {c0:.2f} dB -> {c1:.2f} dB" in text and "of 12 iterations" in text and " s" in text
    assert lat.shape == mean.shape and not torch.equal(lat, mean)
    assert not lat.requires_grad and lat.grad_fn is None and not isinstance(c1, torch.Tensor)
    import comfy.model_management
    assert lat.device == comfy.model_management.intermediate_device()


@pytest.mark.parametrize("seed", [3, 4])
def test_refine_never_returns_a_worse_ceiling(fx, seed):
    _, mean, c0 = _run(seed=seed, width=48, height=40)
    r, lat, c1 = _run(seed=seed, width=48, height=40, refine=4, refine_lr=1.0)
    assert c1 >= c0


@torch.inference_mode()
def test_a_refine_that_measures_worse_returns_the_mean(fx):
    """The optimiser sees a decoder giving the negative of the one the ceiling is measured with, so its steps make
    the measured ceiling worse: the node returns the mean, bit for bit, with its ceiling, and says so."""
    nodes, f = fx
    cls = nodes.NODE_CLASS_MAPPINGS[NODE]
    vae = f.tiny_vae(0)
    img = vae.decode(torch.randn(1, 4, 5, 6, generator=torch.Generator().manual_seed(3)))   # a decodable image
    mean = cls.execute(img, vae)
    out = cls.execute(img, _Proxy(vae, _Negative(vae.first_stage_model)), refine=3, refine_lr=0.1)
    assert torch.equal(out.args[0]["samples"], mean.args[0]["samples"]) and out.args[1] == mean.args[1]
    assert "no gain" in out.ui.as_dict()["text"][0]


def test_learned_taesd_through_the_executor(fx):
    from ddiminv_dev.learned import build
    name = build.register_model_dir().name
    ck = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}}
    _, mean, c0 = _run(width=32, height=32, seed=4, vae=ck)
    r, lat, c1 = _run(width=32, height=32, seed=4, vae=ck, refine=6, refine_lr=0.1)
    assert c1 > c0 + 0.06, (c0, c1)                    # measured +0.099 dB (6 iterations, noise image)
    assert "refine:" in _text(r) and not lat.requires_grad


def test_large_images_are_refined_in_windows(fx):
    r, lat, c1 = _run(width=264, height=136, seed=5, tiled=True, refine=2)
    _, mean, c0 = _run(width=264, height=136, seed=5, tiled=True)
    assert "in 2 windows" in _text(r)                  # latent 17x33: cores of 32 -> 1 x 2 windows
    assert c1 > c0 + 0.17 and lat.shape == mean.shape   # measured +0.256 dB


@torch.inference_mode()
def test_nothing_mutated_and_weights_restored(fx):
    nodes, f = fx
    cls = nodes.NODE_CLASS_MAPPINGS[NODE]
    vae = f.tiny_vae(0)
    params = {k: (v.clone(), v.is_inference(), v.requires_grad)
              for k, v in vae.first_stage_model.state_dict(keep_vars=True).items()}
    img = f.TestNoiseImage().make(40, 24, 2, 4, 6, "none")[0]
    before = img.clone()
    out = cls.execute(img, vae, fit="pad", refine=3, refine_anchor=0.1)
    assert torch.equal(img, before)
    after = vae.first_stage_model.state_dict(keep_vars=True)
    for k, (v, inf, rg) in params.items():
        assert torch.equal(after[k], v) and after[k].is_inference() == inf and after[k].requires_grad == rg, k
    lat = out.args[0]["samples"]
    assert lat.shape == (2, 4, 3, 5) and not lat.requires_grad and lat.grad_fn is None


class _NoGrad(torch.nn.Module):
    """A decoder that runs without autograd (as a compiled or quantised decoder may)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def decode(self, z):
        with torch.no_grad():
            return self.inner.decode(z)


class _NaN(_NoGrad):
    """A differentiable decoder whose output is NaN."""

    def decode(self, z):
        return self.inner.decode(z) * float("nan")


class _Negative(_NoGrad):
    """A differentiable decoder giving the VAE's negative image (1 - x in [0, 1] units)."""

    def decode(self, z):
        return -self.inner.decode(z)


class _Proxy:
    """The VAE with its decoder module swapped (vae.decode itself, used for the ceiling, is the real one)."""

    def __init__(self, vae, module):
        self._vae = vae
        self.first_stage_model = module

    def __getattr__(self, name):
        return getattr(self._vae, name)


@torch.inference_mode()
def test_decoder_without_gradient_falls_back_to_the_mean(fx):
    nodes, f = fx
    cls = nodes.NODE_CLASS_MAPPINGS[NODE]
    img = f.TestNoiseImage().make(32, 32, 1, 3, 7, "none")[0]
    vae = f.tiny_vae(0)
    mean = cls.execute(img, vae)
    out = cls.execute(img, _Proxy(vae, _NoGrad(vae.first_stage_model)), refine=5)
    assert torch.equal(out.args[0]["samples"], mean.args[0]["samples"]) and out.args[1] == mean.args[1]
    text = out.ui.as_dict()["text"][0]
    assert "refine skipped" in text and "no autograd graph" in text and "returned the posterior mean" in text


@torch.inference_mode()
def test_non_finite_loss_is_an_error_in_the_pack_style(fx, pack_error):
    nodes, f = fx
    cls = nodes.NODE_CLASS_MAPPINGS[NODE]
    img = f.TestNoiseImage().make(32, 32, 1, 3, 8, "none")[0]
    vae = f.tiny_vae(0)
    with pytest.raises(pack_error) as e:
        cls.execute(img, _Proxy(vae, _NaN(vae.first_stage_model)), refine=3)
    msg = str(e.value)
    assert msg.startswith("VAE Encode (Inversion): ") and "NaN/Inf" in msg and "; run the VAE in float32" in msg


@pytest.mark.parametrize("kw, words", [
    (dict(refine=-1), "refine must be an integer from 0"),
    (dict(refine=2, refine_lr=math.inf), "refine_lr must be a finite number"),
    (dict(refine=2, refine_anchor=-0.5), "refine_anchor must be a finite number"),
])
@torch.inference_mode()
def test_bad_settings_are_refused(fx, pack_error, kw, words):
    nodes, f = fx
    cls = nodes.NODE_CLASS_MAPPINGS[NODE]
    img = f.TestNoiseImage().make(16, 16, 1, 3, 0, "none")[0]
    with pytest.raises(pack_error, match=words):
        cls.execute(img, f.tiny_vae(0), **kw)


@pytest.fixture
def hook():
    """Records the progress hook; previews on (ComfyUI's default is none), as tests/host/test_progress.py."""
    import comfy.utils
    import latent_preview
    from comfy.cli_args import LatentPreviewMethod, args
    calls = []
    old, old_method = comfy.utils.PROGRESS_BAR_HOOK, args.preview_method
    has_default = hasattr(latent_preview, "default_preview_method")
    old_default = getattr(latent_preview, "default_preview_method", None)
    args.preview_method = LatentPreviewMethod.Latent2RGB
    if has_default:
        latent_preview.default_preview_method = LatentPreviewMethod.Latent2RGB

    def record(value, total, preview, node_id=None):
        calls.append((value, total, preview))
    comfy.utils.set_progress_bar_global_hook(record)
    yield calls
    comfy.utils.set_progress_bar_global_hook(old)
    args.preview_method = old_method
    if has_default:
        latent_preview.default_preview_method = old_default


def test_progress_preview_and_interrupt(fx, hook):
    """Progress of each refine iteration with a first preview, and an interrupt honoured at the next iteration.

    ComfyUI 0.33 (core #11504) throttles ``ProgressBar.update_absolute``: an update less than 100 ms after the
    last one reaches the hook only when it carries a preview or is the first or the last. Refine previews are
    themselves throttled (one per ``PREVIEW_EVERY_S``), so on 0.33 the hook sees a subset of the iterations:
    the test asks for what both versions deliver -- the first and the last iteration, strictly increasing --
    and interrupts at the first update it sees, which every version delivers."""
    import comfy.model_management as mm
    import comfy.utils
    r, _, _ = _run(seed=9, refine=5, refine_lr=0.01)
    assert r.success
    steps = [c for c in hook if c[1] == 5]
    seen = [c[0] for c in steps]
    assert seen[0] == 1 and seen[-1] == 5 and all(a < b for a, b in zip(seen, seen[1:], strict=False)), seen
    assert steps[0][2] is not None and steps[0][2][0] == "JPEG" and steps[0][2][1].size == (64, 64)

    stopped_at = []

    def interrupting(value, total, preview, node_id=None):
        hook.append((value, total, preview))
        if total == 20 and not stopped_at:
            stopped_at.append(value)
            mm.interrupt_current_processing(True)
    hook.clear()
    comfy.utils.set_progress_bar_global_hook(interrupting)
    p = _prompt(seed=10, refine=20, refine_lr=0.01)
    res = host.run(p, expect_success=False)
    assert not res.success
    assert [e for e, _ in res.executor.status_messages if e == "execution_interrupted"]
    # no iteration after the interrupt (an ignored one runs on to 20, whose update every version delivers)
    assert stopped_at == [1] and max(c[0] for c in hook if c[1] == 20) == 1, (stopped_at, hook)
    comfy.utils.set_progress_bar_global_hook(None)
    again = host.run(p)
    fresh = host.run(p)
    assert torch.equal(again.outputs("enc")[0]["samples"], fresh.outputs("enc")[0]["samples"])


@torch.inference_mode()
def test_raw_decode_is_the_ceilings_decode_before_its_clamp(fx):
    """The unclamped / straight losses see ``vae.decode``'s values before ComfyUI's clamp: clamped, they are the
    clamped decode exactly; a VAE whose process_output is not that clamp is decoded as it is."""
    nodes, f = fx
    VG = host.pack_submodule("nodes._comfy_vae_grad")
    vae = f.tiny_vae(0)
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(13)) * 3
    raw, shown = VG.decode_fn(vae, raw=True)(z), VG.decode_fn(vae)(z)
    assert torch.equal(raw.clamp(0, 1), shown)
    assert bool(((raw < 0) | (raw > 1)).any())          # this latent overshoots: the raw path is not clamped
    odd = _Proxy(vae, vae.first_stage_model)
    odd.process_output = lambda x: x * 0.25 + 0.5       # not ComfyUI's clamp: applied as it is
    assert torch.equal(VG.decode_fn(odd, raw=True)(z), VG.decode_fn(odd)(z))
