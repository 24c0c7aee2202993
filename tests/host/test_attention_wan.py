"""Attention control on the tiny real Wan 2.1 video DiT (issue 27): v_inject and kv_edit in the *self*-attention
of its blocks, reached through ComfyUI's ("dit", "double_block", i) block replace and the
``optimized_attention_override`` of transformer_options on a clone (nodes/_comfy_attention.py's SELF_DITS).

Wan's WanAttentionBlock attends over the video's patches alone (self_attn), then to the text (cross_attn), each
an ``optimized_attention(..., transformer_options=...)`` call with [B, N, H*D] q/k/v: the first call of a block is
the controlled one, its text cross-attention passes untouched. The tiny Wan here has two blocks (the suite's
WAN21_T2V spec with num_layers 2), a [1, 16, 3, 8, 8] latent: 3 frames x 4 x 4 patches (patch 1x2x2) = 48 image
tokens, 8 text tokens."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ddiminv_dev import host
from ddiminv_dev import tiny_families as tf
from ddiminv_dev import tiny_models as tm

N, NAME = 8, "WAN21_T2V"
BLOCKS = 2


def mod(name):
    return host.pack_submodule(name)


def rel_max(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def K():
    class K:
        A, M = mod("inversion.attention"), mod("inversion.methods")
        CA, C = mod("nodes._comfy_attention"), mod("nodes._comfy")
        inv, smp = mod("nodes.invert").DDIMInvert, mod("nodes.sampler").DDIMInvSampler
        node = mod("nodes.attention").DDIMInvAttentionControl
        E = mod("inversion.errors").InversionInputError
    return K


def two_block_wan():
    """The suite's tiny Wan 2.1 T2V with two blocks instead of one (built under a name of its own, removed after)."""
    key = NAME + "_2blocks"
    base = tf.SPECS[NAME]
    tf.SPECS[key] = dataclasses.replace(base, unet={**base.unet, "num_layers": BLOCKS})
    try:
        return tf._build(key, tf.DEFAULT_SEED)
    finally:
        del tf.SPECS[key]


@pytest.fixture(scope="module")
def wan():
    return two_block_wan()


class WanSetup:
    def __init__(self, K, model, cfg=1.0, steps=N, batch=1, method="exact", seed=0):
        self.K, self.m, self.cfg = K, model, cfg
        self.src, self.edit = tf.conditioning(NAME, 1), tf.conditioning(NAME, 2)
        self.neg = tf.conditioning(NAME, 9)
        self.lat = tf.latent(NAME, batch, seed=seed)
        self.traj = K.inv.execute(model, self.src, self.neg, self.lat, steps, cfg, "normal", method).result[2]

    def run(self, control, positive=None, model=None):
        r = self.K.smp.execute(model or self.m, positive or self.edit, self.neg, self.traj, self.cfg,
                               source_positive=self.src, attention_control=control)
        return r.result[0]["samples"], "\n".join(r.ui.as_dict()["text"])


def v_control(K, start=0.0, end=0.5, blocks="all"):
    return K.node.execute("v_inject", "replace", start, end, -1.0, blocks).result[0]


def kv_control(K, mask):
    return K.node.execute("kv_edit", "replace", -1.0, -1.0, -1.0, "", blend_mask=mask).result[0]


def img_tokens(lat) -> int:
    t, h, w = lat.shape[-3:]
    return t * (h // 2) * (w // 2)


def test_the_adapter_reads_wans_blocks_and_its_video_tokens(K, wan):
    lat = tf.latent(NAME)["samples"]
    assert lat.shape == (1, 16, 3, 8, 8)
    assert K.CA.model_layers(wan) == [K.A.Layer(K.A.JOINT, ("double_block", i), 0, 2) for i in range(BLOCKS)]
    assert K.CA.self_first(wan) and not K.CA.self_first(tf.tiny_model("Flux"))
    assert K.CA.image_tokens(wan, tuple(lat.shape)) == 48 == img_tokens(lat)
    assert K.CA.image_tokens(wan, (1, 16, 3, 7, 9)) == 3 * 4 * 5          # sides padded up to the patch


@pytest.mark.parametrize("cfg,chunks", [(1.0, 1), (3.0, 2)])
def test_v_inject_counts_blocks_times_steps_times_chunks_and_the_source_prompt_returns_the_source(K, wan, cfg,
                                                                                                   chunks):
    s = WanSetup(K, wan, cfg)
    x, text = s.run(v_control(K), positive=s.src)
    assert "replay bdia" in text, text                       # bdia replays steps 1..7: window 0..0.5 -> 1..3
    want = BLOCKS * 3 * chunks
    assert f"v_inject: {BLOCKS} layers x 3 steps x {chunks} chunk" in text, text
    assert f"done: {want} records, {want} injections" in text, text
    err = rel_max(x, s.lat["samples"])
    print(f"Wan v_inject, source prompt, exact trajectory, cfg {cfg}: {err:.2e} of the latent's max")
    assert err <= 1e-5, (err, text)


def test_v_inject_gives_the_self_attention_the_sources_values_and_leaves_the_text_cross_attention(K, wan,
                                                                                                   monkeypatch):
    """What each attention call of the tiny Wan receives (another pack's override, chained after ours, sees it): in
    the edit branch's window, every block's self-attention (the first call, 48 tokens) has the source branch's
    values bit for bit and its own queries and keys; its text cross-attention (the second call, 8 tokens) keeps the
    edit's own keys and values; outside the window the self-attention keeps its own values."""
    s = WanSetup(K, wan)
    made, calls = [], []
    orig = K.CA.Controller.__init__

    def keep(self, *a, **kw):
        orig(self, *a, **kw)
        made.append(self)
    monkeypatch.setattr(K.CA.Controller, "__init__", keep)
    # the source branch evaluated at every step (it is skipped after the window, where nothing records): its values
    # after the window are the reference the edit's own must differ from
    monkeypatch.setattr(K.A, "source_chunks", lambda sched, step, chunks, inline=False, batched=False: tuple(chunks))

    def other(func, *args, **kwargs):
        ctl = made[-1]
        calls.append((ctl.branch, ctl.step, args[0].shape[1], args[1].shape[1], args[0], args[2]))
        return func(*args, **kwargs)
    m = s.m.clone()
    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = other
    _, text = s.run(v_control(K), model=m)
    assert "replay ddim" in text, text                       # another prompt: ddim replays 0..7, window 0..3
    assert f"done: {BLOCKS * 4} records, {BLOCKS * 4} injections" in text, text
    img = img_tokens(s.lat["samples"])
    src = [c for c in calls if c[0] == "source"]
    edit = [c for c in calls if c[0] == "edit"]
    assert len(src) == len(edit) == N * BLOCKS * 2          # per block: one self and one cross call
    assert [c[2:4] for c in edit] == [(img, img), (img, 8)] * (N * BLOCKS)
    for i, ((_, step, _nq, nk, q_s, v_s), (_, step_e, _, _, q_e, v_e)) in enumerate(zip(src, edit, strict=True)):
        assert step == step_e
        if i % (2 * BLOCKS) == 0 and step == 0:              # step 0, block 0: the same state, no text seen yet
            assert torch.equal(q_e, q_s) and torch.equal(v_e, v_s)
        elif nk == img and step < 4:                         # the window: the source's values, the edit's queries
            assert torch.equal(v_e, v_s), step
            assert float((q_e - q_s).abs().max()) > 1e-4, step
        elif nk == img:                                      # after it the edit's own values
            assert float((v_e - v_s).abs().max()) > 1e-4, step
        else:                                                # the text cross-attention: the edit prompt's own
            assert float((v_e - v_s).abs().max()) > 1e-3, step


def test_a_zero_window_runs_todays_sampler_bit_for_bit(K, wan):
    s = WanSetup(K, wan, cfg=3.0)
    zero = K.A.Control("v_inject", self_window=K.A.Window(0, 0), cross_window=K.A.Window(), blocks=())
    layers = K.CA.model_layers(wan)
    ctl = K.CA.Controller(zero, K.A.schedule(zero, layers, N, range(N), (0, 1)))
    sources = []
    orig = ctl.source
    ctl.source = lambda x, sg, step: (sources.append(step), orig(x, sg, step))
    shape, sig = tuple(s.traj.states.shape[1:]), s.traj.sampling_sigmas()

    def loop(model_fn, device, progress, control=None):
        return K.M.sample(s.traj, model_fn, replay="ddim", device=device, control=control)
    x = K.CA.run_controlled(wan, (s.edit, s.neg), (s.src, s.neg), 3.0, shape, sig, loop, N, "t", ctl, layers)
    y = K.C.run_guided(wan, s.edit, s.neg, 3.0, shape, sig, lambda f, d, p: loop(f, d, p), N, "t")
    assert sources == list(range(N))
    assert torch.equal(x, y)


def test_cond_and_uncond_split_into_calls_equal_them_together(K, wan):
    s = WanSetup(K, wan, cfg=3.0, method="ddim")
    together, t1 = s.run(v_control(K))
    apart, t2 = s.run(v_control(K), model=tm.split_cond_batches(wan))
    want = f"done: {BLOCKS * 4 * 2} records, {BLOCKS * 4 * 2} injections"
    assert want in t1 and want in t2, (t1, t2)
    err = rel_max(apart, together)
    print(f"Wan v_inject, cond/uncond apart vs together: {err:.2e}")
    assert err <= 2e-5, err


def test_batch_2_equals_each_sample_alone(K, wan):
    two = WanSetup(K, wan, batch=2, method="ddim", seed=3)
    x2, text = two.run(v_control(K))
    assert f"done: {BLOCKS * 4} records, {BLOCKS * 4} injections" in text, text
    for i in range(2):
        one = WanSetup(K, wan, batch=1, method="ddim", seed=3)
        one.traj = two.traj.with_(states=two.traj.states[:, i:i + 1], denoised=two.traj.denoised[:, i:i + 1])
        x1, _ = one.run(v_control(K))
        err = rel_max(x2[i:i + 1], x1)
        print(f"Wan v_inject, batch 2 sample {i} vs alone: {err:.2e}")
        assert err <= 2e-5, (i, err)


def test_the_input_models_options_are_unchanged_and_another_packs_override_still_runs(K, wan):
    s = WanSetup(K, wan)
    calls = []

    def other(func, *args, **kwargs):
        calls.append(args[1].shape[1])
        return func(*args, **kwargs)

    def quiet(func, *args, **kwargs):
        return func(*args, **kwargs)
    out = {}
    for name, fn in (("other", other), ("quiet", quiet)):
        m = wan.clone()
        m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = fn
        before = dict(m.model_options["transformer_options"])
        calls.clear()
        x, text = s.run(v_control(K), model=m)
        assert m.model_options["transformer_options"] == before and "patches_replace" not in before
        out[name] = (x, text, list(calls))
    x, text, seen = out["other"]
    # self + cross per block: the edit's N steps and the source's 4 (the window 0..0.5, the only steps it records on)
    assert len(seen) == 2 * BLOCKS * (N + N // 2), len(seen)
    assert f"done: {BLOCKS * 4} records, {BLOCKS * 4} injections" in text, text
    assert torch.equal(x, out["quiet"][0]) and out["quiet"][2] == []
    plain, _ = s.run(v_control(K))
    assert torch.equal(x, plain)                           # a pass-through override changes nothing


def first_frame_left_quarter(lat):
    """A 3-frame MASK (1 = edit): the left quarter of the first frame only; the background tokens it leaves, frames
    outermost and each frame's 4x4 patches row-major (Wan's patchify): frame 0's 12 not in its first patch column,
    then every token of frames 1 and 2."""
    t, h, w = lat.shape[-3:]
    mask = torch.zeros(t, h, w)
    q = w // 4
    mask[0, :, :q] = 1.0
    cols = w // 2
    per = (h // 2) * cols
    bg = [j % cols != 0 for j in range(per)] + [True] * per * (t - 1)
    return mask, q, torch.tensor([bg])


def test_kv_edit_keeps_the_videos_background_and_gives_it_the_sources_keys_and_values(K, wan, monkeypatch):
    s = WanSetup(K, wan, steps=4)
    lat = s.lat["samples"]
    mask, q, want_bg = first_frame_left_quarter(lat)
    seen, inject = [], K.A.inject_background

    def spy(t_edit, t_src, background, d, start=None):
        assert torch.equal(background.cpu(), want_bg), background
        seen.append((t_edit.shape[d], int(background.sum()), d, start))
        return inject(t_edit, t_src, background, d, start)
    monkeypatch.setattr(K.A, "inject_background", spy)
    x, text = s.run(kv_control(K, mask))
    n = BLOCKS * 4
    assert f"kv_edit: {BLOCKS} layers x 4 steps x 1 chunk = {n}" in text, text
    assert f"done: {n} records, {n} injections" in text, text
    img = img_tokens(lat)
    assert seen == [(img, img - 4, 1, 0)] * (2 * n), seen    # k and v: 44 background tokens of 48
    fg = (..., 0, slice(None), slice(None, q))
    bg_frames, bg_first = (..., slice(1, None), slice(None), slice(None)), (..., 0, slice(None), slice(q, None))
    bg_err = max(rel_max(x[bg_frames], lat[bg_frames]), rel_max(x[bg_first], lat[bg_first]))
    fg_err = rel_max(x[fg], lat[fg])
    print(f"Wan kv_edit: background {bg_err:.2e}, foreground {fg_err:.2e}")
    assert bg_err <= 1e-6 and fg_err > 1e-2, (bg_err, fg_err)
    monkeypatch.setattr(K.A, "inject_background", inject)
    y, text = s.run(kv_control(K, mask), positive=s.src)     # the source prompt on the exact trajectory
    assert "replay bdia" in text and rel_max(y, lat) <= 1e-5, (rel_max(y, lat), text)


@pytest.mark.parametrize("method", ["p2p", "pnp", "masactrl"])
def test_the_unet_methods_are_refused_on_wan_by_name(K, wan, method):
    s = WanSetup(K, wan, steps=4, method="ddim")
    c = K.node.execute(method, "replace", -1.0, -1.0, -1.0, "").result[0]
    with pytest.raises(K.E, match=f"Inverted-Latent Sampler: method {method} acts in a UNet's self/cross-attention "
                                  "and this model is a DiT; use method v_inject"):
        s.run(c, positive=s.src)


def test_a_wan_block_whose_image_stream_holds_more_than_the_video_is_refused(K):
    """0.33's Wan joins reference / context latents' tokens to the video's in its self-attention: the injection
    would land on the wrong tokens, so a block whose image stream is not the latent's patches is refused."""
    ctl = K.CA.Controller(K.A.Control("v_inject", blocks=()), K.A.Schedule(1, {}))
    ctl.self_first, ctl.image_tokens = True, 48
    ctl.block_streams({"img": torch.zeros(1, 48, 4), "txt": torch.zeros(1, 8, 4)})
    assert ctl.layout == (None, 48) and ctl.image_start(48) == 0
    with pytest.raises(K.E, match="self-attention over the latent's 48 patches, and its image stream has 60 "
                                  "tokens.*disconnect them or attention_control"):
        ctl.block_streams({"img": torch.zeros(1, 60, 4), "txt": torch.zeros(1, 8, 4)})
