"""Null-text inversion and negative-prompt inversion on the analytic oracle (pure torch, no ComfyUI).

The oracle (ddiminv_dev.gmm.EmbeddingOracle): the GMM posterior mean conditioned on an embedding tensor
[B, 8, 48]. Each sample's embedding has 8 * 48 = 384 degrees of freedom against 256 state values: 4 shift
the mixture's log weights (the "which components" part of a prompt), 380 drive a smooth bounded offset
A @ tanh(.) of the prediction (the "style" part). The empty prompt is the zero embedding (= the full
mixture, no offset); the source prompt is components {0, 1, 2} in a seeded style whose offset has RMS 0.05
(a prompt that changes the prediction near the data too, so CFG 7.5 drifts away from a CFG-1 inversion).
Positive and negative predictions are the same network with two embeddings, as in a real model.

Measured (oracle seed 4, source = one component-0 sample, CFG-1 ddim/predicted pivot, regenerated at CFG
7.5; relative error ||x_0 - source|| / ||source||; NT = null-text with the defaults: 10 iterations, lr 1e-2,
early stop 1e-5, no ramp; updates = Adam updates = backward passes, nfe = cond + uncond evaluations):

    case          CFG-1 replay  plain@7.5  null-text  (cut)   NPI@7.5   source_drift  updates  nfe
    EPS  10 st.   0.0918        0.656      0.0311     21x     0.0918    5.6e-9        100      120
    EPS  50 st.   0.0085        0.876      0.0112     78x     0.0085    9.9e-9        128      228
    flow 10 st.   0.0868        0.464      0.0166     28x     0.0868    5.2e-9        100      120
    flow 50 st.   0.0026        0.851      0.0113     75x     0.0026    6.5e-9        269      369

NPI equals the CFG-1 sampler (its error is the pivot's own round-trip error); null-text targets the pivot's
states and the pivot's last state is the source itself, so at 10 steps it beats NPI, at 50 it does not
(its error is the last steps' residual loss, ~1e-4). source_drift pins the stored states exactly. The
oracle's offset scale (1.0) is a calibration: at 0.5 / 2.0 the cut is 22-148x / 17-35x.
"""
import math

import pytest
import torch

from ddiminv_dev.gmm import GMM, EmbeddingOracle, inversion_schedule as sched, rel_error as rel
from inversion import methods as M
from inversion import nulltext as NT
from inversion.errors import InversionInputError

ORACLE_SEED = 4
COND = [0, 1, 2]
STYLE_RMS = 0.05
CFG = 7.5


class Case:
    """Oracle, prompt embeddings and a CFG-1 pivot of ``x0`` for one family."""

    def __init__(self, flow, steps, x0=None, subset=COND, oracle=None):
        self.g = GMM.make(seed=ORACLE_SEED)
        self.o = oracle if oracle is not None else EmbeddingOracle.make(self.g, flow=flow)
        self.style = self.o.style(STYLE_RMS)
        self.pos = self.o.encode(subset, style=self.style)
        self.null0 = self.o.empty()
        self.x0 = x0 if x0 is not None else self.g.sample_x0([0], seed=1)
        self.cond_fn = self.prompt_fn(self.pos)
        self.uncond_fn = self.o.denoise
        self.pivot = M.invert(self.x0, sched(flow, steps), self.cond_fn, M.Options("ddim"),
                              family="flow" if flow else "vp")

    def prompt_fn(self, emb):
        return lambda x, sigma: self.o.denoise(x, sigma, emb)


def guided(cond_fn, uncond_fn, emb, w):
    """``model_fn(x, sigma)`` = D_u + w (D_c - D_u) with a fixed negative ``emb`` (what CFGGuider computes)."""
    def fn(x, sigma):
        Du = uncond_fn(x, sigma, emb)
        return Du + w * (cond_fn(x, sigma) - Du)
    return fn


def replay(pivot, cond_fn, uncond_fn, embeddings, w, mask=None):
    """The Inverted-Latent Sampler's replay (methods.sample, DDIM) with step k's negative bound to the
    evaluations at sampling sigma k, as ComfyUI's start/end percent ranges bind it. Returns the states in
    sampling order [N+1, B, ...]."""
    at = {float(v): k for k, v in enumerate(pivot.sampling_sigmas()[:-1].tolist())}
    states = [pivot.noise]

    def fn(x, sigma):
        return guided(cond_fn, uncond_fn, embeddings[at[float(sigma)]], w)(x, sigma)

    M.sample(pivot, fn, mask=mask, progress=lambda n, total, x, D: states.append(x.clone()))
    return torch.stack(states)


@pytest.fixture(scope="module")
def vp20():
    return Case(False, 20)


# ---------------------------------------------------------------------------------------------- the oracle
@pytest.mark.parametrize("flow", [False, True], ids=["eps", "flow"])
def test_embedding_oracle_is_the_mixture_with_prompts(flow):
    g = GMM.make(seed=ORACLE_SEED)
    o = EmbeddingOracle.make(g, flow=flow)
    assert o.degrees_of_freedom == 384 > 256 == g.means.shape[1]
    x = g.sample_x0([0, 3], seed=2) + 0.7 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    s = 0.6
    assert torch.allclose(o.denoise(x, s, o.empty()), g.denoise(x, s, flow), atol=1e-6)          # empty = all
    assert torch.allclose(o.denoise(x, s, o.encode(COND)), g.denoise(x, s, flow, COND), atol=1e-6)
    st = o.style(STYLE_RMS)
    off = o.denoise(x, s, o.encode(COND, style=st)) - g.denoise(x, s, flow, COND)
    assert float(off.pow(2).mean().sqrt()) == pytest.approx(STYLE_RMS, rel=1e-3)
    assert torch.allclose(off[0], off[1], atol=1e-6)                     # the style offset: same everywhere
    # rows are independent and the prediction is differentiable in the embedding
    e = torch.randn(2, 8, 48, generator=torch.Generator().manual_seed(1)).mul(0.1).requires_grad_(True)
    both = o.denoise(x, s, e)
    assert torch.allclose(both[1:], o.denoise(x[1:], s, e[1:]), atol=1e-6)
    (gr,) = torch.autograd.grad(both[0].sum(), [e])
    assert float(gr[0].abs().sum()) > 0 and float(gr[1].abs().sum()) == 0


# ---------------------------------------------------------------------------------------------- fidelity
BARS = {  # (flow, steps): null-text error bar, from the measured values in the module docstring (+~40%)
    (False, 10): 0.045, (False, 50): 0.016, (True, 10): 0.025, (True, 50): 0.016,
}


@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("flow", [False, True], ids=["eps", "flow"])
def test_null_text_cuts_the_cfg_drift_tenfold(flow, steps):
    c = Case(flow, steps)
    plain_fn = guided(c.cond_fn, c.uncond_fn, c.null0, CFG)
    cfg1 = rel(M.sample(c.pivot, c.cond_fn), c.x0)
    plain = rel(M.sample(c.pivot, plain_fn), c.x0)
    r = NT.optimize(c.pivot, c.cond_fn, c.uncond_fn, c.null0, NT.NullTextOptions(cfg=CFG))
    nt = rel(r.x0, c.x0)
    npi_x = M.sample(c.pivot, guided(c.cond_fn, c.uncond_fn, c.pos, CFG))    # the source prompt as negative
    npi = rel(npi_x, c.x0)
    gaps = M.source_drift(c.pivot, plain_fn)
    drift = rel(M.sample(c.pivot, plain_fn, drift=gaps), c.x0)
    print(f"\n[nulltext] {'flow' if flow else 'eps'} {steps} steps: cfg1 {cfg1:.4f} plain@{CFG} {plain:.4f} "
          f"null-text {nt:.4f} ({plain / nt:.0f}x) npi {npi:.4f} source_drift {drift:.1e} | updates "
          f"{int(r.iterations.sum())} nfe {r.nfe} (cond {r.nfe_cond}, uncond {r.nfe_uncond}) backward {r.backward}")
    assert plain > 0.4                              # the drift to fix is real (measured 0.46-0.88)
    assert nt <= plain / 10 and nt <= BARS[(flow, steps)], (plain, nt)
    assert int(r.iterations.max()) <= 10
    # NPI is the CFG-1 sampler at any CFG, so its error is the pivot's own round trip
    assert torch.allclose(npi_x, M.sample(c.pivot, c.cond_fn), atol=1e-5) and abs(npi - cfg1) < 1e-4
    assert drift <= 1e-6
    assert torch.isfinite(r.states).all()


def test_paper_ramp_saves_evaluations_but_costs_accuracy():
    """Why early_stop_ramp defaults to 0: the paper's 2e-5 per step (1e-3 over the schedule) lets the last,
    clean steps stop at a loss of ~1e-3 (RMS 0.03 in latent scale). Measured, EPS 50 steps: error 0.0269 at
    122 evaluations vs 0.0112 at 228 without the ramp."""
    c = Case(False, 50)
    base = NT.optimize(c.pivot, c.cond_fn, c.uncond_fn, c.null0, NT.NullTextOptions())
    ramp = NT.optimize(c.pivot, c.cond_fn, c.uncond_fn, c.null0, NT.NullTextOptions(early_stop_ramp=1e-3))
    e_base, e_ramp = rel(base.x0, c.x0), rel(ramp.x0, c.x0)
    assert e_ramp > 1.8 * e_base and ramp.nfe < 0.7 * base.nfe, (e_base, e_ramp, base.nfe, ramp.nfe)
    assert ramp.options.threshold(49, 50) == pytest.approx(1e-5 + 49 * 2e-5)   # the paper's rule at 50 steps
    assert base.options.lr(49, 50) == pytest.approx(1e-2 * (1 - 49 / 100))       # the paper's lr decay
    # at N steps the same relative schedules: step k of N is the paper's step 50 k / N
    assert ramp.options.threshold(9, 10) == pytest.approx(ramp.options.threshold(45, 50))
    assert base.options.lr(9, 10) == pytest.approx(1e-2 * (1 - 9 / 20))


# ---------------------------------------------------------------------------------------------- replay
def test_replaying_the_embeddings_reproduces_the_reconstruction(vp20):
    """The sampler, given embeddings[k] at sampling sigma k, produces exactly the optimiser's states and
    guided x0 estimates (what the Trajectory Preview shows as the reconstruction, without re-running it)."""
    c = vp20
    r = NT.optimize(c.pivot, c.cond_fn, c.uncond_fn, c.null0)
    assert r.sigmas.tolist() == c.pivot.sampling_sigmas().tolist()
    states = replay(c.pivot, c.cond_fn, c.uncond_fn, r.embeddings, r.cfg)
    assert (states - r.states).abs().max() <= 1e-6            # measured: bit-identical
    for k in (0, 7, 19):
        s = float(r.sigmas[k])
        D = guided(c.cond_fn, c.uncond_fn, r.embeddings[k], r.cfg)(r.states[k], s)
        assert (D - r.denoised[k]).abs().max() <= 1e-6
    # the embeddings matter: replaying the initial negative instead is the plain replay, far away
    plain = replay(c.pivot, c.cond_fn, c.uncond_fn, [c.null0] * 20, r.cfg)[-1]
    assert rel(plain, c.x0) > 10 * rel(r.x0, c.x0)


def test_the_loss_is_the_latent_scale_mse_to_the_pivot(vp20):
    """losses[k] = mean((c_in(sigma_{i-1}) (x_{i-1} - x*_{i-1}))^2) with i = N - k, c_in = 1/sqrt(1+sigma^2):
    the DDPM-latent scale of the paper's thresholds. ``input_scale`` overrides it."""
    c = vp20
    N = 20
    sig = c.pivot.sigmas.tolist()

    def recompute(res, cin):
        out = []
        for k in range(N):
            i = N - k
            d = (res.states[k + 1] - c.pivot.states[i - 1]) * cin(sig[i - 1])
            out.append(float(d.pow(2).mean()))
        return torch.tensor(out, dtype=torch.float64)

    r = NT.optimize(c.pivot, c.cond_fn, c.uncond_fn, c.null0)
    assert torch.allclose(r.losses[:, 0], recompute(r, lambda s: 1 / math.sqrt(1 + s * s)), rtol=1e-4, atol=1e-12)
    assert recompute(r, lambda s: 1.0)[0] > 50 * float(r.losses[0, 0])   # 1 + sigma_{N-1}^2 = 75: the scale matters
    u = NT.optimize(c.pivot, c.cond_fn, c.uncond_fn, c.null0, input_scale=lambda s: 1.0)
    assert torch.allclose(u.losses[:, 0], recompute(u, lambda s: 1.0), rtol=1e-4, atol=1e-12)


def test_zero_updates_is_the_plain_sampler(vp20):
    """An early stop no loss can miss: every step stops at its first evaluation, the embeddings stay the
    initial negative and the reconstruction is methods.sample's CFG-7.5 replay (same step, same guidance)."""
    c = vp20
    r = NT.optimize(c.pivot, c.cond_fn, c.uncond_fn, c.null0, NT.NullTextOptions(early_stop=1e9))
    assert int(r.iterations.sum()) == 0 and r.backward == 0 and r.nfe == 2 * 20
    assert all(torch.equal(e, c.null0) for e in r.embeddings)
    plain = M.sample(c.pivot, guided(c.cond_fn, c.uncond_fn, c.null0, CFG))
    assert (r.x0 - plain).abs().max() <= 1e-6


# ---------------------------------------------------------------------------------------------- costs
class Counting:
    """Wraps the oracle's callables: counts evaluations, grad-mode calls and backward passes."""

    def __init__(self, c):
        self.c = c
        self.cond = self.unc = self.unc_grad = self.backward = 0

    def cond_fn(self, x, sigma):
        assert not torch.is_grad_enabled() and not x.requires_grad
        self.cond += 1
        return self.c.cond_fn(x, sigma)

    def uncond_fn(self, x, sigma, emb):
        assert not x.requires_grad
        self.unc += 1
        if torch.is_grad_enabled() and emb.requires_grad:
            self.unc_grad += 1
            emb = emb * 1.0                                     # a fresh node per call: its hook fires once
            emb.register_hook(self._hook)                       # per backward pass through this evaluation
        return self.c.uncond_fn(x, sigma, emb)

    def _hook(self, g):
        self.backward += 1


def test_evaluation_and_backward_counts_are_exact(vp20):
    c = vp20
    n = Counting(c)
    seen = []
    opts = NT.NullTextOptions(iterations=7)
    r = NT.optimize(c.pivot, n.cond_fn, n.uncond_fn, c.null0, opts,
                    progress=lambda i, total, x, D: seen.append((i, total)))
    used = r.iterations[:, 0].tolist()
    N = 20
    assert 0 < sum(used) < N * 7 and max(used) <= 7              # early stop fires on some steps, not all
    # per step: 1 cond + (updates + 1) uncond evaluations, `updates` of them with a graph and a backward each
    assert r.nfe_cond_per_step == (1,) * N and n.cond == N
    assert r.nfe_uncond_per_step == tuple(u + 1 for u in used) and n.unc == r.nfe_uncond == sum(used) + N
    assert r.backward_per_step == tuple(used) and n.backward == r.backward == sum(used)
    assert n.unc_grad == sum(u + (u < 7) for u in used)          # the 8th evaluation of a full step has no graph
    assert r.nfe == N + sum(used) + N
    # progress after every uncond evaluation, in its step's slots of (iterations + 1)
    assert len(seen) == r.nfe_uncond and all(t == N * 8 for _, t in seen)
    idx = [i for i, _ in seen]
    assert idx == sorted(set(idx)) and idx[0] == 0
    assert idx == [k * 8 + j for k in range(N) for j in range(used[k] + 1)]


def test_early_stop_reduces_iterations(vp20):
    c = vp20
    full = NT.optimize(c.pivot, c.cond_fn, c.uncond_fn, c.null0, NT.NullTextOptions(early_stop=0.0))
    stop = NT.optimize(c.pivot, c.cond_fn, c.uncond_fn, c.null0, NT.NullTextOptions())
    assert int(full.iterations.min()) == 10 and full.nfe_uncond == 20 * 11
    assert int(stop.iterations.sum()) < 0.7 * int(full.iterations.sum())       # measured 134 vs 200
    assert bool((stop.losses[stop.iterations < 10] <= 1e-5).all())            # who stopped early met the bar
    # and loses little: both within the same small error (measured 0.0110 vs 0.0106)
    assert rel(stop.x0, c.x0) < 1.5 * rel(full.x0, c.x0) + 1e-3


# ---------------------------------------------------------------------------------------------- hygiene
def test_no_input_mutated_no_graph_weights_untouched():
    c = Case(True, 10)
    o = c.o
    o.proj.requires_grad_(True)                                 # a "weight" that would accumulate .grad
    keep_proj = o.proj.detach().clone()
    keep = {k: v.clone() for k, v in (("states", c.pivot.states), ("sigmas", c.pivot.sigmas),
                                      ("denoised", c.pivot.denoised), ("null0", c.null0), ("pos", c.pos))}
    try:
        r = NT.optimize(c.pivot, c.cond_fn, c.uncond_fn, c.null0)
    finally:
        o.proj.requires_grad_(False)
    assert o.proj.grad is None and torch.equal(o.proj.detach(), keep_proj)
    for k, v in (("states", c.pivot.states), ("sigmas", c.pivot.sigmas), ("denoised", c.pivot.denoised),
                 ("null0", c.null0), ("pos", c.pos)):
        assert torch.equal(v, keep[k]), k
    for t in (r.embeddings, r.states, r.losses, r.iterations, r.x0):
        assert not t.requires_grad and t.grad_fn is None
    assert torch.is_grad_enabled()                              # the caller's grad mode is restored
    assert r.embeddings.dtype == torch.float32 and r.embeddings.shape == (10, 1, 8, 48)
    assert float(r.sigmas[0]) == 1.0 and torch.isfinite(r.states).all()    # flow: starts at sigma = 1


def test_runs_inside_inference_mode_and_no_grad(vp20):
    """ComfyUI runs nodes under torch.inference_mode() and samplers under no_grad: autograd is enabled
    locally, inputs created in inference mode are fine, and the result is the same."""
    c = vp20
    ref = NT.optimize(c.pivot, c.cond_fn, c.uncond_fn, c.null0)
    with torch.inference_mode():
        piv = M.invert(c.x0, sched(False, 20), c.cond_fn, M.Options("ddim"))
        null0 = c.o.empty()
        with torch.no_grad():
            r = NT.optimize(piv, c.cond_fn, c.uncond_fn, null0)
    assert torch.equal(r.embeddings, ref.embeddings) and torch.equal(r.x0, ref.x0)
    assert not r.embeddings.is_inference()


def test_inference_mode_weights_get_a_message():
    g = GMM.make(seed=ORACLE_SEED)
    with torch.inference_mode():
        o = EmbeddingOracle.make(g)                             # "weights" created in inference mode
    c = Case(False, 5, oracle=o)
    with pytest.raises(NT.NullTextError, match="inference_mode") as err:
        NT.optimize(c.pivot, c.cond_fn, c.uncond_fn, c.null0)
    assert isinstance(err.value, InversionInputError) and "; the model must run with normal tensors" in str(err.value)


def test_a_non_finite_loss_names_the_step(vp20):
    c = vp20

    def overflowing(x, sigma, emb):
        D = c.uncond_fn(x, sigma, emb)
        return D * (math.inf if sigma < 1.0 else 1.0)

    with pytest.raises(NT.NullTextError, match=r"not finite at sampling step \d+ \(sigma") as err:
        NT.optimize(c.pivot, c.cond_fn, overflowing, c.null0)
    assert isinstance(err.value, InversionInputError) and "; run the model in float32" in str(err.value)


def test_interrupt_stops_and_leaves_inputs_alone(vp20):
    c = vp20
    calls = []

    class Stop(Exception):
        pass

    def check():
        calls.append(1)
        if len(calls) == 30:
            raise Stop

    keep = c.null0.clone()
    with pytest.raises(Stop):
        NT.optimize(c.pivot, c.cond_fn, c.uncond_fn, c.null0, check_interrupt=check)
    assert len(calls) == 30 and torch.equal(c.null0, keep)
    # checked before every evaluation: once per cond + once per uncond evaluation
    calls.clear()
    r = NT.optimize(c.pivot, c.cond_fn, c.uncond_fn, c.null0, check_interrupt=lambda: calls.append(1))
    assert len(calls) == r.nfe


def test_batch_equals_single_runs():
    """Per-sample loss, per-sample early stop (a finished row is frozen), one embedding per sample: a batch
    of two gives each sample exactly its single-run embeddings (measured: bit-identical) although the rows
    stop at different iterations."""
    g = GMM.make(seed=ORACLE_SEED)
    x0 = g.sample_x0([0, 1], seed=1)
    both = Case(False, 20, x0=x0)
    seen = []
    r = NT.optimize(both.pivot, both.cond_fn, both.uncond_fn, both.null0,         # null0 [1, ...]: expanded
                    progress=lambda i, total, x, D: seen.append((i, x.clone())))
    assert r.embeddings.shape == (20, 2, 8, 48) and r.losses.shape == (20, 2)
    assert bool((r.iterations[:, 0] != r.iterations[:, 1]).any())
    # a finished row is frozen: the previews of its later evaluations in that step show its final state
    frozen = 0
    for i, x in seen:
        k, j = divmod(i, 11)
        for b in range(2):
            if j > int(r.iterations[k, b]):
                frozen += 1
                assert torch.equal(x[b], r.states[k + 1][b]), (k, j, b)
    assert frozen > 10
    assert r.nfe_uncond_per_step == tuple(int(u) + 1 for u in r.iterations.max(1).values)
    for b in range(2):
        one = Case(False, 20, x0=x0[b:b + 1])
        s = NT.optimize(one.pivot, one.cond_fn, one.uncond_fn, one.null0)
        assert torch.allclose(r.embeddings[:, b], s.embeddings[:, 0], atol=1e-6)
        assert torch.allclose(r.x0[b], s.x0[0], atol=1e-6)
        assert torch.equal(r.iterations[:, b], s.iterations[:, 0])
    # a per-sample start is accepted too; a wrong batch is not
    r2 = NT.optimize(both.pivot, both.cond_fn, both.uncond_fn, both.null0.expand(2, 8, 48).clone())
    assert torch.equal(r2.embeddings, r.embeddings)
    with pytest.raises(NT.NullTextError, match="batch 3"):
        NT.optimize(both.pivot, both.cond_fn, both.uncond_fn, torch.zeros(3, 8, 48))


# ---------------------------------------------------------------------------------------------- edit
def test_edit_with_the_optimised_embeddings_lands_in_the_target():
    """Invert a component-0 sample with prompt {0}, optimise null-text at CFG 7.5, regenerate with prompt
    {3} (same style) and the optimised embeddings. Measured (EPS, 25 steps): in component 3 (responsibility
    1.0), the source's within-component detail kept (cosine 0.984 between x - mu), spread 0.317 (the
    component's 0.3); plain CFG-7.5 replay of the same noise: cosine 0.317, spread 0.92; NPI (negative =
    the source prompt) extrapolates target - source 7.5x: spread 4.3."""
    c = Case(False, 25, subset=[0])
    r = NT.optimize(c.pivot, c.cond_fn, c.uncond_fn, c.null0)
    assert rel(r.x0, c.x0) < 0.02                                    # measured 0.0131
    target = c.prompt_fn(c.o.encode([3], style=c.style))
    out = replay(c.pivot, target, c.uncond_fn, r.embeddings, CFG)[-1]
    plain = replay(c.pivot, target, c.uncond_fn, [c.null0] * 25, CFG)[-1]
    assert int(c.g.responsibilities(c.x0).argmax()) == 0
    assert int(c.g.responsibilities(out).argmax()) == 3 and float(c.g.responsibilities(out)[0, 3]) > 0.99
    mu0, mu3 = (c.g.means[k].reshape(c.x0.shape).float() for k in (0, 3))

    def detail(y):
        return float(torch.nn.functional.cosine_similarity((y - mu3).flatten(), (c.x0 - mu0).flatten(), dim=0))

    assert detail(out) > 0.9 and detail(plain) < 0.5, (detail(out), detail(plain))
    assert 0.2 < float((out - mu3).std()) < 0.4 < 0.8 < float((plain - mu3).std())


# ---------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("bad,match", [
    (dict(cfg=1.0), "nothing to optimise"), (dict(cfg=0.5), "nothing to optimise"),
    (dict(cfg=math.nan), "cfg > 1"), (dict(iterations=0), "iterations"), (dict(iterations=2.5), "iterations"),
    (dict(learning_rate=0.0), "learning_rate"), (dict(learning_rate=-1e-2), "learning_rate"),
    (dict(early_stop=-1.0), "early_stop"), (dict(early_stop=math.inf), "early_stop"),
    (dict(lr_decay=1.0), "lr_decay"), (dict(early_stop_ramp=-1e-3), "early_stop_ramp"),
])
def test_bad_options_name_the_fix(bad, match):
    with pytest.raises(NT.NullTextError, match=match):
        NT.NullTextOptions(**bad).check()
    assert issubclass(NT.NullTextError, InversionInputError)


def test_cfg_one_message_says_what_to_use_instead(vp20):
    c = vp20
    with pytest.raises(NT.NullTextError) as err:
        NT.optimize(c.pivot, c.cond_fn, c.uncond_fn, c.null0, NT.NullTextOptions(cfg=1.0))
    msg = str(err.value)
    assert "nothing to optimise" in msg and "cfg 1" in msg and "negative-prompt" in msg


def test_input_errors(vp20):
    c = vp20
    with pytest.raises(NT.NullTextError, match="not a Trajectory"):
        NT.optimize(c.pivot.states, c.cond_fn, c.uncond_fn, c.null0)
    with pytest.raises(NT.NullTextError, match="batch 3 but the latent batch is 1; pass one row"):
        NT.optimize(c.pivot, c.cond_fn, c.uncond_fn, torch.zeros(3, 8, 48))


# ---------------------------------------------------------------------------------------------- masks
def test_a_mask_restricts_the_loss_and_pins_the_outside_as_the_masked_sampler_does():
    """With a mask (1 = regenerate) the optimiser's states are the masked sampler's: outside the mask every
    state is the pivot's, inside it the guided step; the loss is the mean squared miss inside the mask
    (divided by mean(m^2)), so a sample whose mask is empty needs no update at all."""
    g = GMM.make(seed=ORACLE_SEED)
    x0 = g.sample_x0([0, 1], seed=1)
    two = Case(False, 20, x0=x0)
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, 2:6, 1:7] = 1.0                                   # sample 0: a box; sample 1: nothing to regenerate
    r = NT.optimize(two.pivot, two.cond_fn, two.uncond_fn, two.null0, mask=mask)
    N = 20
    piv = two.pivot.states.flip(0)                               # pivot states in sampling order
    out = (1 - mask).bool().expand_as(r.states[0])
    for k in range(N + 1):
        assert torch.equal(r.states[k][out], piv[k][out]), k     # the outside is the pivot, exactly
    assert int(r.iterations[:, 1].sum()) == 0 and float(r.losses[:, 1].abs().max()) == 0.0
    assert int(r.iterations[:, 0].sum()) > 0
    sig = two.pivot.sigmas.tolist()
    for k in (0, 10, 19):
        i = N - k
        d = (r.states[k + 1][0] - piv[k + 1][0]) * mask[0] / math.sqrt(1 + sig[i - 1] ** 2)
        want = float(d.pow(2).mean() / mask[0].pow(2).mean())
        assert float(r.losses[k, 0]) == pytest.approx(want, rel=1e-4, abs=1e-12), k
    # the Inverted-Latent Sampler with the same mask and these embeddings produces exactly these states
    states = replay(two.pivot, two.cond_fn, two.uncond_fn, r.embeddings, CFG, mask=mask)
    assert (states - r.states).abs().max() <= 1e-6
    # and the masked region is reconstructed as well as without a mask (plain replay: far off)
    whole = NT.optimize(two.pivot, two.cond_fn, two.uncond_fn, two.null0)
    inside = mask[0].bool().expand_as(x0[0])
    err_m = float((r.x0[0][inside] - x0[0][inside]).norm() / x0[0][inside].norm())
    err_w = float((whole.x0[0][inside] - x0[0][inside]).norm() / x0[0][inside].norm())
    plain = replay(two.pivot, two.cond_fn, two.uncond_fn, [two.null0] * N, CFG, mask=mask)[-1]
    err_p = float((plain[0][inside] - x0[0][inside]).norm() / x0[0][inside].norm())
    print(f"\n[nulltext mask] inside error: masked {err_m:.4f} whole {err_w:.4f} plain {err_p:.4f}")
    assert err_m < err_p / 5 and err_m < 1.5 * err_w, (err_m, err_w, err_p)
