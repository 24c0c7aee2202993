"""The regeneration plan (inversion/regenerate.py) as a pure-function matrix, run on the analytic embedding oracle.

The matrix: null_text {auto, off} x correction {none, source_drift} x start_step {0, 2} x method/replay {ddim,
implicit, exact+bdia, exact+ddim, exact+auto} x mask {yes, no} x the trajectory's negative {optimised by
null-text, negative-prompt, none} = 240 cells. Every cell is planned and *run* (``regenerate.run`` with an oracle
model function that picks each step's negative by its sigma, as ComfyUI's percent ranges do), and checked against
what the plan must be, written out here independently of the code:

* the loop samples with the trajectory's optimised negative when null_text is auto and it has one, else with
  ``negative``; an exact trajectory's auto replay is bdia only when the guidance of *that* negative equals the
  inversion's (the fake fingerprint below: the plain negative) and a BDIA step is left;
* with source_drift the drift pair is (positive, the loop's negative), and the source prompt reconstructs the
  stored source at cfg 7.5 (the inversion ran at cfg 1) -- the issue-19 bug paired the drift with the plain
  negative and missed by 0.75;
* without it, the result is exactly ``methods.sample`` with the expected guidance and replay;
* with a mask, everything outside it is the source.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from ddiminv_dev.gmm import GMM, EmbeddingOracle, rel_error
from ddiminv_dev.gmm import inversion_schedule as sched
from inversion import methods as M
from inversion import nulltext as NT
from inversion import regenerate as R
from inversion.errors import InversionInputError

N, K, CFG = 5, 2, 7.5      # ddim_uniform at 5 steps is 5 steps (at 6 it is 7)
NEGATIVES = ("null_text", "negative_prompt", None)
METHODS = (("ddim", "auto"), ("implicit", "auto"), ("exact", "bdia"), ("exact", "ddim"), ("exact", "auto"))
# the source_drift cells' error, measured worst case per replay: ddim 1.1e-8; bdia 1.5e-6 (at start_step 0 it
# starts from the float64 pair, the drift from the float32 states). The bug (the plain negative's drift): 0.6-0.8
DRIFT_BAR = {"ddim": 2e-8, "bdia": 2.5e-6}


class Oracle:
    """Embedding oracle, a source sample, CFG-1 pivots for every method, null-text negatives."""

    def __init__(self):
        g = GMM.make(seed=4)
        self.o = EmbeddingOracle.make(g, flow=False)
        self.pos = self.o.encode([0, 1, 2], style=self.o.style(0.05))
        null0 = self.o.empty()
        self.x0 = g.sample_x0([0], seed=1)
        src_fn = self.fn(self.pos, null0, 1.0)
        self.pivots = {m: M.invert(self.x0, sched(False, N), src_fn, M.Options(m), family="vp")
                       for m in ("ddim", "implicit", "exact")}
        assert all(t.steps == N for t in self.pivots.values())
        res = NT.optimize(self.pivots["ddim"], lambda x, s: self.o.denoise(x, s, self.pos), self.o.denoise, null0,
                          NT.NullTextOptions(cfg=CFG))
        self.P, self.NEG = [[self.pos, {}]], [[null0, {}]]
        self.OPT = [[e, {"sigma": float(s)}] for e, s in zip(res.embeddings, res.sigmas[:-1], strict=True)]
        self.mask = torch.zeros(1, 1, 8, 8)
        self.mask[..., :4] = 1.0

    def fn(self, pos, neg, cfg):
        return lambda x, s: self.o.denoise(x, s, neg) + cfg * (self.o.denoise(x, s, pos) - self.o.denoise(x, s, neg))

    @staticmethod
    def at(cond, sigma):
        """The entry of a (per-step) conditioning whose range holds ``sigma``."""
        return cond[0][0] if len(cond) == 1 else min(cond, key=lambda c: abs(c[1]["sigma"] - sigma))[0]

    def step_fn(self, positive, negative, cfg=CFG):
        return lambda x, s: self.fn(self.at(positive, s), self.at(negative, s), cfg)(x, s)

    def guided(self, log=None):
        def run(positive, negative, loop, steps, label):
            if log is not None:
                log.append((positive, negative, steps, label))
            return loop(self.step_fn(positive, negative), self.x0.device, None)
        return run

    def traj(self, method, negative=None, masked=False):
        t = self.pivots[method]
        if negative is not None:
            conds = self.OPT if negative == "null_text" else self.P
            t = t.with_(optimized_negative={"mode": negative, "cfg": CFG if negative == "null_text" else None,
                                            "conditioning": conds})
        return t.with_(noise_mask=self.mask) if masked else t


@pytest.fixture(scope="module")
def oc():
    return Oracle()


def fingerprint(oc):
    """The inversion's recorded guidance is (positive, plain negative, cfg): only that negative is 'the same'."""
    asked = []

    def same(negative):
        asked.append(negative)
        return negative is oc.NEG
    return same, asked


CELLS = list(itertools.product(("auto", "off"), ("none", "source_drift"), (0, K), METHODS, (False, True),
                               NEGATIVES))


@pytest.mark.parametrize("null_text,correction,k,method_replay,masked,negative", CELLS)
def test_the_plan_matrix(oc, null_text, correction, k, method_replay, masked, negative):
    method, replay = method_replay
    traj = oc.traj(method, negative, masked)
    same, asked = fingerprint(oc)
    choices = R.Choices(cfg=CFG, start_step=k, correction=correction, exact_replay=replay, null_text=null_text)
    plan = R.plan(traj, choices, R.Prompts(oc.P, oc.NEG), same)

    # what the plan must be
    want_neg = (oc.OPT if negative == "null_text" else oc.P) if (negative and null_text == "auto") else oc.NEG
    if method != "exact":
        want_replay = "ddim"
    elif replay != "auto":
        want_replay = replay
    else:
        want_replay = "bdia" if want_neg is oc.NEG else "ddim"
    want_steps = N - k - 1 if want_replay == "bdia" else N - k
    assert plan.negative is want_neg and plan.guidance.positive is oc.P
    assert plan.replay == want_replay and plan.steps == want_steps and plan.start_step == k
    assert asked == ([want_neg] if (method, replay) == ("exact", "auto") else [])   # the loop's negative, once
    if correction == "source_drift":
        assert plan.drift.positive is oc.P and plan.drift.negative is want_neg and plan.drift_steps == want_steps
    else:
        assert plan.drift is None and plan.drift_steps == 0
    assert plan.masked is masked
    used = [n for n in plan.notes if n.startswith("negative: the trajectory's")]
    assert bool(used) == (want_neg is not oc.NEG)

    # running it
    log = []
    out = R.run(plan, traj, oc.guided(log), oc.mask if masked else None)
    assert [(p_, n_) for p_, n_, _, _ in log][-1] == (oc.P, want_neg)
    if correction == "source_drift":
        assert len(log) == 2 and log[0][:3] == (oc.P, want_neg, want_steps)
        assert rel_error(out, traj.states[0]) <= DRIFT_BAR[want_replay]      # the source stays pinned
    else:
        assert len(log) == 1
        direct = M.sample(traj, oc.step_fn(oc.P, want_neg), replay=want_replay, start_step=k,
                          mask=oc.mask if masked else None)
        assert torch.equal(out, direct)
    if masked:
        keep = oc.mask.expand_as(out) == 0
        assert torch.equal(out[keep], traj.states[0].to(out.dtype)[keep])


def test_the_old_pairing_is_what_the_matrix_catches(oc):
    """Contrast with the bug: the drift paired with the plain negative while the loop samples with the
    optimised one misses the source by ~0.75 (the matrix's bars are 2e-8 / 2.5e-6)."""
    for negative in ("null_text", "negative_prompt"):
        traj = oc.traj("ddim", negative)
        plan = R.plan(traj, R.Choices(cfg=CFG, correction="source_drift"), R.Prompts(oc.P, oc.NEG))
        err = rel_error(R.run(plan.with_drift_negative(oc.NEG), traj, oc.guided()), traj.states[0])
        assert err > 0.3, (negative, err)


# ---------------------------------------------------------------------------------------------- notes and choices
def test_an_explicit_source_negative_is_used_unless_an_optimised_negative_samples(oc):
    other = [[oc.o.encode([3]), {}]]
    plain = R.plan(oc.traj("ddim"), R.Choices(cfg=CFG, correction="source_drift"),
                   R.Prompts(oc.P, oc.NEG, source_negative=other))
    assert plain.drift.negative is other and not any("ignored" in n for n in plain.notes)
    nt = R.plan(oc.traj("ddim", "null_text"), R.Choices(cfg=CFG, correction="source_drift"),
                R.Prompts(oc.P, oc.NEG, source_negative=other))
    assert nt.drift.negative is oc.OPT and any(n.startswith("source_negative ignored") for n in nt.notes)
    sp = [[oc.o.encode([0]), {}]]
    edit = R.plan(oc.traj("ddim", "null_text"), R.Choices(cfg=CFG, correction="source_drift"),
                  R.Prompts(oc.P, oc.NEG, source_positive=sp))
    assert edit.drift == R.Pair(sp, oc.OPT)
    unused = R.plan(oc.traj("ddim"), R.Choices(cfg=CFG), R.Prompts(oc.P, oc.NEG, source_positive=sp))
    assert unused.drift is None and any("used only by correction source_drift" in n for n in unused.notes)


def test_null_text_off_and_the_cfg_warning(oc):
    off = R.plan(oc.traj("ddim", "null_text"), R.Choices(cfg=CFG, null_text="off"), R.Prompts(oc.P, oc.NEG))
    assert off.negative is oc.NEG and off.negative_from == "negative"
    assert any(n.startswith("null_text off") for n in off.notes)
    other = R.plan(oc.traj("ddim", "null_text"), R.Choices(cfg=4.0), R.Prompts(oc.P, oc.NEG))
    assert other.warnings == ("the negative was optimised for cfg 7.5; at cfg 4 the sampler does not retrace the "
                              "pivot (use that cfg, or correction source_drift)",)
    pinned = R.plan(oc.traj("ddim", "null_text"), R.Choices(cfg=4.0, correction="source_drift"),
                    R.Prompts(oc.P, oc.NEG))
    assert pinned.warnings == () and any("source_drift still pins the source" in n for n in pinned.notes)
    same = R.plan(oc.traj("ddim", "null_text"), R.Choices(cfg=CFG), R.Prompts(oc.P, oc.NEG))
    assert same.warnings == () and same.negative_from == "null_text"
    npi = R.plan(oc.traj("ddim", "negative_prompt"), R.Choices(cfg=4.0), R.Prompts(oc.P, oc.NEG))
    assert npi.warnings == () and npi.negative_from == "negative_prompt"   # any cfg: no warning


def test_exact_replay_choices(oc):
    same, asked = fingerprint(oc)
    last = R.plan(oc.traj("exact"), R.Choices(cfg=CFG, start_step=N - 1), R.Prompts(oc.P, oc.NEG), same)
    assert last.replay == "ddim" and last.steps == 1 and any("leaves no BDIA step" in n for n in last.notes)
    auto = R.plan(oc.traj("exact"), R.Choices(cfg=CFG), R.Prompts(oc.P, oc.NEG), same)
    assert auto.replay == "bdia" and "exact_replay auto -> bdia (the inversion's model, prompts and cfg)" in auto.notes
    nofp = R.plan(oc.traj("exact"), R.Choices(cfg=CFG), R.Prompts(oc.P, oc.NEG))
    assert nofp.replay == "ddim"            # no comparison given: not provably the same
    ign = R.plan(oc.traj("ddim"), R.Choices(cfg=CFG, exact_replay="bdia"), R.Prompts(oc.P, oc.NEG))
    assert ign.replay == "ddim" and any("is for 'exact' trajectories" in n for n in ign.notes)
    assert "replay bdia, 4 steps, cfg 7.5, gamma 1" == R.describe(auto, oc.traj("exact"))


@pytest.mark.parametrize("change,words", [
    (dict(correction="pinned"), ("correction 'pinned' is unknown", "none, source_drift")),
    (dict(exact_replay="fast"), ("exact_replay 'fast' is unknown", "auto, bdia, ddim")),
    (dict(null_text="on"), ("null_text 'on' is unknown", "auto, off")),
    (dict(start_step=N), ("start_step must be in [0, 4]", "choose a step inside")),
    (dict(start_step=-1), ("start_step must be in [0, 4]",)),
    (dict(start_step=1.5), ("start_step must be an integer",)),
    (dict(cfg=float("nan")), ("cfg must be a finite number",)),
    (dict(exact_replay="bdia", start_step=N - 1), ("no step left", "start_step <= 3")),
])
def test_choices_that_cannot_run_are_refused_before_any_evaluation(oc, change, words):
    base = dict(cfg=CFG, start_step=0)
    base.update(change)
    with pytest.raises(InversionInputError) as e:
        R.plan(oc.traj("exact"), R.Choices(**base), R.Prompts(oc.P, oc.NEG))
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_bad_conditionings_are_refused_by_name(oc):
    nan = [[torch.full((1, 8, 48), float("nan")), {}]]
    with pytest.raises(InversionInputError, match="^the trajectory's optimised negative contains NaN"):
        R.plan(oc.traj("ddim").with_(optimized_negative={"mode": "null_text", "cfg": CFG, "conditioning": nan}),
               R.Choices(cfg=CFG), R.Prompts(oc.P, oc.NEG))
    with pytest.raises(InversionInputError, match="^source_positive contains NaN"):
        R.plan(oc.traj("ddim"), R.Choices(cfg=CFG, correction="source_drift"),
               R.Prompts(oc.P, oc.NEG, source_positive=nan))
    with pytest.raises(InversionInputError, match="^negative is empty"):
        R.plan(oc.traj("ddim"), R.Choices(cfg=CFG), R.Prompts(oc.P, []))
    with pytest.raises(InversionInputError, match="no mask was given"):
        R.run(R.plan(oc.traj("ddim", masked=True), R.Choices(cfg=CFG), R.Prompts(oc.P, oc.NEG)),
              oc.traj("ddim", masked=True), oc.guided())


# ------------------------------------------------------------------- what the node prints, word for word (mutants)
@pytest.mark.parametrize("negative,how", [("null_text", "null-text"), ("negative_prompt", "negative-prompt")])
def test_the_notes_name_the_negative_the_loop_samples_with(oc, negative, how):
    """The node's text is the user's only view of which negative sampled: it names the trajectory's mode and
    its entry count (null-text: one per step), and says when null_text off leaves it unused."""
    entries = N if negative == "null_text" else 1
    auto = R.plan(oc.traj("ddim", negative), R.Choices(cfg=CFG), R.Prompts(oc.P, oc.NEG))
    assert auto.notes == (f"negative: the trajectory's {how} negative ({entries} entries)",)
    off = R.plan(oc.traj("ddim", negative), R.Choices(cfg=CFG, null_text="off"), R.Prompts(oc.P, oc.NEG))
    assert off.notes == (f"null_text off: sampling with 'negative' (the trajectory's {how} negative is not used)",)
    plain = R.plan(oc.traj("ddim"), R.Choices(cfg=CFG), R.Prompts(oc.P, oc.NEG))
    assert plain.notes == () and plain.warnings == ()


@pytest.mark.parametrize("name", ["positive", "negative", "source_positive", "source_negative",
                                  "the trajectory's optimised negative"])
def test_a_conditioning_of_another_batch_is_refused_by_name(oc, name):
    """Batch 1 (shared) or one per latent; a batch-3 conditioning on a batch-1 trajectory names its input."""
    three = [[torch.zeros(3, 8, 48), {}]]
    prompts = {"positive": oc.P, "negative": oc.NEG}
    traj = oc.traj("ddim")
    if name == "the trajectory's optimised negative":
        traj = traj.with_(optimized_negative={"mode": "negative_prompt", "cfg": None, "conditioning": three})
    else:
        prompts[name] = three
    with pytest.raises(InversionInputError) as e:
        R.plan(traj, R.Choices(cfg=CFG, correction="source_drift"), R.Prompts(**prompts))
    assert str(e.value).startswith(f"{name} has batch 3 but the latent has batch 1; use one conditioning"), str(e.value)


def test_the_texts_of_the_replay_choice_and_of_the_drift_pair_word_for_word(oc):
    """The node's text is where a user learns why a replay ran and what the drift used (mutants that changed
    these words, or a boundary, survived the matrix)."""
    same, _ = fingerprint(oc)
    other = [[oc.o.encode([3]), {}]]
    differs = R.plan(oc.traj("exact"), R.Choices(cfg=CFG), R.Prompts(oc.P, other), same)
    assert differs.replay == "ddim"
    assert differs.notes == ("exact_replay auto -> ddim (guidance differs from the inversion's)",)
    one_left = R.plan(oc.traj("exact"), R.Choices(cfg=CFG, start_step=N - 2), R.Prompts(oc.P, oc.NEG), same)
    assert (one_left.replay, one_left.steps) == ("bdia", 1)          # one BDIA step left is still a BDIA replay
    nt = R.plan(oc.traj("ddim", "null_text"), R.Choices(cfg=CFG, correction="source_drift"),
                R.Prompts(oc.P, oc.NEG, source_negative=other))
    assert nt.notes[-1] == ("source_negative ignored: the drift uses the trajectory's optimised negative, the one "
                            "the loop samples with (another negative would correct the guidance twice)")
    unused = R.plan(oc.traj("ddim"), R.Choices(cfg=CFG), R.Prompts(oc.P, oc.NEG, source_negative=other))
    assert unused.notes == ("source_positive/source_negative are used only by correction source_drift and "
                            "attention control; ignored",)
    near = R.plan(oc.traj("ddim", "null_text"), R.Choices(cfg=7.0), R.Prompts(oc.P, oc.NEG))
    assert len(near.warnings) == 1                                   # 0.5 away from the optimised cfg still warns
    pinned = R.plan(oc.traj("ddim", "null_text"), R.Choices(cfg=7.0, correction="source_drift"),
                    R.Prompts(oc.P, oc.NEG))
    assert pinned.notes[-1] == "the negative was optimised for cfg 7.5; at cfg 7 source_drift still pins the source"


def test_describe_names_gamma_only_for_a_bdia_replay(oc):
    same, _ = fingerprint(oc)
    plain = R.plan(oc.traj("ddim"), R.Choices(cfg=CFG), R.Prompts(oc.P, oc.NEG))
    assert R.describe(plain, oc.traj("ddim")) == "replay ddim, 5 steps, cfg 7.5"
    t = oc.traj("exact")
    t = t.with_(options={**t.options, "gamma": 0.9})
    bdia = R.plan(t, R.Choices(cfg=CFG), R.Prompts(oc.P, oc.NEG), same)
    assert R.describe(bdia, t) == "replay bdia, 4 steps, cfg 7.5, gamma 0.9"


@pytest.mark.parametrize("correction", ["none", "source_drift"])
def test_run_reports_progress_for_every_step_of_both_runs(oc, correction):
    """The UI bar: the loop and the drift run each call progress once per step they run, with the labels and
    step counts the plan gives the adapter."""
    plan = R.plan(oc.traj("ddim"), R.Choices(cfg=CFG, start_step=K, correction=correction), R.Prompts(oc.P, oc.NEG))
    calls, runs = [], []

    def guided(positive, negative, loop, steps, label):
        runs.append((steps, label))
        return loop(oc.step_fn(positive, negative), oc.x0.device, lambda *a: calls.append((label, a[0], a[1])))

    R.run(plan, oc.traj("ddim"), guided)
    want = [(N - K, "")] if correction == "none" else [(N - K, "source_drift"), (N - K, "")]
    assert runs == want
    for steps, label in want:
        assert [c[1:] for c in calls if c[0] == label] == [(i, steps) for i in range(steps)], (label, calls)
