"""The two-expert schedule (inversion/experts.py) as matrices: switch step <-> boundary, the order of the experts
in inversion and sampling, and the sigma dispatch, against Wan 2.2's own numbers."""
import pytest
import torch

from inversion import experts as X
from inversion.errors import InversionInputError


def flow_sigmas(n: int, shift: float = 8.0) -> list:
    """ComfyUI's 'simple' flow schedule with a shift (ModelSamplingSD3-style): sigma(t) = s t / (1 + (s-1) t)."""
    ts = [1.0 - j / n for j in range(n + 1)]
    return [shift * t / (1 + (shift - 1) * t) for t in ts]


@pytest.mark.parametrize("n,shift,boundary,expected", [
    (20, 8.0, 0.875, 11),   # by hand: sigma_10 = 4/4.5 = 0.8889 >= 0.875 > sigma_11 = 3.6/4.15 = 0.8675
    (20, 1.0, 0.875, 3),    # no shift: sigma_j = 1 - j/20; 1, 0.95, 0.9 >= 0.875 > 0.85
    (20, 1.0, 0.900, 3),    # the boundary on a level counts as high noise (Wan: t >= boundary)
    (4, 1.0, 2.0, 0),       # above every level: the low-noise expert only
    (4, 1.0, 1e-6, 4),      # below every starting level: the high-noise expert only
])
def test_switch_step_matches_the_boundary(n, shift, boundary, expected):
    assert X.switch_step(flow_sigmas(n, shift), boundary) == expected


@pytest.mark.parametrize("n", [1, 2, 7, 20])
def test_boundary_for_step_inverts_switch_step_at_every_step(n):
    s = flow_sigmas(n, 5.0)
    for k in range(n + 1):
        b = X.boundary_for_step(s, k)
        assert X.switch_step(s, b) == k, (n, k, b)
        # the same switch when the levels are stored in another precision (float32 states, float64 eval sigmas)
        assert X.switch_step([float(torch.tensor(v, dtype=torch.float32)) for v in s], b) == k


def test_inversion_uses_the_expert_of_the_sampling_step_it_reverses():
    assert X.sampling_experts(5, 2) == ["high", "high", "low", "low", "low"]
    assert X.inversion_experts(5, 2) == ["low", "low", "low", "high", "high"]
    for n in range(1, 6):
        for k in range(n + 1):
            samp, inv = X.sampling_experts(n, k), X.inversion_experts(n, k)
            assert all(inv[i] == samp[n - 1 - i] for i in range(n))


def test_by_sigma_dispatches_on_the_evaluated_level():
    calls = []

    def level(s):
        return float(s.flatten()[0]) if isinstance(s, torch.Tensor) else float(s)
    low = lambda x, s: calls.append(("low", level(s))) or x          # noqa: E731
    high = lambda x, s: calls.append(("high", level(s))) or -x       # noqa: E731
    fn = X.by_sigma(low, high, 0.875)
    x = torch.ones(2)
    assert torch.equal(fn(x, torch.tensor([0.9, 0.9], dtype=torch.float64)), -x)
    assert torch.equal(fn(x, torch.tensor(0.875)), -x)              # on the boundary: high noise
    assert torch.equal(fn(x, 0.5), x)
    assert calls == [("high", 0.9), ("high", 0.875), ("low", 0.5)]


@pytest.mark.parametrize("sigmas,arg,fn", [
    ([1.0], 0.5, "switch_step"), ([1.0, 1.0, 0.0], 0.5, "switch_step"), ([1.0, 0.5, 0.0], float("nan"), "switch_step"),
    ([1.0, 0.5, 0.0], 3, "boundary_for_step"), ([1.0, 0.5, 0.0], -1, "boundary_for_step"),
    ([1.0, 0.5, 0.0], True, "boundary_for_step"),
])
def test_bad_schedules_and_switches_are_refused(sigmas, arg, fn):
    with pytest.raises(InversionInputError):
        getattr(X, fn)(sigmas, arg)


def test_wan22_defaults():
    assert X.WAN22_BOUNDARY == {"t2v": 0.875, "i2v": 0.900} and X.DEFAULT_BOUNDARY == 0.875


# ---------------------------------------------------------------------------------------------- run_segments
from inversion import methods as M                          # noqa: E402
from ddiminv_dev.gmm import GMM, inversion_schedule, rel_error   # noqa: E402


def _experts():
    """Two different flow "experts" on the GMM oracle (another mixture each) and a clean sample."""
    lo, hi = GMM.make(seed=4), GMM.make(seed=5)
    return lo.model_fn(True, cond=[0, 1, 2]), hi.model_fn(True, cond=[1, 2, 3]), lo.sample_x0([0, 1], seed=1)


def _runner(fns, log):
    """run_with: the expert's model_fn, counting its evaluations per segment (what the adapter's CFGGuider does)."""
    def run_with(expert, seg_loop):
        log.append([expert, 0])

        def fn(x, sigma):
            log[-1][1] += 1
            return fns[expert](x, sigma)
        return seg_loop(fn, torch.device("cpu"), None)
    return run_with


@pytest.mark.parametrize("method", ["exact", "ddim", "implicit"])
def test_segments_equal_one_pass_with_the_sigma_dispatch(method):
    """Inverting in two segments (low-noise expert, then the high-noise one, the first segment replayed from its
    recorded evaluations) gives bit for bit what one pass with by_sigma gives, each expert evaluated once per
    evaluation of its levels; and sampling back in two segments (high first) reconstructs an exact inversion."""
    low, high, x0 = _experts()
    asc = inversion_schedule(True, 8)
    b = 0.875
    k = X.switch_step(asc.flip(0).tolist(), b)
    assert 0 < k < 8
    opts = M.Options(method=method)
    calls = {X.LOW: 0, X.HIGH: 0}

    def counted(e, f):
        return lambda x, s: calls.__setitem__(e, calls[e] + 1) or f(x, s)
    ref = M.invert(x0, asc, X.by_sigma(counted(X.LOW, low), counted(X.HIGH, high), b), opts, family="flow")
    assert calls[X.HIGH] >= k - 1 and calls[X.LOW] >= 8 - k
    log = []
    fns = {X.LOW: low, X.HIGH: high}
    traj, order = X.run_segments(lambda fn, dev, pr: M.invert(x0, asc, fn, opts, family="flow", progress=pr),
                                 _runner(fns, log), b, first=X.LOW)
    assert order == [X.LOW, X.HIGH] and [e for e, _ in log] == order
    assert torch.equal(traj.states, ref.states) and torch.equal(traj.denoised, ref.denoised)
    # each expert evaluated exactly where one pass evaluates it: the replay answers from the record
    assert log[0][1] == calls[X.LOW] and log[1][1] == calls[X.HIGH]
    if method == "exact":
        log = []
        x, order = X.run_segments(lambda fn, dev, pr: M.sample(traj, fn, progress=pr), _runner(fns, log), b,
                                  first=X.HIGH)
        assert order == [X.HIGH, X.LOW]
        assert torch.equal(x, M.sample(traj, X.by_sigma(low, high, b)))
        assert rel_error(x, x0) <= 1e-6
        # one expert for everything does not reconstruct: the pair matters
        assert rel_error(M.sample(traj, low), x0) > 1e-3


def test_progress_is_reported_once_per_step():
    low, high, x0 = _experts()
    asc = inversion_schedule(True, 6)
    calls = []

    def run_with(expert, seg_loop):
        return seg_loop({X.LOW: low, X.HIGH: high}[expert], "cpu", lambda i, n, x, D: calls.append(i))
    X.run_segments(lambda fn, dev, pr: M.invert(x0, asc, fn, M.Options("exact"), family="flow", progress=pr),
                   run_with, 0.875, first=X.LOW)
    assert calls == list(range(6))


def test_a_wrong_first_guess_and_one_expert_only():
    low, high, x0 = _experts()
    asc = inversion_schedule(True, 6)
    log = []
    run = _runner({X.LOW: low, X.HIGH: high}, log)
    X.run_segments(lambda fn, dev, pr: M.invert(x0, asc, fn, M.Options("exact"), family="flow"), run, 0.875,
                   first=X.HIGH)
    assert log == [[X.HIGH, 0], [X.LOW, log[1][1]], [X.HIGH, log[2][1]]] and log[1][1] > 0 and log[2][1] > 0
    log.clear()
    _, order = X.run_segments(lambda fn, dev, pr: M.invert(x0, asc, fn, M.Options("exact"), family="flow"), run,
                              2.0, first=X.LOW)
    assert order == [X.LOW] and len(log) == 1


def test_a_loop_that_goes_back_to_the_first_expert_is_refused():
    low, high, x0 = _experts()
    sigmas = [0.5, 0.95, 0.5]                           # low, high, low again

    def loop(fn, dev, pr):
        return [fn(x0, s) for s in sigmas]
    with pytest.raises(InversionInputError, match="not monotonic"):
        X.run_segments(loop, _runner({X.LOW: low, X.HIGH: high}, []), 0.875, first=X.LOW)


def test_a_replay_that_does_not_retrace_is_refused():
    """A loop whose evaluation inputs differ on the second run (not deterministic) cannot be answered from the
    first segment's record."""
    low, high, x0 = _experts()
    runs = [0]

    def loop(fn, dev, pr):
        runs[0] += 1
        fn(x0 * (1.0 + 1e-3 * runs[0]), 0.5)
        return fn(x0, 0.95)
    with pytest.raises(InversionInputError, match="did not retrace"):
        X.run_segments(loop, _runner({X.LOW: low, X.HIGH: high}, []), 0.875, first=X.LOW)


# ---------------------------------------------------------------------------------------------- the record and the pair
def test_record_check_and_pair():
    s = flow_sigmas(20, 8.0)
    rec = X.record(s, 0.875, "L", "H")
    assert rec == {"boundary": 0.875, "switch_step": 11, "low": "L", "high": "H"}
    assert X.check_record(rec) is rec and X.check_record(None) is None
    for bad in ({"boundary": 0.875}, {**rec, "boundary": float("nan")}, {**rec, "boundary": True}, [rec]):
        with pytest.raises(InversionInputError, match="invert again"):
            X.check_record(bad)
    assert X.check_pair(None, "L", None) == [] and X.check_pair(rec, "L", "H") == []
    assert len(X.check_pair(rec, "L2", "H")) == 1                 # another model: a warning, not a refusal
    assert X.check_pair(rec, "X", "X") != []                       # one model twice: warned, not "swapped"
    assert "end_at_step / start_at_step 13" in X.describe(rec, 20, offset=2)
    assert X.pair_fingerprint("a", None, 0.875) is None and X.pair_fingerprint(None, "b", 0.875) is None
    fp = X.pair_fingerprint("a", "b", 0.875)
    assert fp != X.pair_fingerprint("b", "a", 0.875) and fp != X.pair_fingerprint("a", "b", 0.9)
    assert fp == X.pair_fingerprint("a", "b", 0.875)


# ---------------------------------------------------------------------------------------------- the sampler's switch
REC20 = {"boundary": 0.875, "switch_step": 11, "low": "L", "high": "H"}   # flow_sigmas(20, 8) at 0.875 (above)


@pytest.mark.parametrize("rec,boundary,expected", [
    (REC20, 0.0, (0.875, 11, 11, 0)),      # 0: the trajectory's own switch
    ({**REC20, "boundary": 0.9, "switch_step": 10}, 0.0, (0.9, 10, 10, 0)),   # ... not Wan 2.2's default
    (REC20, 0.88, (0.88, 11, 11, 1)),      # sigma_10 = .8889 >= .88 > sigma_11 = .8675: the same step, noted
    (REC20, 0.9, (0.9, 10, 11, 0)),        # sigma_9 = 4.4/4.85 = .907 >= .9 > sigma_10: one step earlier
    (REC20, 0.5, (0.5, 18, 11, 0)),        # sigma_17 = 1.2/2.05 = .585 >= .5 > sigma_18 = .8/1.7 = .47
    (REC20, 5.0, (5.0, 0, 11, 0)),         # above every level: the low-noise expert only
    (None, 0.0, None),                     # one model, nothing asked
    (None, 0.9, (0.0, 0, 0, 1)),           # one model, a boundary given: noted as ignored
])
def test_regeneration_switch_matrix(rec, boundary, expected):
    r = X.regeneration_switch(flow_sigmas(20, 8.0), rec, boundary)
    if expected is None:
        assert r is None
        return
    assert (r.boundary, r.step, r.recorded, len(r.notes)) == expected, r
    if rec is None:
        assert "ignored" in r.notes[0] and "set it to 0" in r.notes[0]


@pytest.mark.parametrize("boundary", [-0.1, float("nan"), float("inf"), True, "0.9", None])
def test_regeneration_switch_refuses_a_bad_boundary(boundary):
    with pytest.raises(InversionInputError, match="boundary must be a finite sigma >= 0.*; use 0"):
        X.regeneration_switch(flow_sigmas(20, 8.0), REC20, boundary)


@pytest.mark.parametrize("boundary", [0.0, 0.9, 0.5, 5.0, 1e-3])
def test_changed_steps_are_where_the_experts_differ(boundary):
    """changed_steps against the per-step expert lists of the two switches (every step evaluated)."""
    r = X.regeneration_switch(flow_sigmas(20, 8.0), REC20, boundary)
    now, was = X.sampling_experts(20, r.step), X.sampling_experts(20, r.recorded)
    assert X.changed_steps(r, range(20)) == tuple(j for j in range(20) if now[j] != was[j])
    assert X.changed_steps(r, range(15, 20)) == tuple(j for j in range(15, 20) if now[j] != was[j])


# (boundary, replay, first evaluated step, source_drift) -> refused (words) or the note's words
@pytest.mark.parametrize("boundary,replay,first,drift,words", [
    (0.0, "bdia", 1, False, None),                                       # the trajectory's switch: nothing to say
    (0.0, "ddim", 0, False, None),
    (0.88, "bdia", 1, False, "the inversion's experts at every step"),   # another sigma, the same step
    (0.9, "bdia", 1, False, "REFUSED"),                                  # step 10 by the other expert: not exact
    (0.5, "bdia", 1, False, "REFUSED"),
    (0.9, "bdia", 1, True, "source_drift re-runs the stored states"),   # drift pins the source
    (0.9, "ddim", 0, False, "sampling step 10 run the low-noise expert where the inversion ran the high-noise"),
    (0.5, "ddim", 0, False, "sampling steps 11-17 run the high-noise expert where the inversion ran the low-noise"),
    (0.9, "bdia", 11, False, "no step this replay evaluates changes expert"),   # bdia from start_step 10
    (0.5, "ddim", 18, False, "no step this replay evaluates changes expert"),   # ddim from start_step 18
    (0.5, "ddim", 17, False, "sampling step 17 run the high-noise"),
])
def test_check_regeneration_matrix(boundary, replay, first, drift, words):
    r = X.regeneration_switch(flow_sigmas(20, 8.0), REC20, boundary)
    if words == "REFUSED":
        with pytest.raises(InversionInputError, match=r"so the exact \(BDIA\) replay cannot reconstruct this "
                                                      r"trajectory; set boundary 0"):
            X.check_regeneration(r, replay, range(first, 20), drift)
        return
    notes = X.check_regeneration(r, replay, range(first, 20), drift)
    if words is None:
        assert notes == []
    else:
        assert len(notes) == 1 and words in notes[0], notes
    if boundary not in (0.0, 0.88) and first < 11 and replay == "ddim":
        assert "does not reconstruct" in notes[0]


def test_check_regeneration_of_a_one_model_trajectory():
    assert X.check_regeneration(None, "bdia", range(1, 20), False) == []
    r = X.regeneration_switch(flow_sigmas(20, 8.0), None, 0.9)
    assert X.check_regeneration(r, "bdia", range(1, 20), False) == list(r.notes)
