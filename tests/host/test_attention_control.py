"""Attention control on the tiny real SD1.5-format UNet (issue 27): the Inverted-Latent Sampler's
attention_control input, the adapter's patches on a clone (nodes/_comfy_attention.py) and the node's checks.

The tiny UNet's attention layers, written out: input 1 and output 2-3 at the latent's resolution, input 3, the
middle block and output 0-1 at half of it; each one self- and one cross-attention layer."""
from __future__ import annotations

import pytest
import torch

from ddiminv_dev import host
from ddiminv_dev import tiny_models as tm

N, CFG = 8, 3.0
TOPOLOGY = [(("input", 1), 1), (("input", 3), 2), (("middle", 0), 2), (("output", 0), 2), (("output", 1), 2),
            (("output", 2), 1), (("output", 3), 1)]


def rel_max(a, b) -> float:
    """The largest difference relative to the largest value (the tiny random UNet's latents reach ~200)."""
    return float((a - b).abs().max() / b.abs().max())


def mod(name):
    return host.pack_submodule(name)


@pytest.fixture(scope="module")
def K():
    class K:
        A, P, M = mod("inversion.attention"), mod("inversion.p2p"), mod("inversion.methods")
        CA, C = mod("nodes._comfy_attention"), mod("nodes._comfy")
        inv, smp = mod("nodes.invert").DDIMInvert, mod("nodes.sampler").DDIMInvSampler
        E = mod("inversion.errors").InversionInputError
    return K


def with_words(K, cond, words=("a", "b", "c")):
    p = K.P.prompt_info(K.P.Prompt(tuple(words), tuple((i + 1, i + 2) for i in range(len(words))), tm.TOKENS))
    return [[t, {**o, K.P.PROMPT_KEY: p}] for t, o in cond]


class Setup:
    def __init__(self, K, px=32, batch=1, method="exact", cfg=CFG, seed=0, family="eps"):
        self.m = tm.tiny_model(family)
        self.src = with_words(K, tm.tiny_conditioning(family, 1))
        self.edit = with_words(K, tm.tiny_conditioning(family, 2))
        self.neg = tm.tiny_conditioning(family, 9)
        self.lat = tm.random_latent(family, batch, px, px, seed=seed)
        self.traj = K.inv.execute(self.m, self.src, self.neg, self.lat, N, cfg, "normal", method).result[2]
        self.K = K

    def run(self, control, positive=None, model=None, cfg=CFG, **kw):
        r = self.K.smp.execute(model or self.m, positive or self.edit, self.neg, self.traj, cfg,
                               source_positive=self.src, attention_control=control, **kw)
        return r.result[0]["samples"], "\n".join(r.ui.as_dict()["text"])

    def err(self, x):
        return float((x - self.lat["samples"]).norm() / self.lat["samples"].norm())


@pytest.fixture(scope="module")
def S(K):
    return Setup(K)


def controls(K):
    A, W = K.A, K.A.Window
    return {"p2p": A.Control("p2p"), "p2p_refine": A.Control("p2p", mode="refine"),
            "p2p_blend": A.Control("p2p", blend_words=("b",)),
            "pnp": A.Control("pnp", self_window=W(0, 0.5), blocks=("output", 0, 3)),
            "masactrl": A.Control("masactrl", self_window=W(0.25, 1), blocks=("output", 0, 3))}


def test_the_adapter_reads_the_tiny_unets_topology(K, S):
    want = [K.A.Layer(kind, b, 0, f) for b, f in TOPOLOGY for kind in (K.A.SELF, K.A.CROSS)]
    assert K.CA.unet_layers(S.m) == want


# counts written out from TOPOLOGY: masactrl/pnp act in the 4 self layers of output 0-3; p2p's self maps in the
# 4 half-resolution self layers, its cross maps in all 7 cross layers, cond chunk only. ddim replay: steps 0..7
# the source branch runs where something records: masactrl/pnp both chunks in their windows, p2p the cond chunk
# alone (at cfg 1 core's shortcut), nothing outside the windows
@pytest.mark.parametrize("name,cfg,want,cost", [
    ("masactrl", CFG, 4 * 6 * 2, "6 full, 2 skipped of 8 steps: 1.75"),  # window 0.25..1 of 8 = steps 2..7, both chunks
    ("masactrl", 1.0, 4 * 6 * 1, "6 full, 2 skipped of 8 steps: 1.75"),  # cfg 1: the uncond chunk is skipped
    ("pnp", CFG, 4 * 4 * 2, "4 full, 4 skipped of 8 steps: 1.50"),       # 0..0.5 = steps 0..3
    ("p2p", CFG, 7 * 3 + 4 * 4, "0 full, 4 cond only, 4 skipped of 8 steps: 1.25"),  # cross 0..2; self 0..3
])
def test_records_and_injections_equal_topology_times_steps_times_chunks(K, S, name, cfg, want, cost):
    _, text = S.run(controls(K)[name], cfg=cfg, exact_replay="ddim")
    assert f"done: {want} records, {want} injections" in text, text
    assert f"source branch {cost} evaluations per step" in text, text


@pytest.mark.parametrize("family,layers", [("sdxl", 2), ("v", 4)])
def test_sdxl_and_v_prediction_unets_count_and_return_the_source_too(K, family, layers):
    # the tiny SDXL UNet has transformers only at half resolution: input 3, middle, output 0-1 (SD2-v: as SD1.5's)
    s = Setup(K, family=family)
    if family == "sdxl":
        want = [K.A.Layer(kind, b, 0, 2) for b in (("input", 3), ("middle", 0), ("output", 0), ("output", 1))
                for kind in (K.A.SELF, K.A.CROSS)]
        assert K.CA.unet_layers(s.m) == want
    _, text = s.run(controls(K)["masactrl"], exact_replay="ddim")
    assert f"done: {layers * 6 * 2} records, {layers * 6 * 2} injections" in text, text
    x, text = s.run(controls(K)["masactrl"], positive=s.src)
    assert "replay bdia" in text and s.err(x) <= 1e-5


@pytest.mark.parametrize("name", ["p2p", "p2p_refine", "p2p_blend", "pnp", "masactrl"])
def test_the_source_prompt_on_an_exact_trajectory_returns_the_source(K, S, name):
    x, text = S.run(controls(K)[name], positive=S.src)
    assert "replay bdia" in text
    assert S.err(x) <= 1e-5, (name, S.err(x))


def capture(K, monkeypatch) -> list:
    """The Controllers the sampler makes from now on (keeping their maps), in order."""
    made = []
    init = K.CA.Controller.__init__

    def spy(self, *a, **kw):
        init(self, *a, **kw)
        self.keep_maps = True
        made.append(self)
    monkeypatch.setattr(K.CA.Controller, "__init__", spy)
    return made


def test_cross_attention_replaced_at_every_step_gives_the_edit_the_sources_maps(K, S, monkeypatch):
    made = capture(K, monkeypatch)
    c = K.A.Control("p2p", self_window=K.A.Window(0, 0), cross_window=K.A.Window(0, 1))
    S.run(c, exact_replay="ddim")
    maps = made[0].recorded_maps
    src = {(s, la, ch): p for b, s, la, ch, p in maps if b == "source"}
    edit = {(s, la, ch): p for b, s, la, ch, p in maps if b == "edit"}
    assert set(src) == set(edit) and len(edit) == 7 * N
    assert max(float((edit[k] - src[k]).abs().max()) for k in edit) <= 1e-6


def test_the_source_branch_records_the_source_prompts_maps_on_the_stored_states(K, S, monkeypatch):
    made, seen = capture(K, monkeypatch), []
    S.run(K.A.Control("p2p", self_window=K.A.Window(0, 0), cross_window=K.A.Window(0, 1)), exact_replay="ddim")
    layer = K.A.Layer(K.A.CROSS, ("output", 0), 0, 2)
    got = [p for b, _, la, ch, p in made[0].recorded_maps if b == "source" and la == layer and ch == 0]

    def reference(q, k, v, eo):             # an independent plain run: the source prompt on the stored states
        b = q.shape[0] // len(eo["cond_or_uncond"])
        c = eo["cond_or_uncond"].index(0)
        seen.append(K.A.probs(q[c * b:(c + 1) * b], k[c * b:(c + 1) * b], eo["n_heads"]))
        from comfy.ldm.modules.attention import optimized_attention
        return optimized_attention(q, k, v, eo["n_heads"])
    m = S.m.clone()
    m.set_model_attn2_replace(reference, "output", 0, 0)
    sig = [float(v) for v in S.traj.sigmas]
    # cfg 1: p2p's source branch evaluates the cond chunk alone, so the reference runs it alone too (the same
    # chunk batched with the uncond differs in the last bits: 1.6e-6 here)
    K.C.run_guided(m, S.src, S.neg, 1.0, tuple(S.traj.states.shape[1:]), S.traj.sampling_sigmas(),
                   lambda f, d, p: [f(S.traj.states[N - n].to(d), sig[N - n]) for n in range(N)], N, "ref")
    assert len(got) == len(seen) == N
    assert max(float((a - b).abs().max()) for a, b in zip(got, seen, strict=True)) <= 1e-6


def test_a_zero_window_runs_todays_sampler_bit_for_bit(K, S):
    zero = K.A.Control("p2p", self_window=K.A.Window(0, 0), cross_window=K.A.Window(0, 0))
    layers = K.CA.unet_layers(S.m)
    ctl = K.CA.Controller(zero, K.A.schedule(zero, layers, N, range(N), (0, 1)))
    sources = []
    orig = ctl.source
    ctl.source = lambda x, s, step: (sources.append(step), orig(x, s, step))
    shape, sig = tuple(S.traj.states.shape[1:]), S.traj.sampling_sigmas()

    def loop(model_fn, device, progress, control=None):
        return K.M.sample(S.traj, model_fn, replay="ddim", device=device, control=control)
    x = K.CA.run_controlled(S.m, (S.edit, S.neg), (S.src, S.neg), CFG, shape, sig, loop, N, "t", ctl, layers)
    y = K.C.run_guided(S.m, S.edit, S.neg, CFG, shape, sig, lambda f, d, p: loop(f, d, p), N, "t")
    assert sources == list(range(N))            # the source branch ran at every step
    assert torch.equal(x, y)


def rows_evaluated(model) -> tuple:
    """A clone whose UNet calls are noted (cond_or_uncond of each call) through core's unet function wrapper."""
    calls = []
    m = model.clone()

    def wrap(apply, args):
        calls.append(tuple(args["cond_or_uncond"]))
        return apply(args["input"], args["timestep"], **args["c"])
    m.set_model_unet_function_wrapper(wrap)
    return m, calls


def test_p2ps_source_branch_runs_the_cond_chunk_alone_and_only_while_it_records(K, S, monkeypatch):
    m, calls = rows_evaluated(S.m)
    x, _ = S.run(controls(K)["p2p"], model=m, exact_replay="ddim")
    # 8 edit steps of [uncond, cond] + the source's cond alone on steps 0..3 (self window 0..0.6 of 8), in order
    assert calls == [(0,), (1, 0)] * 4 + [(1, 0)] * 4, calls
    # the same edit with the source branch evaluating every chunk at every step (as before): the cond chunk's
    # records do not depend on the uncond batched beside them (measured 1.1e-6: float32 batch 1 vs 2; bar 2e-5)
    monkeypatch.setattr(K.A, "source_chunks", lambda sched, step, chunks, inline=False, batched=False: tuple(chunks))
    m2, calls2 = rows_evaluated(S.m)
    y, _ = S.run(controls(K)["p2p"], model=m2, exact_replay="ddim")
    assert calls2 == [(1, 0)] * 16
    assert rel_max(x, y) <= 2e-5


@pytest.mark.parametrize("name", ["masactrl", "p2p"])
def test_cond_and_uncond_split_into_calls_equal_them_together(K, S, name):
    together, _ = S.run(controls(K)[name], exact_replay="ddim")
    apart, text = S.run(controls(K)[name], model=tm.split_cond_batches(S.m), exact_replay="ddim")
    assert "injections" in text
    # measured 1.1e-6 (masactrl) and 2.6e-6 (p2p) of the largest value (float32 rounding of batch 1 against
    # batch 2 in the UNet); a chunk
    # taken for the other (the edit's cond attending to the source's uncond) moves it by > 1e-2
    assert rel_max(apart, together) <= 2e-5


def test_batch_2_equals_each_sample_alone(K):
    two = Setup(K, batch=2, method="ddim", seed=3)
    x2, _ = two.run(controls(K)["masactrl"])
    for i in range(2):
        one = Setup(K, batch=1, method="ddim", seed=3)          # the same trajectory, sample i alone
        one.traj = two.traj.with_(states=two.traj.states[:, i:i + 1], denoised=two.traj.denoised[:, i:i + 1])
        x1, _ = one.run(controls(K)["masactrl"])
        assert rel_max(x2[i:i + 1], x1) <= 2e-5               # measured 1.8e-6 and 0.9e-6


def _patch_state(model):
    to = model.model_options.get("transformer_options", {})
    return {k: dict(v) for k, v in to.get("patches_replace", {}).items()}, sorted(model.model_options)


def test_the_input_models_patches_are_unchanged_and_another_packs_attn2_patch_still_runs(K, S):
    from comfy.ldm.modules.attention import optimized_attention
    calls = []

    def other_pack(q, k, v, eo):
        calls.append(eo["block"])
        return optimized_attention(q, k, v, eo["n_heads"])
    m = S.m.clone()
    m.set_model_attn2_replace(other_pack, "output", 0)          # a 2-tuple key, as some packs set it
    before = _patch_state(m)
    x, text = S.run(controls(K)["p2p"], model=m, exact_replay="ddim")
    assert _patch_state(m) == before
    # the edit every step (one batched call), the source on p2p's steps 0..3 (self window 0..0.6 of 8)
    assert len(calls) == N + 4
    assert "done: 37 records, 37 injections" in text           # its layer still injected, through the patch
    plain, _ = S.run(controls(K)["p2p"], exact_replay="ddim")
    assert torch.equal(x, plain)                               # a pass-through patch changes nothing


def test_the_local_blend_keeps_the_source_outside_its_mask(K, monkeypatch):
    big = Setup(K, px=128, method="ddim")
    made = capture(K, monkeypatch)
    # the random tiny UNet attends almost evenly: at P2P's 0.3 every pixel passes, so a higher threshold
    x, text = big.run(K.A.Control("p2p", blend_words=("b",), blend_threshold=0.9))
    mask = made[0].last_mask
    assert "local blend: 4 layers, 7 steps" in text            # the 4 coarsest (half-resolution) cross layers
    assert 0.02 < float(mask.mean()) < 0.98                   # neither everything nor nothing (measured 0.094)
    keep = (mask == 0).expand_as(x)
    assert torch.equal(x[keep], big.lat["samples"][keep])      # the source, exactly, where the mask is 0
    given = torch.zeros(1, 128, 128)
    given[:, :, :64] = 1.0
    c = K.A.Control("p2p", mask=given)
    y, _ = big.run(c)
    assert torch.equal(y[..., 8:], big.lat["samples"][..., 8:])
    assert float((y[..., :8] - big.lat["samples"][..., :8]).abs().max()) > 1e-2


def test_configurations_that_cannot_work_are_refused_naming_the_fix(K, S):
    zero = K.A.defaults("masactrl")                       # SD1.x's output 6-11: no such block in this UNet
    with pytest.raises(K.E, match="would inject nothing.*widen the windows"):
        S.run(zero)
    with pytest.raises(K.E, match="needs source_positive"):
        K.smp.execute(S.m, S.edit, S.neg, S.traj, CFG, attention_control=controls(K)["pnp"])
    with pytest.raises(K.E, match="Attention Prompts node"):
        K.smp.execute(S.m, tm.tiny_conditioning("eps", 2), S.neg, S.traj, CFG, source_positive=S.src,
                      attention_control=controls(K)["p2p"])
    with pytest.raises(K.E, match="same number of words.*refine"):
        S.run(K.A.Control("p2p"), positive=with_words(K, S.edit, ("a", "b", "c", "d")))
    flow = tm.tiny_model("flow")
    with pytest.raises(K.E, match="reaches SD1.x/SD2/SDXL UNets.*SD3"):
        K.CA.unet_layers(flow)


@pytest.mark.parametrize("act", ["pnp_qk", "masactrl_kv", "p2p_cross", "p2p_self"])
def test_each_injection_is_its_methods_formula_in_the_right_chunk(K, act):
    """The patch itself, on synthetic q/k/v ([uncond, cond] chunks of batch 2): the source call records, the
    edit call's output is the method's formula (references: inversion.attention / p2p, unit-tested)."""
    A, P = K.A, K.P
    kind = A.CROSS if act == "p2p_cross" else A.SELF
    layer = A.Layer(kind, ("output", 6), 0, 2)
    c = {"pnp_qk": A.Control("pnp", self_window=A.Window(0, 1)),
         "masactrl_kv": A.Control("masactrl", self_window=A.Window(0, 1)),
         "p2p_cross": A.Control("p2p"), "p2p_self": A.Control("p2p")}[act]
    sched = A.schedule(c, [layer], 10, range(10), (A.UNCOND, A.COND))
    al = P.align(P.Prompt(("a", "cat"), ((1, 2), (2, 3)), 6), P.Prompt(("a", "hippo"), ((1, 2), (2, 4)), 6),
                 "replace")
    ctl = K.CA.Controller(c, sched, al)
    patch = K.CA._patch(ctl, layer, None)
    g = torch.Generator().manual_seed(0)
    nk = 6 if kind == A.CROSS else 16
    src, edit = ([torch.randn(4, n, 8, generator=g) for n in (16, nk, nk)] for _ in range(2))
    eo = {"cond_or_uncond": [A.UNCOND, A.COND], "n_heads": 2, "attn_precision": None,
          "activations_shape": [4, 8, 4, 4]}
    ctl.model_fn = lambda x, s: patch(*src, eo)
    ctl.source(None, 1.0, 3)
    out = patch(*edit, eo)
    ctl.check_step(3)
    (qs, ks, vs), (qe, ke, ve) = src, edit
    ch = slice(2, 4)                                   # the cond chunk
    want = {"pnp_qk": lambda: A.pnp(qs, ks, ve, 2), "masactrl_kv": lambda: A.masactrl(qe, ks, vs, 2),
            "p2p_cross": lambda: A.apply_probs(P.cross_map(A.probs(qs, ks, 2), A.probs(qe, ke, 2), al), ve),
            "p2p_self": lambda: A.apply_probs(A.probs(qs, ks, 2), ve)}[act]()
    assert float((out[ch] - want[ch]).abs().max()) <= 1e-5
    own = A.attend(qe, ke, ve, 2)
    if act.startswith("p2p"):                          # P2P leaves the uncond chunk alone
        assert float((out[:2] - own[:2]).abs().max()) <= 1e-5
    else:
        assert float((out[:2] - want[:2]).abs().max()) <= 1e-5
    assert float((want[ch] - own[ch]).abs().max()) > 1e-2       # the injection changes something


class TokenizerClip:
    """A CLIP whose tokenizer is ComfyUI's own (SD1 or SDXL: the real vocabulary and weight parsing) and whose
    encoder returns zeros (the encoder is not what the Attention Prompts node adds)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def tokenize(self, text, return_word_ids=False, **kw):
        return self.tokenizer.tokenize_with_weights(text, return_word_ids, **kw)

    def encode_from_tokens_scheduled(self, tokens):
        return [[torch.zeros(1, 77, 768), {"pooled_output": torch.zeros(1, 768)}]]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_attention_prompts_read_each_words_tokens_from_comfyuis_tokenizer(K, family):
    import comfy.sd1_clip
    import comfy.sdxl_clip
    tok = comfy.sd1_clip.SD1Tokenizer() if family == "sd1" else comfy.sdxl_clip.SDXLTokenizer()
    node = mod("nodes.attention").DDIMInvAttentionPrompts
    # ComfyUI's word ids number weighted segments, not words ("a photo of a cat" is all word 1): the node
    # finds each word's own tokens instead; 'hippopotamus' is 3 CLIP tokens, '(red:1.2)' the one of 'red'
    src, edit = node.execute(TokenizerClip(tok), "a photo of a cat", "a (red:1.2) photo of a hippopotamus").result
    s, e = K.P.prompt_of(src, "source"), K.P.prompt_of(edit, "edit")
    assert s == K.P.Prompt(("a", "photo", "of", "a", "cat"), ((1, 2), (2, 3), (3, 4), (4, 5), (5, 6)), 77)
    assert e.spans == ((1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 9)) and e.words[1] == "(red:1.2)"
    assert "pooled_output" in src[0][1]                      # the encoder's own options are kept
    index, alpha = K.P.refine_mapper(s, e)
    assert alpha[:10].tolist() == [1, 1, 0, 1, 1, 1, 0, 0, 0, 1]    # '(red:1.2)' and 'hippopotamus' are new
    assert [int(index[t]) for t in (1, 3, 4, 5, 9, 76)] == [1, 2, 3, 4, 6, 73]   # words and the shifted tail
    with pytest.raises(K.E, match="spans 2 token windows.*shorten"):
        node.execute(TokenizerClip(tok), "a cat " * 60, "a dog")


@pytest.fixture(scope="module")
def NT(K):
    """A null-text trajectory (cfg 7.5, 8 steps) on the tiny UNet, built as tests/host/test_nulltext.py builds
    its own: the source is the model's own cfg-1 sample (so the cfg-1 DDIM inversion is a good pivot), the negative
    close to the prompt, 5 Adam steps of 0.1 per step."""
    sched = "ddim_uniform"
    p = {"m": {"class_type": "TestTinyModel", "inputs": {"family": "eps", "seed": 0}},
         "c": {"class_type": "TestTinyConditioning", "inputs": {"family": "eps", "seed": 0}},
         "n": {"class_type": "TestTinyConditioning", "inputs": {"family": "eps", "seed": 1, "near_seed": 0,
                                                                "distance": 0.3}},
         "e": {"class_type": "TestRandomLatent", "inputs": {"family": "eps", "batch": 1, "height": 32, "width": 32,
                                                            "seed": 0}},
         "src": {"class_type": "KSampler", "inputs": {
             "model": ["m", 0], "seed": 5, "steps": 30, "cfg": 1.0, "sampler_name": "euler", "scheduler": sched,
             "positive": ["c", 0], "negative": ["n", 0], "latent_image": ["e", 0], "denoise": 1.0}},
         "inv": {"class_type": "DDIMInvert", "inputs": {
             "model": ["m", 0], "positive": ["c", 0], "negative": ["n", 0], "latent": ["src", 0], "steps": N,
             "cfg": 1.0, "scheduler": sched, "method": "ddim"}},
         "nt": {"class_type": "DDIMInvNullText", "inputs": {
             "model": ["m", 0], "positive": ["c", 0], "negative": ["n", 0], "trajectory": ["inv", 2], "cfg": 7.5,
             "mode": "null_text", "iterations": 5, "learning_rate": 0.1, "early_stop": 1e-5}}}
    for k in ("src", "nt"):
        p[k + "_o"] = {"class_type": "PreviewAny", "inputs": {"source": [k, 0]}}
    res = host.run(p)

    class NT:
        m, neg, traj = res.outputs("m")[0], res.outputs("n")[0], res.outputs("nt")[1]
        src = with_words(K, res.outputs("c")[0])
        lat = res.outputs("src")[0]["samples"]

        def run(self, control, positive=None, cfg=7.5, **kw):
            r = K.smp.execute(self.m, positive or self.src, self.neg, self.traj, cfg, source_positive=self.src,
                              attention_control=control, **kw)
            return r.result[0]["samples"], "\n".join(r.ui.as_dict()["text"])

        def err(self, x):
            return float((x - self.lat).norm() / self.lat.norm())
    nt = NT()
    nt.plain = K.smp.execute(nt.m, nt.src, nt.neg, nt.traj, 7.5).result[0]["samples"]   # no attention control
    return nt


@pytest.mark.parametrize("name", ["p2p", "masactrl"])
def test_a_null_text_trajectory_with_the_source_prompt_gives_its_reconstruction_under_attention_control(K, NT, name):
    """PnPInversion's null-text + P2P row rests on this: on a null-text trajectory (cfg 7.5), attention control
    with the source prompt as the edit returns the source as the null-text reconstruction does (not exactly: the
    source branch runs on the cfg-1 pivot's states, the edit on its own, which null-text keeps near them), and
    not as the plain negative would: both branches sample with the optimised per-step negative (the edit's
    uncond, and the source's, whose uncond keys/values masactrl's uncond chunk attends to)."""
    x, text = NT.run(controls(K)[name], positive=NT.src, cfg=7.5)
    assert "null-text negative" in text and "injections" in text, text
    off = K.smp.execute(NT.m, NT.src, NT.neg, NT.traj, 7.5, null_text="off").result[0]["samples"]
    to_plain, to_source, plain_err, off_err = rel_max(x, NT.plain), NT.err(x), NT.err(NT.plain), NT.err(off)
    print(f"{name} on null-text: to the plain reconstruction {to_plain:.2e}, to the source {to_source:.2e} "
          f"(plain reconstruction {plain_err:.2e}, null_text off {off_err:.2e})")
    # measured (8 steps): the plain reconstruction 1.4e-2 from the source, with null_text off 0.20; p2p 2.8e-2
    # (its self maps come from the pivot's states, the edit's sit 1e-2 beside them), masactrl 1.4e-2
    assert to_source <= 0.06 and off_err >= 0.15, (to_source, plain_err, off_err)
    if name == "masactrl":   # its uncond chunk attends to the source's uncond: measured 2.7e-3 from the plain
        assert to_plain <= 7e-3, to_plain    # reconstruction, 1.5e-2 with the source branch on the plain negative


def test_source_drift_comes_from_the_source_branch_at_no_extra_pass(K):
    """(That the inline gap equals the separate drift pass is tests/unit/test_attention.py's.)"""
    s = Setup(K, method="ddim", cfg=1.0)
    c = controls(K)["masactrl"]
    x, text = s.run(c, positive=s.src, cfg=1.5, correction="source_drift", source_negative=s.neg)
    assert "source_drift from the source branch's evaluations (no extra pass)" in text
    # the source prompt at another cfg is pinned: measured 4.7e-5 (float32 rounding the random tiny UNet
    # amplifies; the drift without attention control: 1.4e-4), without the drift 6.5
    assert s.err(x) <= 1e-3
    plain, _ = s.run(c, positive=s.src, cfg=1.5)
    assert s.err(plain) > 1.0


# ---------------------------------------------------------------------------------------------- DiTs: Flux v_inject
class FluxSetup:
    """The tiny Flux (ddiminv_dev/tiny_families.py: one double and one single block, patch 2)."""

    def __init__(self, K, cfg=1.0):
        from ddiminv_dev import tiny_families as tf
        self.K, self.cfg = K, cfg
        self.m = tf.tiny_model("Flux")
        self.src, self.edit = tf.conditioning("Flux", 1), tf.conditioning("Flux", 2)
        self.neg = tf.conditioning("Flux", 9)
        self.lat = tf.latent("Flux")
        self.traj = K.inv.execute(self.m, self.src, self.neg, self.lat, N, cfg, "normal", "exact").result[2]

    def run(self, control, positive=None):
        r = self.K.smp.execute(self.m, positive or self.edit, self.neg, self.traj, self.cfg,
                               source_positive=self.src, attention_control=control)
        return r.result[0]["samples"], "\n".join(r.ui.as_dict()["text"])


@pytest.mark.parametrize("cfg,chunks", [(1.0, 1), (3.0, 2)])
def test_flux_v_inject_counts_and_the_source_prompt_returns_the_source(K, cfg, chunks):
    f = FluxSetup(K, cfg)
    c = K.A.Control(**{**K.A.defaults("v_inject", single_blocks=1).__dict__, "self_window": K.A.Window(0, 0.5)})
    x, text = f.run(c, positive=f.src)
    err = float((x - f.lat["samples"]).norm() / f.lat["samples"].norm())
    assert err <= 1e-5, (cfg, err, text)
    assert "replay bdia" in text                             # bdia replays steps 1..7: window 0..0.5 -> 1..3
    want = 1 * 3 * chunks                                    # 1 single block x steps 1..3 x chunks
    assert f"v_inject: 1 layers x 3 steps x {chunks} chunk" in text, text
    assert f"{want} records, {want} injections" in text, text


def test_flux_v_inject_swaps_exactly_the_image_tokens_of_the_edit_prompt(K, monkeypatch):
    from ddiminv_dev import tiny_families as tf
    f = FluxSetup(K, 1.0)
    seen, inject = [], K.A.inject_values

    def spy(v_edit, v_src, image_tokens, dim=-2, start=None):
        seen.append((v_edit.shape[dim], image_tokens))
        return inject(v_edit, v_src, image_tokens, dim, start)
    monkeypatch.setattr(K.A, "inject_values", spy)
    c = K.A.Control(**{**K.A.defaults("v_inject", single_blocks=1).__dict__, "self_window": K.A.Window(0, 0.5)})
    _, text = f.run(c)
    h, w = f.lat["samples"].shape[-2:]
    assert "replay ddim" in text, text                       # another prompt: ddim replays steps 0..7 -> 0..3
    # the joint sequence is the prompt's tokens then the latent's 2x2 patches: only the patches are swapped
    assert seen == [(tf.SPECS["Flux"].tokens + (h // 2) * (w // 2), (h // 2) * (w // 2))] * 4, seen


def test_flux_v_inject_chains_an_override_already_there_and_leaves_the_input_model_unpatched(K):
    """Another pack's attention override on the MODEL stays in the chain: it sees every attention call of both
    branches, our injections still happen through it, and the input MODEL's options are unchanged."""
    f = FluxSetup(K, 1.0)
    calls = []

    def other(func, *args, **kwargs):                       # another pack's override: counts, then attends
        calls.append(args[0].shape)
        return func(*args, **kwargs)

    def quiet(func, *args, **kwargs):                       # the same pass-through, counting nothing
        return func(*args, **kwargs)
    out = {}
    for name, fn in (("other", other), ("quiet", quiet)):
        m = f.m.clone()
        m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = fn
        before = dict(m.model_options["transformer_options"])
        traj = K.inv.execute(m, f.src, f.neg, f.lat, N, 1.0, "normal", "exact").result[2]
        calls.clear()
        c = K.A.Control(**{**K.A.defaults("v_inject", single_blocks=1).__dict__, "self_window": K.A.Window(0, 0.5)})
        r = K.smp.execute(m, f.edit, f.neg, traj, 1.0, source_positive=f.src, attention_control=c)
        out[name] = (r.result[0]["samples"], "\n".join(r.ui.as_dict()["text"]), len(calls))
        assert m.model_options["transformer_options"] == before and "dit" not in before.get("patches_replace", {})
    x, text, n = out["other"]
    # every attention call of both branches went on to it: 2 blocks (1 double, 1 single) x (the edit's N steps +
    # the source's steps 0..3 of the window 0..0.5, the only ones it records on)
    assert n == 2 * (N + N // 2), (n, text)
    assert "injections" in text and " 0 injections" not in text, text
    # the pass-through chain changes no number: the same run through another pass-through override is identical
    assert torch.equal(x, out["quiet"][0])
    assert out["quiet"][2] == 0


# ---------------------------------------------------------------------------------------------- DiTs: the node, SD3
def node_control(K, method="v_inject", start=0.0, end=0.5, blocks=""):
    return mod("nodes.attention").DDIMInvAttentionControl.execute(method, "replace", start, end, -1.0, blocks).result[0]


class FamilySetup(FluxSetup):
    """A tiny DiT of ddiminv_dev/tiny_families.py inverted exactly at ``cfg``."""

    def __init__(self, K, name, cfg=1.0, steps=N):
        from ddiminv_dev import tiny_families as tf
        self.K, self.cfg, self.name = K, cfg, name
        self.m = tf.tiny_model(name)
        self.src, self.edit = tf.conditioning(name, 1), tf.conditioning(name, 2)
        self.neg = tf.conditioning(name, 9)
        self.lat = tf.latent(name)
        self.traj = K.inv.execute(self.m, self.src, self.neg, self.lat, steps, cfg, "normal", "exact").result[2]


@pytest.mark.parametrize("name,dim", [("Flux", 2), ("Chroma", 2), ("SD3", 1), ("QwenImage", 2)])
def test_the_node_offers_v_inject_with_the_familys_default_blocks(K, monkeypatch, name, dim):
    """Attention Control's v_inject with blocks empty: the family default for the model (each tiny DiT has one
    single / joint block: Flux and Chroma single 0 by RF-Edit's scaling, SD3 double 0 as 'all but the last' of
    one). The source prompt on an exact trajectory returns the source; another prompt swaps exactly the image
    tokens of each joint call, along the tokens' dim of the family's layout ([B,H,N,D] Flux, [B,N,H,D] SD3)."""
    from ddiminv_dev import tiny_families as tf
    f = FamilySetup(K, name)
    c = node_control(K)
    assert c.method == "v_inject" and c.blocks is K.A.FAMILY and c.self_window == K.A.Window(0.0, 0.5)
    x, text = f.run(c, positive=f.src)
    err = float((x - f.lat["samples"]).norm() / f.lat["samples"].norm())
    assert err <= 1e-5, (name, err, text)
    assert "v_inject: 1 layers x 3 steps x 1 chunk = 3" in text and "3 records, 3 injections" in text, text
    seen, inject = [], K.A.inject_values

    def spy(v_edit, v_src, image_tokens, dim=-2, start=None):
        seen.append((v_edit.shape[dim], image_tokens, dim))
        return inject(v_edit, v_src, image_tokens, dim, start)
    monkeypatch.setattr(K.A, "inject_values", spy)
    _, text = f.run(c)
    h, w = f.lat["samples"].shape[-2:]
    img = (h // 2) * (w // 2)                                # patch 2
    assert seen == [(tf.SPECS[name].tokens + img, img, dim)] * 4, (seen, text)   # ddim replay: steps 0..3


# the tiny Flux's joint blocks: double 0 then single 0; v_inject reaches each one named, and 'all' reaches both
@pytest.mark.parametrize("blocks,layers", [("", ["single_block"]), ("double 0", ["double_block"]),
                                           ("all", ["double_block", "single_block"])])
def test_flux_v_inject_reaches_the_blocks_named_double_and_single(K, monkeypatch, blocks, layers):
    f = FamilySetup(K, "Flux")
    made = capture(K, monkeypatch)
    _, text = f.run(node_control(K, blocks=blocks))
    n = len(layers) * 4                                      # ddim replay: window 0..0.5 of 8 = steps 0..3
    assert f"v_inject: {len(layers)} layers x 4 steps x 1 chunk = {n}" in text and f"{n} records, {n} inj" in text
    assert sorted({la.block[0] for row in made[0].sched.actions.values() for la, _ in row}) == layers


def test_a_method_of_the_other_architecture_is_refused_by_the_sampler_naming_the_fix(K, S):
    f = FamilySetup(K, "Flux")
    with pytest.raises(K.E, match="Inverted-Latent Sampler: method pnp acts in a UNet.*use method v_inject"):
        f.run(node_control(K, "pnp", -1.0, -1.0))
    with pytest.raises(K.E, match="Inverted-Latent Sampler: method v_inject acts in a DiT.*this model is a UNet; "
                                  "use method p2p, pnp or masactrl"):
        S.run(node_control(K))


# each DiT the issue names (and Flux's variants): attention control runs (records = injections > 0) or is refused
# naming the family; a family moving between the two lists must be a decision, not an accident
RUNS = ("Flux", "FluxSchnell", "Flux2", "Chroma", "SD3", "QwenImage", "WAN21_T2V", "WAN21_I2V", "WAN22_T2V")
REFUSED = ("HunyuanVideo", "Lumina2", "ZImage", "HiDream")


@pytest.mark.parametrize("name", RUNS + REFUSED)
def test_each_dit_family_runs_value_injection_or_is_refused_by_name(K, name):
    from ddiminv_dev import tiny_families as tf
    m = tf.tiny_model(name)
    src, edit, neg, lat = (tf.conditioning(name, 1), tf.conditioning(name, 2), tf.conditioning(name, 9),
                           tf.latent(name))
    traj = K.inv.execute(m, src, neg, lat, 4, 1.0, "normal", "ddim").result[2]
    c = node_control(K, end=1.0)
    if name in REFUSED:
        with pytest.raises(K.E, match=rf"Inverted-Latent Sampler: attention control reaches .*\({name}, \w+\) is "
                                      "none of them.*disconnect attention_control"):
            K.smp.execute(m, edit, neg, traj, 1.0, source_positive=src, attention_control=c)
        return
    r = K.smp.execute(m, edit, neg, traj, 1.0, source_positive=src, attention_control=c)
    text = "\n".join(r.ui.as_dict()["text"])
    assert "v_inject: 1 layers x 4 steps x 1 chunk = 4" in text and "4 records, 4 injections" in text, text
    assert torch.isfinite(r.result[0]["samples"]).all()


# ---------------------------------------------------------------------------------------------- DiTs: kv_edit
def kv_control(K, mask, end=-1.0):
    return mod("nodes.attention").DDIMInvAttentionControl.execute(
        "kv_edit", "replace", -1.0, end, -1.0, "", blend_mask=mask).result[0]


def left_quarter(lat):
    """A mask of the left quarter of the latent (1 = edit) and the background tokens it leaves (patch 2: a 4x4 grid
    of row-major tokens at 8x8, the 12 not in the first column)."""
    mask = torch.zeros(1, *lat.shape[-2:])
    q = lat.shape[-1] // 4
    mask[:, :, :q] = 1.0
    cols = lat.shape[-1] // 2
    return mask, q, torch.tensor([[j % cols != 0 for j in range(cols * cols)]])


# the joint blocks kv_edit acts in (every block): the tiny Flux and Chroma have one double and one single block
# (KV-Edit caches K/V in both kinds), the tiny SD3 one joint block
@pytest.mark.parametrize("name,dim,blocks", [("Flux", 2, 2), ("Chroma", 2, 2), ("SD3", 1, 1), ("QwenImage", 2, 1)])
def test_kv_edit_keeps_the_background_and_gives_it_the_sources_keys_and_values(K, monkeypatch, name, dim, blocks):
    """KV-Edit's background mode with a MASK (the left quarter of the 8x8 latent = edit): every step, in every
    joint block (Flux/Chroma: the double and the single block), the background patches' keys and values are the
    source's (the 12 of the 16 image tokens not in the first patch column), the latent's background is the
    source's (the result's right 3/4 = the source latent), the edit changes the left quarter."""
    from ddiminv_dev import tiny_families as tf
    f = FamilySetup(K, name, steps=4)
    lat = f.lat["samples"]
    mask, q, want_bg = left_quarter(lat)
    seen, inject = [], K.A.inject_background

    def spy(t_edit, t_src, background, d, start=None):
        assert torch.equal(background.cpu(), want_bg), background
        seen.append((t_edit.shape[d], int(background.sum()), background.shape[1], d))
        return inject(t_edit, t_src, background, d, start)
    monkeypatch.setattr(K.A, "inject_background", spy)
    x, text = f.run(kv_control(K, mask))
    n = blocks * 4
    assert f"kv_edit: {blocks} layers x 4 steps x 1 chunk = {n}" in text, text
    assert f"{n} records, {n} injections" in text, text
    img = (lat.shape[-2] // 2) * (lat.shape[-1] // 2)
    assert seen == [(tf.SPECS[name].tokens + img, img * 3 // 4, img, dim)] * (2 * n), seen     # k and v
    right, left = (..., slice(q, None)), (..., slice(None, q))
    bg_err = float((x[right] - lat[right]).abs().max() / lat.abs().max())
    fg_err = float((x[left] - lat[left]).abs().max() / lat.abs().max())
    print(f"{name} kv_edit: background {bg_err:.2e}, foreground {fg_err:.2e} (relative to the latent's max)")
    assert bg_err <= 1e-6 and fg_err > 1e-2, (bg_err, fg_err)
    monkeypatch.setattr(K.A, "inject_background", inject)
    y, text = f.run(kv_control(K, mask), positive=f.src)     # the source prompt on the exact trajectory
    assert "replay bdia" in text and rel_max(y, lat) <= 1e-5, (rel_max(y, lat), text)


def test_kv_edit_gives_the_double_blocks_attention_the_sources_background_keys_and_values(K, monkeypatch):
    """What each joint attention call of the tiny Flux receives (another pack's override, chained after ours, sees
    it): in the edit branch, in the double block as in the single block, the background image tokens' keys and
    values are bit for bit the source branch's of the same step, the foreground's and the text's are the edit's
    own. Flux, not Chroma: Flux's modulation carries the pooled prompt, so the double block's image stream (each
    token computed alone from the latent's patch) differs between the branches even on the latent's background;
    Chroma's does not, and its one double block would give the same background keys with or without the
    injection (a real Chroma's later double blocks differ: their image tokens have attended to the text)."""
    f = FamilySetup(K, "Flux", steps=4)
    mask, _, bg = left_quarter(f.lat["samples"])
    bg = bg[0]
    made, calls = capture(K, monkeypatch), []

    def other(func, *args, **kwargs):                        # [B, H, N, D]: the tokens are dim 2
        to = kwargs["transformer_options"]
        calls.append((made[0].branch, made[0].step, to["block_type"], to["block_index"], args[1], args[2]))
        return func(*args, **kwargs)
    m = f.m.clone()
    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = other
    r = f.K.smp.execute(m, f.edit, f.neg, f.traj, 1.0, source_positive=f.src, attention_control=kv_control(K, mask))
    assert "8 records, 8 injections" in "\n".join(r.ui.as_dict()["text"])
    src = {(s, t, i): (k, v) for b, s, t, i, k, v in calls if b == "source"}
    edit = {(s, t, i): (k, v) for b, s, t, i, k, v in calls if b == "edit"}
    assert sorted(src) == sorted(edit) == [(s, t, 0) for s in range(4) for t in ("double", "single")]
    img = bg.numel()
    for key in edit:
        for e, s in zip(edit[key], src[key], strict=True):
            e_img, s_img = e[:, :, -img:], s[:, :, -img:]
            assert torch.equal(e_img[:, :, bg], s_img[:, :, bg]), key
            assert float((e_img[:, :, ~bg] - s_img[:, :, ~bg]).abs().max()) > 1e-3, key
            assert float((e[:, :, :-img] - s[:, :, :-img]).abs().max()) > 1e-3, key


def test_kv_edit_is_refused_without_a_mask_and_on_a_unet(K, S):
    with pytest.raises(K.E, match="Attention Control: method kv_edit needs a mask.*connect blend_mask"):
        kv_control(K, None)
    with pytest.raises(K.E, match="method kv_edit acts in a DiT.*this model is a UNet"):
        S.run(kv_control(K, torch.ones(1, 8, 8)))


# --- Plug-and-Play's decoder features (the output block patch): block 1 of the tiny UNet's 4 decoder blocks, the
# first 75% of the 8 steps (int(0.75 * 8) = 6: steps 0..5), both chunks
def pnp_features(K, window=(0, 0.75)):
    return K.A.Control("pnp", self_window=K.A.Window(0, 0.5), blocks=("output", 0, 3),
                       feature_window=K.A.Window(*window), feature_block=1)


@pytest.mark.parametrize("cfg,chunks", [(CFG, 2), (1.0, 1)])
def test_pnp_feature_injection_counts_block_times_steps_times_chunks(K, S, cfg, chunks):
    _, text = S.run(pnp_features(K), cfg=cfg, exact_replay="ddim")
    want = 1 * 6 * chunks + 4 * 4 * chunks            # + pnp_qk: 4 decoder self layers x steps 0..3
    assert f"pnp_feature: 1 layers x 6 steps x {chunks} chunk" in text, text
    assert f"done: {want} records, {want} injections" in text, text


def features_only(K):
    """PnP's feature injection alone (the self-attention window closed): decoder block 1, steps 0..5."""
    return K.A.Control("pnp", self_window=K.A.Window(0, 0), blocks=("output", 0, 3),
                       feature_window=K.A.Window(0, 0.75), feature_block=1)


def chunk_calls(model) -> tuple:
    """A clone with a pass-through output block patch (another pack's) that notes each call's cond_or_uncond."""
    seen = []
    m = model.clone()
    m.set_model_output_block_patch(lambda h, hsp, to: (seen.append(tuple(to["cond_or_uncond"])), (h, hsp))[1])
    return m, seen


def test_pnp_features_with_cond_and_uncond_split_into_calls_equal_them_together(K, S):
    """cfg 3: ComfyUI batches [uncond, cond] into one call when memory allows (here: every decoder block call
    carries both); ``sampler_calc_cond_batch_function`` running each alone is what it does when memory is short.
    The features are injected per chunk kind, so both give the same edit and the same counts."""
    m, seen = chunk_calls(S.m)
    together, t1 = S.run(features_only(K), model=m, exact_replay="ddim")
    # 4 decoder blocks x (the edit's N steps + the source's 6 steps of the window 0..0.75)
    assert set(seen) == {(1, 0)} and len(seen) == 4 * (N + 6), set(seen)         # one call for both chunks
    m, seen = chunk_calls(tm.split_cond_batches(S.m))
    apart, t2 = S.run(features_only(K), model=m, exact_replay="ddim")
    assert set(seen) == {(0,), (1,)} and len(seen) == 4 * (N + 6) * 2, set(seen)  # each chunk its own call
    want = "pnp_feature: 1 layers x 6 steps x 2 chunks = 12"
    assert want in t1 and want in t2 and "done: 12 records, 12 injections" in t1 and "done: 12 records" in t2
    # measured 1.9e-6 of the largest value (float32 rounding of batch 1 against batch 2); the features keyed by
    # the chunk's place in the call instead of its kind (apart, the cond takes the uncond's) move it by 0.68
    print(f"pnp features apart vs together: {rel_max(apart, together):.2e}")
    assert rel_max(apart, together) <= 2e-5, rel_max(apart, together)


def test_pnp_features_on_batch_2_equal_each_sample_alone(K):
    two = Setup(K, batch=2, method="ddim", seed=3)
    x2, text = two.run(features_only(K))
    assert "pnp_feature: 1 layers x 6 steps x 2 chunks" in text, text
    for i in range(2):
        one = Setup(K, batch=1, method="ddim", seed=3)          # the same trajectory, sample i alone
        one.traj = two.traj.with_(states=two.traj.states[:, i:i + 1], denoised=two.traj.denoised[:, i:i + 1])
        x1, _ = one.run(features_only(K))
        # measured 1.8e-6 and 3.3e-6; the first sample's features given to both move sample 2 by 1.2
        print(f"pnp features batch 2 vs sample {i} alone: {rel_max(x2[i:i + 1], x1):.2e}")
        assert rel_max(x2[i:i + 1], x1) <= 2e-5, (i, rel_max(x2[i:i + 1], x1))


def test_pnp_with_features_and_the_source_prompt_on_an_exact_trajectory_returns_the_source(K, S):
    x, text = S.run(pnp_features(K, (0, 1)), positive=S.src)
    assert "replay bdia" in text and "pnp_feature" in text
    assert S.err(x) <= 1e-5, S.err(x)


def test_the_edits_decoder_resblock_computes_the_sources_recorded_features(K, S, monkeypatch):
    # a forward hook (test-only) on the ResBlock of decoder block 1: in the window the edit branch's features are
    # the source branch's (same input, same time embedding), after it the edit prompt makes them differ
    made, outs = capture(K, monkeypatch), []
    # the source branch evaluated at every step (it is skipped after the window, where nothing records): its
    # features after the window are the reference the edit's must differ from
    monkeypatch.setattr(K.A, "source_chunks", lambda sched, step, chunks, inline=False, batched=False: tuple(chunks))
    res = S.m.model.diffusion_model.output_blocks[1][0]
    assert type(res).__name__ == "ResBlock"
    hook = res.register_forward_hook(lambda mod, inp, out: outs.append((made[0].branch, made[0].step, out.clone())))
    try:
        S.run(pnp_features(K), exact_replay="ddim")
    finally:
        hook.remove()
    src = {s: o for b, s, o in outs if b == "source"}
    edit = {s: o for b, s, o in outs if b == "edit"}
    assert sorted(src) == sorted(edit) == list(range(N))
    inside = max(float((edit[s] - src[s]).abs().max() / src[s].abs().max()) for s in range(6))
    outside = min(float((edit[s] - src[s]).abs().max() / src[s].abs().max()) for s in range(6, N))
    print("features inside/outside the window", inside, outside)
    assert inside <= 1e-6 and outside > 1e-3, (inside, outside)


def test_pnp_from_the_node_on_a_decoder_without_block_4_is_refused(K, S):
    c = mod("nodes.attention").DDIMInvAttentionControl.execute("pnp", "replace", -1.0, -1.0, -1.0).result[0]
    assert c.feature_window == K.A.Window(0, 0.8) and c.feature_block == 4
    with pytest.raises(K.E, match="decoder block 4"):
        S.run(c, exact_replay="ddim")


def test_the_nodes_feature_widgets_pick_pnps_block_and_window(K, S):
    node = mod("nodes.attention").DDIMInvAttentionControl
    c = node.execute("pnp", "replace", -1.0, -1.0, -1.0, "output 0-3", feature_block=1, feature_end=0.75).result[0]
    assert c.feature_block == 1 and c.feature_window == K.A.Window(0.0, 0.75)
    _, text = S.run(c, exact_replay="ddim")
    assert "pnp_feature: 1 layers x 6 steps x 2 chunks = 12" in text, text
    off = node.execute("pnp", "replace", -1.0, -1.0, -1.0, "output 0-3", feature_end=0.0).result[0]
    _, text = S.run(off, exact_replay="ddim")               # 0 turns the features off: the q/k injection only
    assert "pnp_feature" not in text and "done: 32 records, 32 injections" in text, text
    with pytest.raises(K.E, match="Attention Control: feature_block and feature_end are pnp's.*set both to -1"):
        node.execute("p2p", "replace", -1.0, -1.0, -1.0, feature_block=1)


def test_pnp_features_keep_another_packs_output_block_patch_and_leave_the_input_model_unpatched(K, S):
    calls = []

    def other(h, hsp, transformer_options):          # another pack's output block patch: it must still run
        calls.append(transformer_options["block"])
        return h, hsp
    m = S.m.clone()
    m.set_model_output_block_patch(other)
    before = list(m.model_options["transformer_options"]["patches"]["output_block_patch"])
    _, text = S.run(pnp_features(K), model=m, exact_replay="ddim")
    assert "pnp_feature: 1 layers x 6 steps x 2 chunks" in text, text
    # 4 decoder blocks x (the edit's 8 steps + the source's 6 in the window 0..0.75); cond and uncond in one batch
    assert len(calls) == 4 * (N + 6), len(calls)
    assert m.model_options["transformer_options"]["patches"]["output_block_patch"] == before == [other]


# ---------------------------------------------------------------------------------------------- DiTs: reference latents
def with_reference(cond, ref):
    """ComfyUI's ReferenceLatent node on a CONDITIONING: ``reference_latents`` appended (Flux Kontext / Flux 2)."""
    return [[t, {**o, "reference_latents": list(o.get("reference_latents", [])) + [ref]}] for t, o in cond]


# the reference is half the latent's height, so its tokens (R) are not as many as the image's (I): the unguarded
# tail injection (the last I of [text; image; reference]) takes all of the reference and part of the image
@pytest.mark.parametrize("name,method", [("Flux", "v_inject"), ("Flux", "kv_edit"), ("Flux2", "v_inject")])
def test_with_a_reference_latent_only_the_images_tokens_are_injected(K, monkeypatch, name, method):
    """Flux Kontext / Flux 2 with a ReferenceLatent in both prompts: 0.3.75's Flux._forward appends the reference's
    patches to the image's, so each joint attention call is [text; image; reference]. What another pack's override
    (chained after ours) sees in the edit branch: the image's tokens take the source's values (v_inject: every image
    token; kv_edit: keys and values of the background ones) bit for bit, the reference's and the text's keep the
    edit's own (they differ from the source's: Flux's modulation carries the pooled prompt; Flux 2 has none, so
    there only the single block, after the joint attention, differs)."""
    from ddiminv_dev import tiny_families as tf
    f = FamilySetup(K, name, steps=4)
    lat = f.lat["samples"]
    ref = tf.latent(name, seed=5)["samples"][..., : lat.shape[-2] // 2, :]
    patch = 2 if name == "Flux" else 1
    img = (lat.shape[-2] // patch) * (lat.shape[-1] // patch)
    nref = (ref.shape[-2] // patch) * (ref.shape[-1] // patch)
    text = tf.SPECS[name].tokens
    src, edit = with_reference(f.src, ref), with_reference(f.edit, ref)
    traj = K.inv.execute(f.m, src, f.neg, f.lat, 4, 1.0, "normal", "exact").result[2]
    if method == "kv_edit":
        mask, _, bg = left_quarter(lat)
        bg, control = bg[0], kv_control(K, mask)
    else:
        bg, control = torch.ones(img, dtype=torch.bool), node_control(K, blocks="all", end=1.0)
    made, calls = capture(K, monkeypatch), []

    def other(func, *args, **kwargs):                        # [B, H, N, D]: the tokens are dim 2
        to = kwargs["transformer_options"]
        calls.append((made[0].branch, made[0].step, to["block_type"], args[1], args[2]))
        return func(*args, **kwargs)
    m = f.m.clone()
    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = other
    r = K.smp.execute(m, edit, f.neg, traj, 1.0, source_positive=src, attention_control=control)
    assert "8 records, 8 injections" in "\n".join(r.ui.as_dict()["text"])
    src_calls = {(s, t): (k, v) for b, s, t, k, v in calls if b == "source"}
    edit_calls = {(s, t): (k, v) for b, s, t, k, v in calls if b == "edit"}
    assert sorted(src_calls) == sorted(edit_calls) == [(s, t) for s in range(4) for t in ("double", "single")]
    if name == "Flux2":                                      # Flux 2 pads the prompt to 512 tokens
        text = 512
    n = edit_calls[(0, "double")][0].shape[2]
    assert n == text + img + nref, (n, text, img, nref)     # the reference is in the sequence, after the image
    for key in edit_calls:
        kv = zip(edit_calls[key], src_calls[key], strict=True)
        for which, (e, s) in zip("kv", kv, strict=True):
            e_img, s_img = e[:, :, text:text + img], s[:, :, text:text + img]
            if which == "v" or method == "kv_edit":
                assert torch.equal(e_img[:, :, bg], s_img[:, :, bg]), (key, which)
            if name == "Flux" or key[1] == "single":
                gap = float((e[:, :, text + img:] - s[:, :, text + img:]).abs().max())
                assert gap > 1e-3, (key, which, gap)         # the reference keeps the edit's own


def test_masactrl_default_blocks_on_sdxl_are_its_decoder_from_layer_44(K, monkeypatch):
    """Attention Control's masactrl with blocks empty on an SDXL model: MasaCtrl's SDXL start layer 44 of 70 =
    ComfyUI's output blocks 1-5 (SD1.x's output 6-11 are no SDXL blocks with attention: it injected nothing and
    was refused). The tiny SDXL's decoder transformers are output 0 and 1: exactly output 1's self layer injects,
    at every step of 8 (MasaCtrl's step 4 of 50 -> int(0.08 * 8) = 0), both chunks."""
    s = Setup(K, family="sdxl")
    assert K.C.family_name(s.m) == "SDXL"
    made = capture(K, monkeypatch)
    c = node_control(K, "masactrl", -1.0, -1.0)
    assert c.blocks is K.A.FAMILY
    _, text = s.run(c, exact_replay="ddim")
    assert "masactrl_kv: 1 layers x 8 steps x 2 chunks = 16" in text and "16 records, 16 injections" in text, text
    assert {la for row in made[0].sched.actions.values() for la, _ in row} == {K.A.Layer(K.A.SELF, ("output", 1), 0, 2)}


def test_a_dit_call_whose_tokens_fit_no_known_layout_is_refused(K):
    """The adapter's layout reading (no silent injection at a guessed place): a single block before any double
    block, an image stream shorter than the latent's patches, a call whose length is neither [text; image
    stream] nor the image stream alone."""
    ctl = K.CA.Controller(K.A.Control("v_inject"), None)
    ctl.image_tokens = 16
    with pytest.raises(K.E, match="cannot tell the text from the image tokens.*no double block before it"):
        ctl.block_streams({"img": torch.zeros(1, 24, 4)})
    with pytest.raises(K.E, match="expected the latent's 16 image tokens.*which has 12"):
        ctl.block_streams({"img": torch.zeros(1, 12, 4), "txt": torch.zeros(1, 8, 4)})
    ctl.block_streams({"img": torch.zeros(1, 20, 4), "txt": torch.zeros(1, 8, 4)})     # 16 image + 4 reference
    ctl.block_streams({"img": torch.zeros(1, 28, 4)})                                 # the single block: joined
    assert (ctl.image_start(28), ctl.image_start(20)) == (8, 0)
    with pytest.raises(K.E, match="joint attention call of 24 tokens in a block of 8 text and 20 image"):
        ctl.image_start(24)


def test_a_reference_latent_in_only_one_of_the_prompts_is_refused_naming_it(K):
    """The source prompt with a ReferenceLatent and the edit's without: the branches' joint sequences differ in
    length; refused naming the reference latents, not injected anywhere."""
    from ddiminv_dev import tiny_families as tf
    f = FamilySetup(K, "Flux", steps=4)
    src = with_reference(f.src, tf.latent("Flux", seed=5)["samples"])          # 8 text + 16 image + 16 reference
    traj = K.inv.execute(f.m, src, f.neg, f.lat, 4, 1.0, "normal", "exact").result[2]
    with pytest.raises(K.E, match=r"Inverted-Latent Sampler: v_inject got a source attention call of 40 tokens "
                                  r"for the edit's 24 .*reference latents.*same reference images"):
        K.smp.execute(f.m, f.edit, f.neg, traj, 1.0, source_positive=src, attention_control=node_control(K))
