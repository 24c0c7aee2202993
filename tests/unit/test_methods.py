"""Math core on the analytic Gaussian-mixture oracle (pure torch, no ComfyUI): the step, the method grid
(families x steps x cfg x methods), the paired sampler and its replays, options. The implicit solver's
robustness, budget and batch independence are in test_implicit.py."""

import pytest
import torch

from inversion import implicit
from inversion import methods as M
from inversion import schedule as S
from inversion.errors import InversionInputError
from ddiminv_dev.gmm import GMM, ddim_uniform, sd15_sigmas_table
from ddiminv_dev.gmm import inversion_schedule as sched
from ddiminv_dev.gmm import rel_error as rel

ORACLE_SEED = 4          # the fidelity oracle (ddiminv_dev/fixtures/gmm_nodes.py DEFAULT_SEED)
COND = [0, 1, 2]         # the "prompt": components 0..2; unconditional = all four


@pytest.fixture(scope="module")
def oracle():
    g = GMM.make(seed=ORACLE_SEED)
    return g, g.sample_x0([0, 1, 2], seed=1)


def roundtrip(g, x0, flow, steps, cfg, opts):
    fn = g.model_fn(flow, cond=COND, uncond=None, cfg=cfg)
    tr = M.invert(x0, sched(flow, steps), fn, opts, family="flow" if flow else "vp")
    return rel(M.sample(tr, fn), x0), tr


# ---------------------------------------------------------------------------------------------- the step
def test_ddim_step_is_the_family_formula():
    x, D = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    s, t = 0.7, 0.4
    eps_vp = (x - D) / s                             # x = x0 + s eps
    assert torch.allclose(M.ddim_step(x, D, s, t), D + t * eps_vp, atol=1e-6)
    eps_fl = (x - (1 - s) * D) / s                   # x = (1-s) x0 + s eps
    assert torch.allclose(M.ddim_step(x, D, s, t), (1 - t) * D + t * eps_fl, atol=1e-6)
    assert torch.equal(M.ddim_step(x, D, s, 0.0), D)


@pytest.mark.parametrize("mode,expected", [("current", 0.9479), ("destination", 0.9992), ("predicted", 0.9983)])
def test_alignment_cycle_factor_on_unit_gaussian(mode, expected):
    """N(0, I) data, SD schedule, 50 leading steps (t = 981..1, ending at alpha_0): the literature's factors."""
    tab = sd15_sigmas_table().double()
    asc = torch.tensor([float(tab[0])] + [float(tab[t]) for t in range(1, 1000, 20)])
    def fn(x, s):                                    # exact E[x0 | x] for x0 ~ N(0, 1)
        return x / (1 + s * s)
    x0 = torch.ones(1, 1, 1, 1)
    tr = M.invert(x0, asc, fn, M.Options("ddim", eval_sigma=mode))
    assert tr.steps == 50 and tr.nfe == 50
    assert float(M.sample(tr, fn)) == pytest.approx(expected, abs=5e-5)


def test_every_evaluation_sigma_is_recorded():
    g = GMM.make(seed=ORACLE_SEED)
    x0 = g.sample_x0([0], seed=1)
    asc = sched(False, 10)
    seen = []
    def fn(x, s):
        seen.append(s)
        return g.denoise(x, s)
    tr = M.invert(x0, asc, fn, M.Options("ddim", eval_sigma="destination"))
    assert seen == pytest.approx(asc[1:].tolist())            # destination: sigma_{i+1} for step i
    assert tr.eval_sigmas.tolist() == pytest.approx(seen)
    seen.clear()
    tr = M.invert(x0, asc, fn, M.Options("ddim", eval_sigma="current"))
    assert seen[0] == pytest.approx(M.FIRST_EVAL_SIGMA) and seen[1:] == pytest.approx(asc[1:-1].tolist())
    seen.clear()
    M.sample(tr, fn)                                           # the sampler: current sigma, descending
    assert seen == pytest.approx(asc[1:].flip(0).tolist())


# ---------------------------------------------------------------------------------------------- the method grid
# families x steps x cfg x methods on the oracle: this tier owns the grid (the host tier runs one case per family
# x method through ComfyUI's CFGGuider and checks it against this core). Bars: the figures.
BARS = {("ddim", "vp", 50): 0.047, ("ddim", "vp", 10): 0.141, ("ddim", "flow", 50): 0.025,
        ("ddim", "flow", 10): 0.115, ("implicit", 50): 1e-4, ("implicit", 10): 1e-3, ("exact",): 1e-7}


@pytest.mark.parametrize("method", ["ddim", "implicit", "exact"])
@pytest.mark.parametrize("cfg", [1.0, 7.5])
@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("flow", [False, True], ids=["vp", "flow"])
def test_method_grid(oracle, flow, steps, cfg, method):
    g, x0 = oracle
    e, tr = roundtrip(g, x0, flow, steps, cfg, M.Options(method))
    kind = "flow" if flow else "vp"
    assert torch.isfinite(tr.states).all() and tr.steps == steps
    if method == "ddim":
        assert e <= BARS[("ddim", kind, steps)], e
        assert tr.nfe == steps
    elif method == "implicit":
        assert e <= BARS[("implicit", steps)], e
        assert tr.options["max_residual"] <= 2 * tr.options["tolerance"] and tr.options["steps_unsolved"] == 0
        assert tr.nfe / steps <= (6 if cfg == 1.0 else 20 if steps == 10 else 6), tr.nfe / steps
        assert max(tr.options["evaluations_per_sample"]) <= tr.options["budget_per_sample"] == 2 * steps * 30
    else:
        assert e <= BARS[("exact",)], e
        assert tr.nfe == steps and max(tr.nfe_per_step) == 1


@pytest.mark.parametrize("flow", [False, True], ids=["vp", "flow"])
@pytest.mark.parametrize("cfg", [1.0, 7.5])
def test_predicted_beats_both_single_point_orders(oracle, flow, cfg):
    """The shipped default (predicted) beats the current- and destination-sigma orders, at one evaluation/step."""
    g, x0 = oracle
    e50, _ = roundtrip(g, x0, flow, 50, cfg, M.Options("ddim"))
    e10, _ = roundtrip(g, x0, flow, 10, cfg, M.Options("ddim"))
    for other in ("current", "destination"):
        o50, _ = roundtrip(g, x0, flow, 50, cfg, M.Options("ddim", eval_sigma=other))
        o10, _ = roundtrip(g, x0, flow, 10, cfg, M.Options("ddim", eval_sigma=other))
        assert e50 <= o50 / 5 and e10 <= o10 / 1.3, (other, e50, o50, e10, o10)


def test_implicit_solve_step_hits_tolerance():
    g = GMM.make(seed=ORACLE_SEED)
    x = g.sample_x0([0, 1], seed=3)
    fn = g.model_fn(False, cond=COND, cfg=1.0)
    y, D, n, res, _ = implicit.solve_step(fn, x, 0.5, 0.8, M.Options("implicit", tolerance=1e-7))
    back = M.ddim_step(y, fn(y, 0.8), 0.8, 0.5)
    assert float(res.max()) <= 1e-7 and rel(back, x) <= 1e-6 and n <= 10


# ---------------------------------------------------------------------------------------------- sampler
def test_start_step_is_monotonic_and_ends_at_source(oracle):
    g, x0 = oracle
    fn_src = g.model_fn(False, cond=COND, cfg=1.0)
    fn_edit = g.model_fn(False, cond=[3], cfg=1.0)
    tr = M.invert(x0, sched(False, 20), fn_src, M.Options("ddim"))
    d = [rel(M.sample(tr, fn_edit, start_step=k), x0) for k in (0, 5, 10, 15, 19)]
    assert all(a >= b for a, b in zip(d, d[1:], strict=False)), d
    assert d[0] > 0.5 and d[-1] < 0.2


@pytest.mark.parametrize("method", ["ddim", "implicit"])
def test_edit_lands_in_target_component(oracle, method):
    g, x0 = oracle
    src = x0[:1]                                              # a sample of component 0
    tr = M.invert(src, sched(False, 25), g.model_fn(False, cond=[0]), M.Options(method))
    out = M.sample(tr, g.model_fn(False, cond=[3], uncond=None, cfg=3.0))
    assert int(g.responsibilities(out).argmax()) == 3
    assert int(g.responsibilities(src).argmax()) == 0


def test_exact_edit_is_the_known_weak_spot(oracle):
    """BDIA (gamma=1) replays its leapfrog-like recurrence: under another prompt its parasitic mode is excited
    and the edit overshoots (measured std ~40-55 vs ~1); the ddim replay of the same trajectory edits cleanly."""
    g, x0 = oracle
    tr = M.invert(x0[:1], sched(False, 25), g.model_fn(False, cond=[0]), M.Options("exact"))
    edit = g.model_fn(False, cond=[3], cfg=3.0)
    out = M.sample(tr, edit)
    assert torch.isfinite(out).all() and float(out.std()) > 5.0
    clean = M.sample(tr, edit, replay="ddim")
    assert float(clean.std()) < 1.5 and int(g.responsibilities(clean).argmax()) == 3


def test_replay_is_an_argument_and_the_trajectory_stays_a_record(oracle):
    g, x0 = oracle
    fn = g.model_fn(False, cond=COND, cfg=3.0)
    tr = M.invert(x0, sched(False, 10), fn, M.Options("exact"))
    keep = (tr.method, tr.states.clone(), dict(tr.options))
    plain = M.invert(x0, sched(False, 10), fn, M.Options("ddim"))
    # the ddim replay of an exact trajectory is plain DDIM from its inverted noise: equal to sampling a ddim
    # trajectory that ends at the same state
    ddim_from_noise = M.sample(plain.with_(states=tr.states.to(torch.float32)), fn)
    assert torch.equal(M.sample(tr, fn, replay="ddim"), ddim_from_noise)
    assert rel(M.sample(tr, fn), x0) <= 1e-7 and M.default_replay(tr) == "bdia"
    assert (tr.method, tr.options) == keep[::2] and torch.equal(tr.states, keep[1])
    with pytest.raises(M.MethodError, match="needs an 'exact' trajectory"):
        M.sample(plain, fn, replay="bdia")
    with pytest.raises(M.MethodError, match="unknown"):
        M.sample(tr, fn, replay="edict")


def test_bdia_replay_with_no_step_left_is_refused(oracle):
    """BDIA from start_step N-1 has no step to run (it would return the stored source, ignoring the prompt)."""
    g, x0 = oracle
    fn = g.model_fn(False, cond=COND)
    tr = M.invert(x0, sched(False, 10), fn, M.Options("exact"))
    n = tr.steps
    assert M.bdia_steps(tr, n - 1) == 0 and M.bdia_steps(tr, n - 2) == 1
    with pytest.raises(M.MethodError, match="no step left"):
        M.sample(tr, fn, start_step=n - 1)
    with pytest.raises(M.MethodError, match="no step left"):
        M.source_drift(tr, fn, start_step=n - 1)
    one = M.sample(tr, fn, start_step=n - 1, replay="ddim")        # one DDIM step from states[1]
    s1 = float(tr.sigmas[1])
    assert torch.allclose(one, M.ddim_step(tr.states[1], fn(tr.states[1], s1), s1, 0.0))


def test_progress_is_reported_once_per_step(oracle):
    g, x0 = oracle
    fn = g.model_fn(False, cond=COND, cfg=7.5)
    seen = []

    def progress(i, n, x, D):
        seen.append((i, n))

    for method in M.METHODS:
        seen.clear()
        tr = M.invert(x0, sched(False, 10), fn, M.Options(method), progress=progress)
        assert seen == [(i, tr.steps) for i in range(tr.steps)], method
        seen.clear()
        M.sample(tr, fn, progress=progress)
        k = tr.steps - (1 if method == "exact" else 0)
        assert seen == [(i, k) for i in range(k)], method


@pytest.mark.parametrize("method", ["ddim", "implicit", "exact"])
def test_source_drift_pins_the_source_when_cfg_differs(oracle, method):
    """Invert at CFG 1, regenerate with the source prompt at CFG 7.5: plain replay drifts, the correction does not."""
    g, x0 = oracle
    tr = M.invert(x0, sched(False, 25), g.model_fn(False, cond=COND, cfg=1.0), M.Options(method))
    f75 = g.model_fn(False, cond=COND, uncond=None, cfg=7.5)
    plain = rel(M.sample(tr, f75), x0)
    gaps = M.source_drift(tr, f75)
    fixed = rel(M.sample(tr, f75, drift=gaps), x0)
    assert fixed <= 1e-4 < plain


def test_mask_pins_the_unmasked_region(oracle):
    g, x0 = oracle
    tr = M.invert(x0, sched(False, 10), g.model_fn(False, cond=COND), M.Options("ddim"))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1.0
    out = M.sample(tr, g.model_fn(False, cond=[3], cfg=3.0), mask=mask)
    assert torch.allclose(out[..., 4:], tr.states[0][..., 4:], atol=1e-6)
    assert rel(out[..., :4], tr.states[0][..., :4]) > 0.1


def test_batch_samples_are_independent_and_deterministic(oracle):
    g, x0 = oracle
    fn = g.model_fn(False, cond=COND, cfg=7.5)
    for method in M.METHODS:
        full = M.invert(x0, sched(False, 10), fn, M.Options(method))
        again = M.invert(x0, sched(False, 10), fn, M.Options(method))
        assert torch.equal(full.states, again.states)
        for row in range(3):
            one = M.invert(x0[row:row + 1], sched(False, 10), fn, M.Options(method))
            assert torch.allclose(full.states[:, row:row + 1], one.states, rtol=1e-6, atol=1e-6), (method, row)


def test_inputs_are_not_mutated(oracle):
    g, x0 = oracle
    keep = x0.clone()
    asc = sched(True, 10)
    asc_keep = asc.clone()
    tr = M.invert(x0, asc, g.model_fn(True), M.Options("exact"))
    M.sample(tr, g.model_fn(True))
    assert torch.equal(x0, keep) and torch.equal(asc, asc_keep)


def test_flow_inversion_ends_at_sigma_one_finite(oracle):
    g, x0 = oracle
    tr = M.invert(x0, sched(True, 10), g.model_fn(True), M.Options("ddim"))
    assert float(tr.sigmas[-1]) == 1.0 and torch.isfinite(tr.noise).all()
    assert 0.6 < float(tr.noise.std()) < 1.6        # pure-noise level: unit variance, not 1/(1-sigma)


def test_no_autograd_graph_is_built(oracle):
    g, x0 = oracle
    x = x0.clone().requires_grad_(True)
    def fn(y, s):
        return g.denoise(y, s) * 1.0
    tr = M.invert(x, sched(False, 5), fn, M.Options("ddim"))
    assert not tr.states.requires_grad and not M.sample(tr, fn).requires_grad


# ---------------------------------------------------------------------------------------------- schedules/options
def test_schedule_validation_messages():
    with pytest.raises(S.ScheduleError, match="ascending"):
        S.check_sampling_sigmas(torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(S.ScheduleError, match="strictly decreasing"):
        S.check_sampling_sigmas(torch.tensor([2.0, 1.0, 1.0, 0.0]))
    with pytest.raises(S.ScheduleError, match="NaN"):
        S.check_sampling_sigmas(torch.tensor([2.0, float("nan"), 0.0]))
    with pytest.raises(S.ScheduleError, match="at least 2"):
        S.check_sampling_sigmas(torch.tensor([2.0]))
    with pytest.raises(S.ScheduleError, match="start_step"):
        S.segment(torch.tensor([3.0, 2.0, 1.0, 0.0]), 3, 10000)
    seg = S.segment(torch.tensor([3.0, 2.0, 1.0, 0.0]), 1, 10000)
    assert seg.tolist() == [2.0, 1.0, 0.0] and S.inversion_order(seg).tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("bad,words", [
    (dict(method="euler"), ("method 'euler' is unknown", "use one of ddim, implicit, exact")),
    (dict(tolerance=0.0), ("tolerance must be a number > 0", "use e.g. 1e-6")),
    (dict(tolerance=float("nan")), ("tolerance", "> 0")),
    (dict(max_iters=0), ("max_iters must be >= 1", "use e.g. 30")),
    (dict(damping=0.0), ("damping must be in (0, 1]",)),
    (dict(restarts=-1), ("restarts must be >= 0",)),
    (dict(gamma=0.0), ("gamma must be in (0, 1]", "use 1.0")),
    (dict(eval_sigma="middle"), ("eval_sigma 'middle' is unknown",))])
def test_option_errors_name_the_fix(bad, words):
    with pytest.raises(M.MethodError) as e:
        M.Options(**bad).check()
    assert isinstance(e.value, InversionInputError) and "; " in str(e.value)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_partial_inversion_matches_segment(oracle):
    g, x0 = oracle
    full = ddim_uniform(sd15_sigmas_table(), 20)
    seg = S.segment(full, 8, 10000)
    tr = M.invert(x0, S.inversion_order(seg), g.model_fn(False), M.Options("implicit"))
    assert tr.steps == 12 and float(tr.sigmas[-1]) == pytest.approx(float(full[8]))
    assert rel(M.sample(tr, g.model_fn(False)), x0) < 1e-5
