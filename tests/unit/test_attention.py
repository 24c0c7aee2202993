"""Attention control's pure half (inversion/attention.py, inversion/p2p.py): the policy as matrices written out
by hand, the maps against einsum/loop references written independently, P2P's alignments on worked examples."""
from __future__ import annotations

import pytest
import torch

from inversion import attention as A
from inversion import p2p as P
from inversion.errors import InversionInputError

C, U = A.COND, A.UNCOND
# a small UNet-like topology: (kind, block, index, factor)
LAYERS = [A.Layer(k, b, 0, f) for b, f in ((("input", 1), 1), (("middle", 0), 2), (("output", 4), 2),
                                            (("output", 6), 1), (("output", 11), 1)) for k in (A.SELF, A.CROSS)]


def _table(c, steps, layers=LAYERS):
    return {(la.name(), s, ch): A.action(c, la, s, steps, ch) for la in layers for s in range(steps) for ch in (C, U)}


def test_p2p_policy_matrix():
    got = _table(A.defaults("p2p"), 10)
    for (name, s, ch), a in got.items():
        kind, block = name.split(" ")
        if ch == U:
            want = None                                   # P2P edits only the cond half
        elif kind == "cross":
            want = "p2p_cross" if s < 4 else None         # cross_replace_steps 0.4 of 10
        else:                                             # self maps only where queries <= 1/4 of the latent
            want = "p2p_self" if s < 6 and block in ("middle0.0", "output4.0") else None
        assert a == want, (name, s, ch, a)


def test_pnp_and_masactrl_policy_matrices():
    pnp = _table(A.defaults("pnp"), 10)
    for (name, s, _ch), a in pnp.items():
        kind, block = name.split(" ")
        want = "pnp_qk" if kind == "self" and block.startswith("output") and s < 5 else None
        assert a == want, (name, s, a)
    masa = _table(A.defaults("masactrl"), 50)
    for (name, s, _ch), a in masa.items():
        kind, block = name.split(" ")
        want = "masactrl_kv" if kind == "self" and block in ("output6.0", "output11.0") and s >= 4 else None
        assert a == want, (name, s, a)


def test_window_boundaries_follow_the_papers_int_rounding():
    w = A.Window(0.0, 0.4)
    assert [s for s in range(50) if w.active(s, 50)] == list(range(20))
    assert [s for s in range(7) if w.active(s, 7)] == [0, 1]      # int(0.4 * 7) = 2
    assert not any(A.Window(0.3, 0.3).active(s, 10) for s in range(10))


def test_schedule_counts_are_layers_times_steps_times_chunks():
    c = A.defaults("masactrl")
    sch = A.schedule(c, LAYERS, 50, range(10, 50), (U, C))
    assert sch.injections == 2 * 40 * 2                 # 2 decoder self layers in 6..11, steps 10..49, 2 chunks
    assert "masactrl_kv: 2 layers x 40 steps x 2 chunks = 160" in sch.report()
    p2p = A.schedule(A.defaults("p2p"), LAYERS, 10, range(10), (U, C))
    assert p2p.injections == 5 * 4 + 2 * 6              # 5 cross layers x 4 steps + 2 small self layers x 6
    zero = A.Control("p2p", self_window=A.Window(0, 0), cross_window=A.Window(0, 0))
    assert A.schedule(zero, LAYERS, 10, range(10), (U, C)).injections == 0


def test_the_source_branch_evaluates_only_the_chunks_something_records_from():
    def runs(c, chunks=(U, C), inline=False, steps=10, batched=False):
        sch = A.schedule(c, LAYERS, steps, range(steps), chunks)
        return [A.source_chunks(sch, s, chunks, inline, batched) for s in range(steps)]
    # p2p: cond only while a window is open (self 0..0.6 = steps 0..5), then nothing; never the uncond
    assert runs(A.defaults("p2p")) == [(C,)] * 6 + [()] * 4
    # the word blend (0.2..1 = steps 2..9) reads the source's cond cross maps after the windows too
    assert runs(A.Control("p2p", blend_words=("b",))) == [(C,)] * 10
    # a given mask blends without maps
    assert runs(A.Control("p2p", mask=torch.ones(1, 8, 8))) == [(C,)] * 6 + [()] * 4
    # masactrl records both chunks from step 4 of 50; nothing before
    assert runs(A.defaults("masactrl"), steps=50) == [()] * 4 + [(U, C)] * 46
    assert runs(A.defaults("masactrl"), chunks=(C,), steps=50) == [()] * 4 + [(C,)] * 46   # cfg 1
    # pnp: both chunks in its q/k window 0..0.5 (the default's features in block 4: none of LAYERS is a FEATURE)
    assert runs(A.defaults("pnp")) == [(U, C)] * 5 + [()] * 5
    # source_drift from the source branch needs its full guided prediction at every step
    assert runs(A.defaults("p2p"), inline=True) == [(U, C)] * 10
    # a BDIA replay: batched as the edit is wherever the source runs (bit-identical records), still skipped after
    assert runs(A.defaults("p2p"), batched=True) == [(U, C)] * 6 + [()] * 4
    assert runs(A.defaults("p2p"), chunks=(C,), batched=True) == [(C,)] * 6 + [()] * 4
    zero = A.Control("p2p", self_window=A.Window(0, 0), cross_window=A.Window(0, 0))
    assert runs(zero) == [()] * 10
    # cost in batch rows against a plain edit: 1 + mean(source rows) / rows per step
    assert A.source_cost({s: (C,) for s in range(6)} | {s: () for s in range(6, 10)}, (U, C)) == 1.3
    assert A.source_cost({s: (U, C) for s in range(4)}, (U, C)) == 2.0
    assert A.source_cost({}, (U, C)) == 1.0


def test_blend_layers_are_the_factor_4_cross_layers_else_the_coarsest():
    assert A.blend_layers(LAYERS) == [la for la in LAYERS if la.kind == A.CROSS and la.factor == 2]
    four = LAYERS + [A.Layer(A.CROSS, ("input", 7), 0, 4)]
    assert A.blend_layers(four) == [four[-1]]


def test_bad_controls_are_refused_naming_the_fix():
    with pytest.raises(InversionInputError, match="use fractions"):
        A.check(A.Control(self_window=A.Window(0.5, 0.2)))
    with pytest.raises(InversionInputError, match="reweight_words"):
        A.check(A.Control(mode="reweight"))
    with pytest.raises(InversionInputError, match="one of p2p, pnp, masactrl"):
        A.defaults("sdedit")



# a tiny Flux-like DiT: double blocks 0-1, single blocks 0-3, all joint attention
# (factor 2: patch 2, so a UNet policy left unguarded would take them for small self layers)
DIT = [A.Layer(A.JOINT, ("double_block", i), 0, 2) for i in range(2)] + \
      [A.Layer(A.JOINT, ("single_block", i), 0, 2) for i in range(4)]


def test_v_inject_policy_matrix():
    c = A.defaults("v_inject", single_blocks=4)               # 20/38 of 4 -> single blocks 2..3
    got = _table(c, 20, DIT + LAYERS)
    for (name, s, ch), a in got.items():
        kind, block = name.split(" ")
        want = "v_inject" if block in ("single_block2.0", "single_block3.0") and s < 2 else None   # 10% of 20
        assert a == want, (name, s, ch, a)
    assert c.blocks == ("single_block", 2, 3) and c.self_window == A.Window(0.0, 0.1)


def test_unet_methods_never_act_in_joint_layers():
    for m in A.METHODS:
        c = A.Control(**{**A.defaults(m).__dict__, "blocks": ()})          # every block
        assert all(a is None for a in _table(c, 10, DIT).values()), m


@pytest.mark.parametrize("count,want", [(38, (20, 37)), (19, (10, 18)), (57, (30, 56)), (4, (2, 3)), (3, (2, 2)),
                                        (2, (1, 1)), (1, (0, 0))])
def test_v_inject_blocks_scale_rf_edits_20_to_37_of_38(count, want):
    assert A.defaults("v_inject", single_blocks=count).blocks == ("single_block",) + want
    assert A.defaults("v_inject").blocks == ("single_block", 20, 37)       # Flux's 38 by default


SD3 = [A.Layer(A.JOINT, ("double_block", i), 0, 2) for i in range(5)]     # SD3's joint blocks only


@pytest.mark.parametrize("layers,want", [(DIT, ("single_block", 2, 3)), (SD3, ("double_block", 0, 3)),
                                         (SD3[:1], ("double_block", 0, 0)), (SD3[:2], ("double_block", 0, 0))])
def test_v_inject_family_default_blocks_follow_the_models_layers(layers, want):
    """blocks FAMILY: Flux/Chroma's singles scaled from RF-Edit's 20-37 of 38; SD3's joint blocks all but the last
    (DirectEdit's SD3.5 choice); a given blocks value is kept as it is."""
    c = A.Control("v_inject", self_window=A.Window(0, 0.1), cross_window=A.Window(), blocks=A.FAMILY)
    r = A.for_model(c, layers)
    assert r.blocks == want and r.self_window == c.self_window and r.method == "v_inject"
    given = A.Control("v_inject", blocks=("single_block", 0, 0))
    assert A.for_model(given, DIT) is given
    unet = A.for_model(A.Control("masactrl", blocks=A.FAMILY), LAYERS)
    assert unet.blocks == ("output", 6, 11)
    with pytest.raises(InversionInputError, match="not resolved"):
        A.action(c, DIT[0], 0, 10, C)


def test_a_method_of_the_other_architecture_is_refused_naming_the_fix():
    for m in A.METHODS:
        with pytest.raises(InversionInputError, match=f"method {m} acts in a UNet.*use method v_inject"):
            A.for_model(A.defaults(m), DIT)
        with pytest.raises(InversionInputError, match="use method v_inject"):
            A.for_model(A.defaults(m), SD3)
    with pytest.raises(InversionInputError, match="this model is a UNet; use method p2p, pnp or masactrl"):
        A.for_model(A.defaults("v_inject"), LAYERS)
    assert A.for_model(A.defaults("v_inject"), DIT + LAYERS).method == "v_inject"


def test_v_inject_counts_are_blocks_times_steps_times_chunks_and_refusals():
    c = A.defaults("v_inject", single_blocks=4)
    sch = A.schedule(c, DIT, 28, range(28), (U, C))
    assert sch.injections == 2 * 2 * 2                       # blocks 2,3 x steps 0,1 (int(0.1*28)=2) x 2 chunks
    assert "v_inject: 2 layers x 2 steps x 2 chunks = 8" in sch.report()
    one = A.Control(**{**c.__dict__, "self_window": A.Window(0.0, 1 / 28 + 1e-9)})   # FireFlow: one step
    assert A.schedule(one, DIT, 28, range(28), (C,)).injections == 2
    assert A.parse_blocks("single 20-37", ()) == ("single_block", 20, 37)
    assert A.parse_blocks("double 3", ()) == ("double_block", 3, 3)
    assert A.check(c) is c
    with pytest.raises(InversionInputError, match="needs a DiT with single blocks"):
        A.defaults("v_inject", single_blocks=0)
    with pytest.raises(InversionInputError, match="single 20-37"):
        A.parse_blocks("singel 20", ())


def test_inject_values_takes_the_image_tokens_from_the_source_and_changes_no_input():
    g = torch.Generator().manual_seed(3)
    ve = torch.randn(2, 3, 7, 4, generator=g)                # [B, H, N = 3 text + 4 image, D]
    vs = torch.randn(2, 3, 7, 4, generator=g, dtype=torch.float64)
    ve0, vs0 = ve.clone(), vs.clone()
    out = A.inject_values(ve, vs, 4)
    for n in range(7):                                       # token by token: text from the edit, image from source
        want = ve[:, :, n] if n < 3 else vs[:, :, n].float()
        assert torch.equal(out[:, :, n], want), n
    assert out.dtype == ve.dtype and torch.equal(ve, ve0) and torch.equal(vs, vs0)
    assert torch.equal(A.inject_values(ve.transpose(1, 2), vs.transpose(1, 2), 4, dim=1), out.transpose(1, 2))
    with pytest.raises(InversionInputError, match="same latent size"):
        A.inject_values(ve, vs[:, :, :6], 4)
    with pytest.raises(InversionInputError, match="same latent size"):
        A.inject_values(ve, vs, 8)

# ---------------------------------------------------------------------------------------------- the maps
def _qkv(b=2, nq=6, nk=5, heads=2, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, heads * d, generator=g, dtype=torch.float64) for n in (nq, nk, nk)]


def _ref_probs(q, k, heads):
    """A per-head loop reference (float64)."""
    b, nq, hd = q.shape
    d = hd // heads
    out = torch.zeros(b, heads, nq, k.shape[1], dtype=torch.float64)
    for h in range(heads):
        qh, kh = q[..., h * d:(h + 1) * d], k[..., h * d:(h + 1) * d]
        out[:, h] = torch.softmax(qh @ kh.transpose(1, 2) / d ** 0.5, dim=-1)
    return out


def test_probs_and_attend_equal_a_loop_reference_and_torch_sdpa():
    q, k, v = _qkv()
    assert torch.allclose(A.probs(q, k, 2).double(), _ref_probs(q, k, 2), atol=1e-6)
    qh, kh, vh = (A.heads_first(t.float(), 2) for t in (q, k, v))
    sdpa = A.heads_last(torch.nn.functional.scaled_dot_product_attention(qh, kh, vh))
    assert torch.allclose(A.attend(q.float(), k.float(), v.float(), 2), sdpa, atol=1e-6)


def test_pnp_uses_source_q_k_and_masactrl_source_k_v():
    qs, ks, vs = _qkv(seed=1)
    qe, ke, ve = _qkv(seed=2)
    ref_pnp = torch.einsum("bhnm,bhmd->bhnd", _ref_probs(qs, ks, 2), A.heads_first(ve, 2))
    assert torch.allclose(A.pnp(qs, ks, ve, 2), A.heads_last(ref_pnp).to(ve.dtype), atol=1e-6)
    ref_masa = torch.einsum("bhnm,bhmd->bhnd", _ref_probs(qe, ks, 2), A.heads_first(vs, 2))
    assert torch.allclose(A.masactrl(qe, ks, vs, 2), A.heads_last(ref_masa).to(vs.dtype), atol=1e-6)


# ---------------------------------------------------------------------------------------------- P2P alignment
# "<s> a cat sits <e> <pad>..." with 8 slots; "cat" is one token, "hippo" two
SRC = P.Prompt(("a", "cat", "sits"), ((1, 2), (2, 3), (3, 4)), 8)
DOG = P.Prompt(("a", "dog", "sits"), ((1, 2), (2, 3), (3, 4)), 8)
HIPPO = P.Prompt(("a", "hippo", "sits"), ((1, 2), (2, 4), (4, 5)), 8)
BLACK = P.Prompt(("a", "black", "cat", "sits"), ((1, 2), (2, 3), (3, 4), (4, 5)), 8)


def test_replace_mapper_word_swap_is_the_identity():
    assert torch.equal(P.replace_mapper(SRC, DOG), torch.eye(8))


def test_replace_mapper_spreads_a_swapped_word_over_its_new_tokens_and_shifts_the_tail():
    m = P.replace_mapper(SRC, HIPPO)
    want = torch.zeros(8, 8)
    want[0, 0] = want[1, 1] = 1          # <s>, a
    want[2, 2] = want[2, 3] = 0.5        # cat -> hip po
    want[3, 4] = 1                       # sits
    for i, j in zip(range(4, 8), range(5, 8), strict=False):
        want[i, j] = 1                   # <e> and padding shifted by one
    assert torch.equal(m, want)


def test_refine_aligns_equal_words_and_leaves_new_words_to_the_edit():
    index, alpha = P.refine_mapper(SRC, BLACK)
    assert index.tolist() == [0, 1, 0, 2, 3, 4, 5, 6]
    assert alpha.tolist() == [1, 1, 0, 1, 1, 1, 1, 1]


def test_unalignable_prompts_are_refused_naming_refine():
    with pytest.raises(InversionInputError, match="same number of words.*use p2p_mode refine"):
        P.align(SRC, BLACK, "replace")
    with pytest.raises(InversionInputError, match="'horse' is not in the prompt"):
        P.align(SRC, DOG, "replace", reweight_words=("horse",), reweight=2.0)


def test_cross_map_replace_refine_reweight_equal_loop_references():
    g = torch.Generator().manual_seed(3)
    src = torch.softmax(torch.randn(2, 3, 4, 8, generator=g), -1)
    edit = torch.softmax(torch.randn(2, 3, 4, 8, generator=g), -1)
    al = P.align(SRC, HIPPO, "replace", reweight_words=("hippo",), reweight=2.0)
    m = P.replace_mapper(SRC, HIPPO)
    ref = torch.zeros_like(src)
    for n in range(8):
        for w in range(8):
            ref[..., n] += src[..., w] * m[w, n]
    ref[..., 2:4] *= 2.0
    assert torch.allclose(P.cross_map(src, edit, al), ref, atol=1e-7)
    index, alpha = P.refine_mapper(SRC, BLACK)
    ref = torch.stack([src[..., int(index[n])] if alpha[n] else edit[..., n] for n in range(8)], -1)
    assert torch.allclose(P.cross_map(src, edit, P.align(SRC, BLACK, "refine")), ref, atol=1e-7)


def test_cross_map_tiles_the_alignment_when_comfyui_repeats_the_context():
    g = torch.Generator().manual_seed(4)
    src = torch.softmax(torch.randn(1, 2, 3, 16, generator=g), -1)
    al = P.align(SRC, HIPPO, "replace")
    out = P.cross_map(src, src, al)
    assert torch.allclose(out[..., :8], torch.einsum("bhpw,wn->bhpn", src[..., :8], al.mapper), atol=1e-7)
    assert torch.allclose(out[..., 8:], torch.einsum("bhpw,wn->bhpn", src[..., 8:], al.mapper), atol=1e-7)
    edit = torch.softmax(torch.randn(1, 2, 3, 16, generator=g), -1)
    ref = P.align(SRC, BLACK, "refine")
    out = P.cross_map(src, edit, ref)
    assert torch.allclose(out[..., 8:], P.cross_map(src[..., 8:], edit[..., 8:], ref), atol=1e-7)
    with pytest.raises(InversionInputError, match="Attention Prompts"):
        P.cross_map(src[..., :12], src[..., :12], al)


def test_blend_mask_thresholds_the_pooled_normalised_maps_and_unites_both():
    s = torch.zeros(1, 1, 4, 4)
    e = torch.zeros(1, 1, 4, 4)
    s[0, 0, 0, 0] = 2.0
    e[0, 0, 3, 3] = 1.0
    e[0, 0, 0, 3] = 0.2                               # below 0.3 of the edit's peak: not in the mask
    m = P.blend_mask(s, e, (8, 8), 0.3)
    want = torch.zeros(1, 1, 8, 8)
    want[..., :4, :4] = 1                             # 3x3 pool of (0, 0) covers cells 0..1 -> pixels 0..3
    want[..., 4:, 4:] = 1
    assert torch.equal(m, want)
    x_src, x_edit = torch.zeros(1, 4, 8, 8), torch.ones(1, 4, 8, 8)
    assert torch.equal(P.local_blend(x_src, x_edit, m), want.expand(1, 4, 8, 8))


def test_word_map_sums_the_words_tokens_and_averages_heads():
    p = torch.arange(2 * 2 * 4 * 8, dtype=torch.float32).reshape(2, 2, 4, 8)
    ref = (p[..., 2] + p[..., 3]).mean(1).reshape(2, 1, 2, 2)
    assert torch.equal(P.word_map(p, HIPPO.positions("hippo"), (2, 2)), ref)


# ---------------------------------------------------------------------------------------------- the loop's hook
class _Spy:
    def __init__(self, traj, pin):
        self.traj, self.pin, self.seen, self.after_steps = traj, pin, [], []

    def source(self, x, sigma, step):
        i = self.traj.steps - step
        self.seen.append((step, float(sigma), bool(torch.equal(x, self.traj.states[i]))))

    def after(self, step, x_new, x_source):
        self.after_steps.append(step)
        assert torch.equal(x_source.float(), self.traj.states[self.traj.steps - step - 1])
        return x_source if self.pin else x_new        # pin: a full "blend" back to the stored state


@pytest.mark.parametrize("method,replay", [("ddim", "ddim"), ("exact", "bdia")])
def test_sample_evaluates_the_source_on_the_stored_states_every_step(method, replay):
    from inversion import methods as M
    sig = torch.tensor([0.0, 0.5, 1.0, 2.0, 4.0])
    traj = M.invert(torch.ones(1, 2, 2, 2), sig, lambda x, s: 0.5 * x, M.Options(method))
    spy = _Spy(traj, pin=False)
    M.sample(traj, lambda x, s: 0.3 * x, replay=replay, start_step=1, control=spy)
    first = 1 if replay == "ddim" else 2                  # a BDIA replay starts one level lower
    assert [s for s, _, _ in spy.seen] == list(range(first, 4)) == spy.after_steps
    assert all(same for _, _, same in spy.seen)
    assert [sg for _, sg, _ in spy.seen] == [float(sig[4 - s]) for s in range(first, 4)]
    pinned = M.sample(traj, lambda x, s: 0.3 * x, replay=replay, start_step=1, control=_Spy(traj, pin=True))
    assert torch.equal(pinned, traj.states[0])            # after() returned the stored state: the source


def test_word_spans_walk_the_tokens_in_order_and_refuse_a_word_not_found():
    toks = [900, 1, 1, 7, 8, 2, 901, 901]
    assert P.word_spans(toks, [("x", [1]), ("x", [1]), ("long", [7, 8]), ("y", [2])], "t") == \
        ((1, 2), (2, 3), (3, 5), (5, 6))
    with pytest.raises(InversionInputError, match="'z' is not found.*plain words"):
        P.word_spans(toks, [("x", [1]), ("z", [5])], "t")


class _Source:
    def __init__(self, fn):
        self.fn = fn

    def source(self, x, sigma, step):
        return self.fn(x, sigma)

    def after(self, step, x_new, x_source):
        return x_new


@pytest.mark.parametrize("method,replay", [("ddim", "ddim"), ("exact", "bdia"), ("exact", "ddim")])
def test_inline_drift_from_the_source_branch_equals_the_separate_drift_pass(method, replay):
    from inversion import methods as M
    sig = torch.tensor([0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0])   # long enough for BDIA's x_hi to leave the stored
    traj = M.invert(torch.ones(1, 2, 2, 2), sig, lambda x, s: 0.5 * x, M.Options(method))
    src = lambda x, s: 0.4 * x + 0.1 * s          # noqa: E731 -- the source prompt's model
    edit = lambda x, s: 0.2 * x                   # noqa: E731
    gaps = M.source_drift(traj, src, replay=replay, start_step=1)
    want = M.sample(traj, edit, replay=replay, start_step=1, drift=gaps)
    got = M.sample(traj, edit, replay=replay, start_step=1, control=_Source(src), inline_drift=True)
    assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())
    plain = M.sample(traj, edit, replay=replay, start_step=1)
    assert float((plain - want).abs().max()) > 1e-2                 # the drift does something here


# ---------------------------------------------------------------------------------------------- kv_edit (KV-Edit)
def _kv(**kw):
    return A.Control(**{**A.defaults("kv_edit").__dict__, "mask": torch.ones(1, 1, 4, 4), **kw})


def test_kv_edit_policy_matrix():
    """Every joint block, every step, both chunks; never a UNet layer; blend (the latent's background) at every
    step; refused without a mask, on a UNet, and blocks FAMILY resolve to every block."""
    c = _kv()
    for (name, s, ch), a in _table(c, 10, DIT + LAYERS).items():
        assert a == ("kv_edit" if name.startswith("joint") else None), (name, s, ch, a)
    sch = A.schedule(c, DIT, 10, range(2, 10), (U, C))
    assert sch.injections == 6 * 8 * 2 and sch.blend_steps == tuple(range(2, 10)) and sch.blend == ()
    assert "kv_edit: 6 layers x 8 steps x 2 chunks = 96" in sch.report()
    assert A.for_model(_kv(blocks=A.FAMILY), DIT).blocks == ()
    assert A.schedule(_kv(blocks=("single_block", 1, 2)), DIT, 10, range(10), (C,)).injections == 2 * 10
    with pytest.raises(InversionInputError, match="kv_edit needs a mask.*connect blend_mask"):
        A.check(_kv(mask=None))
    with pytest.raises(InversionInputError, match="method kv_edit acts in a DiT.*use method p2p"):
        A.for_model(_kv(), LAYERS)
    assert not A.Control("pnp", mask=torch.ones(1, 1, 2, 2)).blends and _kv().blends


def test_background_tokens_are_the_patches_the_mask_does_not_touch():
    m = torch.zeros(1, 4, 5, 6)          # latent 5x6, patch 2 -> 3x3 patches (the last row padded)
    m[:, :, 1, 1] = 1.0                  # touches patch (0, 0)
    m[:, :, 4, 5] = 0.7                  # touches patch (2, 2), the padded row
    m[:, :, 3, 2] = 0.4                  # below 0.5: background
    want = torch.ones(1, 9, dtype=torch.bool)
    want[0, 0] = want[0, 8] = False
    assert torch.equal(A.background_tokens(m, 2), want)
    assert A.background_tokens(torch.zeros(2, 6, 6), 3).shape == (2, 4)


@pytest.mark.parametrize("layout", ["flux", "sd3_k", "sd3_v"])
def test_inject_background_takes_exactly_the_background_image_tokens(layout):
    g = torch.Generator().manual_seed(3)
    B, H, T, NI, D = 2, 3, 4, 6, 5          # batch, heads, text tokens, image tokens, head dim
    shape, dim = {"flux": ((B, H, T + NI, D), 2), "sd3_k": ((B, T + NI, H * D), 1),
                  "sd3_v": ((B, T + NI, H, D), 1)}[layout]
    e, s = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    e0, s0 = e.clone(), s.clone()
    bg = torch.tensor([[True, False, True, True, False, False], [False] * 5 + [True]])
    out = A.inject_background(e, s, bg, dim)
    assert torch.equal(e, e0) and torch.equal(s, s0)
    for b in range(B):                                       # loop reference, token by token
        for n in range(T + NI):
            src = n >= T and bool(bg[b, n - T])
            want = (s if src else e).select(dim, n)[b]
            assert torch.equal(out.select(dim, n)[b], want), (layout, b, n)
    one = A.inject_background(e, s, bg[:1], dim)             # one mask for the whole batch = each sample's
    assert torch.equal(one, A.inject_background(e, s, bg[:1].expand(B, NI), dim))
    assert not torch.equal(one, out)
    with pytest.raises(InversionInputError, match="same latent size"):
        A.inject_background(e, s, torch.ones(3, NI, dtype=torch.bool), dim)


# PnP's decoder features: one FEATURE layer per decoder block, as the adapter lists them for SD1.5 (12 blocks)
FEATURES = [A.Layer(A.FEATURE, ("output", i), 0) for i in range(12)]


def test_pnp_feature_policy_matrix():
    # PnP's code: block 4 of the decoder's 12, the first 80% of the steps (int(0.8 * 10) = 8), both chunks; the
    # attention actions never touch a FEATURE layer and the feature action never an attention layer
    got = _table(A.defaults("pnp"), 10, LAYERS + FEATURES)
    for (name, s, ch), a in got.items():
        kind, block = name.split(" ")
        if kind == "feature":
            want = "pnp_feature" if block == "output4.0" and s < 8 else None
        else:
            want = "pnp_qk" if kind == "self" and block.startswith("output") and s < 5 else None
        assert a == want, (name, s, ch, a)
    for method in ("p2p", "masactrl"):         # other methods: no feature injection at any step or chunk
        assert not any(a == "pnp_feature" for a in _table(A.defaults(method), 10, FEATURES).values())
    moved = A.Control("pnp", feature_window=A.Window(0.2, 0.5), feature_block=7)
    assert {(n, s) for (n, s, ch), a in _table(moved, 10, FEATURES).items() if a} == \
        {("feature output7.0", s) for s in (2, 3, 4)}


def test_pnp_feature_counts_and_a_missing_block_is_refused():
    c = A.for_model(A.defaults("pnp"), LAYERS + FEATURES)
    sch = A.schedule(c, LAYERS + FEATURES, 50, range(50), (U, C))
    assert "pnp_feature: 1 layers x 40 steps x 2 chunks = 80" in sch.report()
    assert sch.injections == 80 + 3 * 25 * 2      # + 3 decoder self layers (output 4, 6, 11) x 25 steps x 2
    with pytest.raises(InversionInputError, match="decoder block 4.*feature_block"):
        A.for_model(A.defaults("pnp"), LAYERS + FEATURES[:4])       # a decoder of 4 blocks has no block 4
    assert A.for_model(A.Control("pnp"), LAYERS) == A.Control("pnp")   # no feature window: nothing to find


def test_inject_values_and_background_take_the_image_tokens_from_start_and_keep_the_reference():
    """[text; image; reference] (Flux Kontext / Flux 2's reference latents after the image): with ``start`` = the
    text's length, only the image's tokens come from the source; the text before and the reference after keep
    the edit's, token by token; a window past the end is refused."""
    g = torch.Generator().manual_seed(4)
    T, NI, R = 3, 4, 2
    ve = torch.randn(2, 3, T + NI + R, 5, generator=g)      # [B, H, N, D]
    vs = torch.randn(2, 3, T + NI + R, 5, generator=g, dtype=torch.float64)
    ve0, vs0 = ve.clone(), vs.clone()
    bg = torch.tensor([[True, False, True, True]])
    out_v = A.inject_values(ve, vs, NI, 2, start=T)
    out_b = A.inject_background(ve, vs, bg, 2, start=T)
    for n in range(T + NI + R):
        img = T <= n < T + NI
        assert torch.equal(out_v[:, :, n], vs[:, :, n].float() if img else ve[:, :, n]), n
        src = img and bool(bg[0, n - T])
        assert torch.equal(out_b[:, :, n], vs[:, :, n].float() if src else ve[:, :, n]), n
    assert torch.equal(ve, ve0) and torch.equal(vs, vs0)
    assert torch.equal(A.inject_values(ve, vs, NI + R, 2, start=T), A.inject_values(ve, vs, NI + R, 2))
    with pytest.raises(InversionInputError, match="same latent size"):
        A.inject_values(ve, vs, NI, 2, start=T + R + 1)
    with pytest.raises(InversionInputError, match="same latent size"):
        A.inject_background(ve, vs, bg, 2, start=T + R + 1)


def _unet(blocks):
    """Self and cross layers of a UNet in execution order from [(block, transformer depth)]."""
    return [A.Layer(k, b, j, 1) for b, depth in blocks for j in range(depth) for k in (A.SELF, A.CROSS)]


# the real topologies (ComfyUI's block ids): SD1.5's 16 transformer blocks, SDXL's 70 (MasaCtrl's counts)
SD15_UNET = _unet([(("input", i), 1) for i in (1, 2, 4, 5, 7, 8)] + [(("middle", 0), 1)]
                  + [(("output", i), 1) for i in range(3, 12)])
SDXL_UNET = _unet([(("input", i), d) for i, d in ((4, 2), (5, 2), (7, 10), (8, 10))] + [(("middle", 0), 10)]
                  + [(("output", i), 10) for i in range(3)] + [(("output", i), 2) for i in range(3, 6)])


@pytest.mark.parametrize("family,layers,start", [("SD15", SD15_UNET, 10), (None, SD15_UNET, 10),
                                                 ("SD20", SD15_UNET, 10), ("SDXL", SDXL_UNET, 44)])
def test_masactrl_family_default_blocks_are_its_start_layer_in_execution_order(family, layers, start):
    """MasaCtrl counts transformer blocks in execution order and injects from a start layer on (its code: 10 of 16
    on SD1.x; run_synthesis_sdxl.py: 44 of 70 first, on SDXL) from step 4 of 50: blocks FAMILY resolved for the
    family inject exactly into the self layers counted from ``start``, every step from 4, both chunks."""
    selfs = [la for la in layers if la.kind == A.SELF]
    assert len(selfs) == (70 if family == "SDXL" else 16)
    c = A.for_model(A.Control("masactrl", self_window=A.Window(4 / 50, 1.0), blocks=A.FAMILY), layers, family)
    got = _table(c, 50, layers)
    want = {(la.name(), s, ch): ("masactrl_kv" if la.kind == A.SELF and selfs.index(la) >= start and s >= 4
                                 else None) for la in layers for s in range(50) for ch in (C, U)}
    assert got == want
    assert A.for_model(A.Control("masactrl", blocks=("output", 2, 5)), layers, family).blocks == ("output", 2, 5)
