"""The implicit step's solver (inversion/implicit.py) on the analytic oracle and on models built to defeat it:
robust on many oracle draws (not only the fidelity tables' seed 4), within its evaluation budget, and each
sample's result independent of the batch it is in."""
import statistics

import pytest
import torch

from inversion import implicit as IM
from inversion import methods as M
from ddiminv_dev.gmm import GMM, inversion_schedule as sched, rel_error as rel

COND = [0, 1, 2]
PROMPTS = [([0, 1, 2], [0, 1, 2]), ([0], [0]), ([3], [1, 3])]      # (prompt components, source components)
SEEDS = range(8)


def sweep(cfg, steps=10, **opts):
    """Every oracle draw: (seed, prompt, family) -> (round-trip error, steps above tolerance, evaluations/step)."""
    out = {}
    for seed in SEEDS:
        g = GMM.make(seed=seed)
        for cond, comps in PROMPTS:
            x0 = g.sample_x0(comps, seed=1)
            for flow in (False, True):
                fn = g.model_fn(flow, cond=cond, cfg=cfg)
                tr = M.invert(x0, sched(flow, steps), fn, M.Options("implicit", **opts),
                              family="flow" if flow else "vp")
                out[(seed, tuple(cond), flow)] = (rel(M.sample(tr, fn), x0), tr.options["steps_unsolved"],
                                                  tr.nfe / steps, tr.options["max_residual"])
    return out


@pytest.fixture(scope="module")
def guided_sweep():
    return sweep(7.5)


def test_the_solve_is_robust_over_oracle_draws_at_cfg_7_5(guided_sweep):
    """48 draws (8 oracle seeds x 3 prompts x EPS/flow), 10 steps, CFG 7.5, the defaults. Measured on this
    machine: every step of every draw solved (to tolerance, or within 10x of it at float32's floor); 47 end below
    1e-3 (the other, 5.6e-3, is limited by
    the guided sampler amplifying the 1e-6 per-step residual). Before the jumps and the per-sample freezing:
    21 draws kept a step at a 1e-2..1e-1 residual and 15 missed 1e-3 (max 5.2e-2), at 26 evaluations/step
    (now 5.9). The bounds leave room for another CPU's rounding."""
    unsolved = [k for k, (_, u, _, _) in guided_sweep.items() if u]
    missed = [k for k, (e, *_) in guided_sweep.items() if e > 1e-3]
    assert len(unsolved) <= 2, unsolved
    assert len(missed) <= 3, {k: guided_sweep[k][0] for k in missed}
    assert max(e for e, *_ in guided_sweep.values()) < 2e-2
    assert statistics.median(e for e, *_ in guided_sweep.values()) < 1e-5
    assert statistics.mean(n for _, _, n, _ in guided_sweep.values()) < 12


@pytest.mark.characterisation
def test_characterisation_without_restarts_steps_stay_unsolved_and_the_shipped_default_solves_them(guided_sweep):
    """CHARACTERISATION (a defect of a setting the shipped default does not use): the same draws with the first
    local solve only (restarts=0, a value the node allows) leave many steps on a fold; the shipped default
    (restarts=6, the Options and node default) solves them. Asserts the contrast, draw for draw."""
    assert M.Options().restarts == 6
    local = sweep(7.5, restarts=0)
    unsolved_local = {k for k, (_, u, _, _) in local.items() if u}
    unsolved_shipped = {k for k, (_, u, _, _) in guided_sweep.items() if u}
    assert len(unsolved_local) >= 15 and sum(1 for e, *_ in local.values() if e > 1e-3) >= 10     # the defect
    assert len(unsolved_shipped) <= 2 and len(unsolved_local - unsolved_shipped) >= 13            # the contrast
    worse = [k for k in local if local[k][0] > 10 * max(guided_sweep[k][0], 1e-6)]
    assert len(worse) >= 10, worse


@pytest.mark.parametrize("cfg", [1.0, 3.5])
def test_moderate_guidance_solves_every_draw(cfg):
    res = sweep(cfg)
    assert all(unsolved == 0 for _, unsolved, _, _ in res.values())
    assert max(r for *_, r in res.values()) < 2e-6                      # the tolerance, or float32's floor
    assert max(e for e, *_ in res.values()) < 1e-4
    assert statistics.mean(n for _, _, n, _ in res.values()) < (4.5 if cfg == 1.0 else 6)


def test_restarts_find_the_preimage_across_a_fold_on_seed_4():
    """Oracle seed 4, CFG 7.5, 10 steps (the fidelity tables' draw): the first local solve stalls on a near-fold
    of one step's map; a preimage exists across it and the attempts find it."""
    g = GMM.make(seed=4)
    x0 = g.sample_x0(COND, seed=1)
    fn = g.model_fn(False, cond=COND, cfg=7.5)
    asc = sched(False, 10)
    local = M.invert(x0, asc, fn, M.Options("implicit", restarts=0))
    full = M.invert(x0, asc, fn, M.Options("implicit"))
    assert local.options["max_residual"] > 1e-3 >= 1e-6 >= full.options["max_residual"]
    assert rel(M.sample(full, fn), x0) < 1e-5 < 1e-3 < rel(M.sample(local, fn), x0)


def test_never_diverges_on_a_fold():
    """Oracle seed 0, CFG 7.5: a step's map has a near-singular Jacobian, so undamped iteration cannot converge.
    The solver returns its best point, finite, far below plain ddim's error, within its budget."""
    g = GMM.make(seed=0)
    x0 = g.sample_x0(COND, seed=1)
    fn = g.model_fn(False, cond=COND, cfg=7.5)
    asc = sched(False, 10)
    opts = M.Options("implicit", max_iters=40)
    tr = M.invert(x0, asc, fn, opts)
    assert torch.isfinite(tr.states).all()
    e_ddim = rel(M.sample(M.invert(x0, asc, fn, M.Options("ddim", eval_sigma="destination")), fn), x0)
    assert rel(M.sample(tr, fn), x0) < e_ddim / 3
    assert max(tr.nfe_per_step) <= opts.max_iters * (1 + opts.restarts)


# ---------------------------------------------------------------------------------------------- models it cannot solve
def wild(x, sigma):
    """D(x) = x + 10 sign(x + 0.37): the implicit step has no solution (step(y) - x_s jumps over zero at
    y = -0.37 for every element with |x_s + 0.37| < 10 (1 - s/t))."""
    return x + 10.0 * torch.sign(x + 0.37)


def sources():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g) * 2.0


def test_a_model_that_cannot_converge_stays_within_the_budget():
    """cfg=0 on a random model took 330 s where cfg=1 took seconds: every step ran max_iters x (1 + restarts).
    Now a sample spends at most 2 x steps x max_iters evaluations, every step keeps a first attempt, and the
    trajectory says what was spent."""
    _, b = sources()
    asc = sched(False, 20)
    opts = M.Options("implicit", max_iters=10)
    tr = M.invert(b, asc, wild, opts)
    cap = IM.RUN_BUDGET_FACTOR * tr.steps * opts.max_iters
    assert tr.options["budget_per_sample"] == cap == 400
    assert tr.options["evaluations_per_sample"][0] <= cap and tr.nfe <= cap
    assert tr.options["steps_unsolved"] >= tr.steps - 1                 # it really cannot converge
    assert min(tr.nfe_per_step) >= 1 and max(tr.nfe_per_step) <= opts.max_iters * (1 + opts.restarts)
    old_worst = tr.steps * opts.max_iters * (1 + opts.restarts)
    assert tr.nfe <= old_worst * 2 / 7, (tr.nfe, old_worst)
    assert torch.isfinite(tr.states).all()


def test_batch_independence_when_samples_do_not_converge():
    """Converged samples are frozen and budgets are per sample, so each row of a batch is what it is alone (a
    sample used to get 2.68 alone and 1.44 next to another): on a model no sample can solve, and on the
    oracle without restarts, where some rows converge and others stall."""
    a, b = sources()
    asc = sched(False, 10)
    opts = M.Options("implicit", max_iters=8)
    both = M.invert(torch.cat([a, b]), asc, wild, opts)
    for row, x in enumerate((a, b)):
        alone = M.invert(x, asc, wild, opts)
        assert torch.equal(both.states[:, row:row + 1], alone.states), row
        assert both.options["evaluations_per_sample"][row] == alone.options["evaluations_per_sample"][0]
    g = GMM.make(seed=4)
    x0 = g.sample_x0(COND, seed=1)
    fn = g.model_fn(False, cond=COND, cfg=7.5)
    opts = M.Options("implicit", restarts=0)
    batch = M.invert(x0, sched(False, 10), fn, opts)
    per_row = [M.invert(x0[r:r + 1], sched(False, 10), fn, opts) for r in range(3)]
    assert batch.options["steps_unsolved"] >= 1
    assert {p.options["steps_unsolved"] > 0 for p in per_row} == {True, False}
    for r, p in enumerate(per_row):
        assert torch.allclose(batch.states[:, r:r + 1], p.states, rtol=1e-6, atol=1e-6), r


def test_budget_reserves_a_first_attempt_for_every_later_step():
    b = IM.Budget(batch=2, steps=5, max_iters=10)
    assert b.total == 100 and b.available(0).tolist() == [60, 60]
    b.used += torch.tensor([60, 3])
    assert b.available(1).tolist() == [0 + 10, 67]            # sample 0 spent everything step 0 could use
    b.used += torch.tensor([10, 0])
    assert b.available(2).tolist() == [10, 77]


def test_the_solver_takes_the_options_whole():
    """``solve_step(model_fn, x_s, s, t, opts)`` reads every solver setting from the one ``Options``: each
    field changed alone changes what the solve does, as that field says."""
    _, b = sources()
    s, t = 0.5, 0.8

    def run(**kw):
        return IM.solve_step(wild, b, s, t, M.Options("implicit", **kw).check())

    base = run(max_iters=6, restarts=2)
    assert int(base[4][0]) == base[2] == 18                        # (1 + restarts) x max_iters: nothing converges
    assert run(max_iters=4, restarts=2)[2] == 12                   # max_iters
    assert run(max_iters=6, restarts=0)[2] == 6                    # restarts
    assert IM.solve_step(wild, b, s, t, M.Options("implicit", max_iters=6, restarts=2),
                         budget=torch.tensor([7]))[2] == 7         # the budget caps the attempts together
    g = GMM.make(seed=4)
    x0 = g.sample_x0(COND, seed=1)[:1]
    fn = g.model_fn(False, cond=COND, cfg=1.0)

    def evals(**kw):
        r = IM.solve_step(fn, x0, 0.5, 0.8, M.Options("implicit", **kw))
        assert float(r[3][0]) <= M.Options("implicit", **kw).tolerance, kw
        return r[2]

    # measured: Anderson 3 evaluations, plain fixed point 12, half-damped 30, plain to 1e-2 only 4
    assert evals() == 3 and evals(anderson=0) == 12 and evals(anderson=0, damping=0.5) == 30
    assert evals(anderson=0, tolerance=1e-2) == 4
