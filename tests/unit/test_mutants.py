"""Unit tests written to kill the mutants of ``inversion/`` that survived the unit tier (docs/mutation.md has the
run, the command and what is left). Each test names the behaviour it pins; the mutants it kills are listed in
docs/mutation.md, not here, because mutant numbers change with the code."""
from __future__ import annotations

import pytest
import torch

from inversion import methods as M
from inversion import schedule as S
from ddiminv_dev.gmm import GMM
from ddiminv_dev.gmm import inversion_schedule as sched
from ddiminv_dev.gmm import rel_error as rel

DESC = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])        # a 4-step sampling schedule


def refused(sigmas, *words, **kw) -> str:
    with pytest.raises(S.ScheduleError) as e:
        S.check_sampling_sigmas(sigmas, **kw)
    msg = str(e.value)
    for w in words:
        assert w in msg, (w, msg)
    return msg


# ---------------------------------------------------------------------------------------------- schedule.py
def test_the_schedule_checks_name_the_input_and_the_fix_for_a_connected_schedule():
    """A connected SIGMAS input: the message names the input ("sigmas" by default) and says to connect a
    scheduler's output unmodified."""
    connect = "connect a scheduler node's output (e.g. BasicScheduler) unmodified"
    refused([1.0, 0.0], "sigmas is not a SIGMAS tensor (got list); connect a scheduler node such as BasicScheduler")
    refused(torch.tensor([1.0, 0.0]).to(torch.complex64), "sigmas is a complex tensor; " + connect)
    refused(torch.tensor([1.0]), "sigmas has 1 value(s)", "use steps >= 1")
    refused(torch.tensor([2.0, float("nan"), 0.0]), "sigmas contains NaN or Inf (1 of 3 values); " + connect)
    refused(torch.tensor([2.0, -1.0]), "negative values (min -1); sigmas must be >= 0: " + connect)
    refused(torch.tensor([0.0, 1.0, 2.0]), "sigmas is ascending", "do not insert FlipSigmas: DDIM Invert reverses it")
    refused(torch.tensor([2.0, 1.0, 1.0, 0.0]), "sigmas must be strictly decreasing", "remove duplicated sigmas")
    refused(torch.tensor([2.0, 0.5, 0.0]), "reaches sigma 2", "(BasicScheduler with this model)", family="flow")
    refused(torch.tensor([1.00002, 0.5, 0.0]), "reaches sigma 1.00002 but", family="flow")   # not "1 but"
    refused(torch.tensor([2.0]), "my_sigmas has 1 value(s)", name="my_sigmas")


def test_a_computed_schedule_names_its_source_and_another_scheduler_as_the_fix():
    src = "the karras scheduler at 1 step"
    refused(torch.tensor([1.0]), src + " has 1 value(s)", "; use more steps", source=src)
    refused(torch.tensor([2.0, float("inf"), 0.0]), src + " contains NaN or Inf",
            "choose another scheduler or more steps", source=src)
    msg = refused(torch.tensor([2.0, 1.0, 1.0, 0.0]), src + " must be strictly decreasing",
                  "choose another scheduler or step count", source=src)
    assert "remove duplicated" not in msg


def test_only_a_strictly_ascending_schedule_is_called_ascending():
    """Not ascending: first value below the others but out of order, or ascending with a repeat."""
    for bad in ([0.0, 2.0, 1.0], [0.0, 1.0, 1.0, 2.0]):
        msg = refused(torch.tensor(bad), "must be strictly decreasing")
        assert "ascending" not in msg, (bad, msg)


def test_the_checked_schedule_is_a_float32_copy():
    s64 = torch.tensor([3.0, 2.0, 0.0], dtype=torch.float64)
    out = S.check_sampling_sigmas(s64)
    assert out.dtype == torch.float32 and out.shape == (3,) and out.tolist() == [3.0, 2.0, 0.0]
    out[0] = 9.0
    assert float(s64[0]) == 3.0
    assert S.check_sampling_sigmas(torch.tensor([1.0, 0.5, 0.0]), family="flow").tolist() == [1.0, 0.5, 0.0]


def test_segment_ranges_and_their_errors():
    assert S.segment(DESC).tolist() == DESC.tolist()                          # defaults: the whole schedule
    assert S.segment(DESC, 0, 2).tolist() == [4.0, 3.0, 2.0]                   # sampling steps 0..1
    assert S.segment(DESC, 1, 3).tolist() == [3.0, 2.0, 1.0]
    assert S.segment(DESC, 3, 10000).tolist() == [1.0, 0.0]
    with pytest.raises(S.ScheduleError, match=r"start_step must be >= 0 \(got -1\); set it to 0 or more"):
        S.segment(DESC, -1, 4)
    with pytest.raises(S.ScheduleError, match=r"end_step must be >= 0 \(got -1\); set it to 1 or more"):
        S.segment(DESC, 0, -1)
    with pytest.raises(S.ScheduleError, match=r"start_step \(0\) must be smaller than end_step \(0, capped at steps=4"):
        S.segment(DESC, 0, 0)
    with pytest.raises(S.ScheduleError, match=r"start_step \(4\) must be smaller than end_step \(4, capped"):
        S.segment(DESC, 4, 10000)
    seg = S.segment(DESC, 0, 4)
    seg[0] = 9.0
    assert float(DESC[0]) == 4.0                                               # a copy
    inv = S.inversion_order(DESC)
    assert inv.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


# ---------------------------------------------------------------------------------------------- methods.py
@pytest.fixture(scope="module")
def oracle():
    g = GMM.make(seed=4)
    return g, g.sample_x0([0, 1, 2], seed=1)


def test_a_partial_regeneration_starts_from_the_stored_state(oracle):
    g, x0 = oracle
    fn = g.model_fn(False, cond=[0, 1, 2])
    tr = M.invert(x0, sched(False, 10), fn, M.Options("ddim"))
    out = M.sample(tr, fn, start_step=7)        # three steps from states[3]
    x = tr.states[3]
    sig = tr.sigmas.tolist()
    for i in (3, 2, 1):
        x = M.ddim_step(x, fn(x, sig[i]), sig[i], sig[i - 1])
    assert torch.allclose(out, x, atol=1e-6)
    assert rel(out, x0) < rel(M.sample(tr, fn, start_step=0), x0) + 1e-3


def test_exact_records_its_first_step_and_options(oracle):
    """The exact method's first step is a ddim step at the destination sigma (auto) or the one asked for, and
    its options record it; the BDIA pair and gamma are kept."""
    g, x0 = oracle
    fn = g.model_fn(False, cond=[0, 1, 2])
    asc = sched(False, 6)
    tr = M.invert(x0, asc, fn, M.Options("exact"))
    assert tr.options == {"gamma": 1.0, "first_step": "ddim/destination"}
    assert M.bdia_steps(tr) == tr.steps - 1 and M.bdia_steps(tr, 2) == tr.steps - 3
    s1 = float(asc[1])
    want, *_ = M._explicit_step(fn, x0.double(), 0.0, s1, "destination", M.default_input_scale("vp"))
    assert torch.allclose(tr.states[1].double(), want, atol=1e-6) and float(tr.eval_sigmas[0]) == pytest.approx(s1)
    cur = M.invert(x0, asc, fn, M.Options("exact", eval_sigma="current"))
    assert cur.options["first_step"] == "ddim/current"
    assert float(cur.eval_sigmas[0]) == pytest.approx(min(M.FIRST_EVAL_SIGMA, s1 / 2))
    assert float(cur.eval_sigmas[1]) == pytest.approx(s1)                     # BDIA: D(x_i, s_i)
    assert "pair" in tr.replay and tr.replay["pair"].dtype == torch.float64


def test_exact_with_gamma_below_one_still_round_trips(oracle):
    g, x0 = oracle
    fn = g.model_fn(False, cond=[0, 1, 2])
    tr = M.invert(x0, sched(False, 5), fn, M.Options("exact", gamma=0.5))
    assert tr.options["gamma"] == 0.5
    assert rel(M.sample(tr, fn), x0) < 1e-6


def test_the_first_current_sigma_evaluation_is_half_a_tiny_first_step():
    """A clean source (sigma 0) is evaluated at min(FIRST_EVAL_SIGMA, t/2) (t/2 when the first step is tiny)."""
    seen = []
    def fn(x, s):
        seen.append(s)
        return x / (1 + s * s)
    x0 = torch.ones(1, 1, 1, 1)
    M.invert(x0, torch.tensor([0.0, 1e-4, 0.5]), fn, M.Options("ddim", eval_sigma="current"))
    assert seen[0] == pytest.approx(5e-5) and seen[1] == pytest.approx(1e-4)
    tr = M.invert(x0, torch.tensor([0.0, 1.0]), fn, M.Options("ddim"))
    assert tr.options == {"eval_sigma": "predicted"}


def test_implicit_records_its_evaluations_and_uses_its_options(oracle):
    g, x0 = oracle
    fn = g.model_fn(False, cond=[0, 1, 2], cfg=3.0)
    asc = sched(False, 6)
    tr = M.invert(x0, asc, fn, M.Options("implicit"))
    assert tr.eval_sigmas.tolist() == pytest.approx(asc[1:].tolist())          # D(x_t, t) at the destination
    assert sum(tr.nfe_per_step) == tr.nfe and max(tr.nfe_per_step) > 1
    o = tr.options
    assert (o["tolerance"], o["max_iters"], o["damping"], o["anderson"], o["restarts"]) == (1e-6, 30, 1.0, 5, 6)
    assert o["steps_above_tolerance"] == 0 and o["steps_unsolved"] == 0 and o["budget_per_sample"] == 2 * tr.steps * 30
    unreachable = M.invert(x0, asc, fn, M.Options("implicit", tolerance=1e-14, max_iters=3, restarts=0))
    assert unreachable.options["steps_above_tolerance"] == tr.steps and unreachable.options["max_residual"] > 1e-14
    nfe = {k: M.invert(x0, asc, fn, M.Options("implicit", **kw)).nfe for k, kw in {
        "loose": dict(tolerance=1e-2), "tight": dict(tolerance=1e-7), "plain": dict(anderson=0),
        "damped": dict(damping=0.3), "default": {}}.items()}
    assert nfe["loose"] < nfe["default"] < nfe["tight"], nfe
    assert nfe["plain"] != nfe["default"] and nfe["damped"] != nfe["default"], nfe


@pytest.mark.parametrize("method,bar", [("ddim", 7.7e-10), ("implicit", 1e-12), ("exact", 2.8e-6)])
def test_source_drift_pins_every_level_to_float_rounding(oracle, method, bar):
    """With the source prompt at another cfg, source_drift reproduces the stored source to rounding (measured:
    ddim 5.1e-10, implicit 0, exact 1.8e-6: the BDIA replay starts from the float64 pair, the gaps come from the
    float32 states; bars 1.5x measured, 1e-12 for a measured 0)."""
    g, x0 = oracle
    tr = M.invert(x0, sched(False, 10), g.model_fn(False, cond=[0, 1, 2]), M.Options(method))
    f75 = g.model_fn(False, cond=[0, 1, 2], cfg=7.5)
    seen = []
    gaps = M.source_drift(tr, f75, progress=lambda n, total, x, D: seen.append((n, total, x.shape, D.shape)))
    levels = tr.steps - (1 if method == "exact" else 0)
    assert sorted(gaps) == list(range(levels)) and seen == [(n, levels, x0.shape, x0.shape) for n in range(levels)]
    assert all(v.dtype == (torch.float64 if method == "exact" else torch.float32) for v in gaps.values())
    out = M.sample(tr, f75, drift=gaps)
    e = float((out.double() - tr.states[0].double()).norm() / tr.states[0].double().norm())
    assert e <= bar, e


@pytest.mark.parametrize("replay,gamma", [("ddim", 1.0), ("bdia", 0.5)])
def test_source_drift_follows_the_replay_and_gamma_it_is_given(oracle, replay, gamma):
    """An exact trajectory regenerated with an explicit replay (the node's exact_replay=ddim) or with gamma < 1:
    the gaps are computed with that replay and gamma, so the source is pinned (measured 5e-10 / 2e-6)."""
    g, x0 = oracle
    tr = M.invert(x0, sched(False, 8), g.model_fn(False, cond=[0, 1, 2]), M.Options("exact", gamma=gamma))
    f75 = g.model_fn(False, cond=[0, 1, 2], cfg=7.5)
    gaps = M.source_drift(tr, f75, replay=replay)
    assert len(gaps) == tr.steps - (1 if replay == "bdia" else 0)
    out = M.sample(tr, f75, replay=replay, drift=gaps)
    assert rel(out, tr.states[0]) <= 3e-6, rel(out, tr.states[0])


def test_a_start_step_past_the_last_step_is_refused(oracle):
    """start_step N would run no step and return the stored source whatever the prompt."""
    g, x0 = oracle
    fn = g.model_fn(False, cond=[0, 1, 2])
    tr = M.invert(x0, sched(False, 5), fn, M.Options("ddim"))
    n = tr.steps
    for k in (n, n + 1, -1):
        with pytest.raises(M.MethodError, match=rf"start_step must be in \[0, {n - 1}\] for this {n}-step "
                                                rf"trajectory \(got {k}\); choose a step inside"):
            M.sample(tr, fn, start_step=k)
    assert M.check_replay(tr, None, n - 1) == (1, "ddim")
