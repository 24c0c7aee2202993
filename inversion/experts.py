"""Two experts (Wan 2.2 A14B): which model evaluates each step, as pure functions of the schedule.

Wan 2.2's A14B models sample with two networks: a *high-noise* expert for the steps whose noise level is at or
above a boundary and a *low-noise* expert below it (Wan 2.2's own boundaries: 0.875 for text-to-video, 0.900
for image-to-video, on the flow sigma = t / 1000). In ComfyUI's standard Wan 2.2 workflow the switch is a *step*:
two core ``KSamplerAdvanced`` nodes on one schedule, the high-noise one with ``end_at_step = k`` and the
low-noise one with ``start_at_step = k``.

Everything here speaks of a schedule's sigmas in *sampling* order (descending, ``sigmas[0]`` the noise level,
``sigmas[-1]`` the clean level) and of sampling step ``j`` going ``sigmas[j] -> sigmas[j+1]``. Inversion runs the
same steps in reverse: inversion step ``i`` (ascending) is sampling step ``N - 1 - i``, and uses the expert that
sampling step uses, so the pair is the same model at every step and ``exact`` stays exact across the switch.
Inverting therefore starts with the low-noise expert and changes to the high-noise one past the boundary;
sampling starts high and ends low.

Dispatching on the evaluated sigma (:func:`by_sigma`) is the same policy wherever evaluations happen at the
schedule's own levels (``exact`` and the sampler): a step's expert is the one for its starting level.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from .errors import InversionInputError

HIGH, LOW = "high", "low"
WAN22_BOUNDARY = {"t2v": 0.875, "i2v": 0.900}   # Wan 2.2 A14B's own switch points (flow sigma)
DEFAULT_BOUNDARY = WAN22_BOUNDARY["t2v"]


def _levels(sigmas: Sequence) -> list:
    s = [float(x) for x in sigmas]
    if len(s) < 2:
        raise InversionInputError("the schedule has no step; use at least 1 step")
    if any(not math.isfinite(x) for x in s) or any(s[j] <= s[j + 1] for j in range(len(s) - 1)):
        raise InversionInputError("the schedule's sigmas must be finite and strictly descending (sampling order); "
                                  "use a standard scheduler")
    return s


def switch_step(sigmas: Sequence, boundary: float) -> int:
    """The sampling step k at which the low-noise expert takes over: steps j < k start at sigma >= boundary (the
    high-noise expert's), steps j >= k below it. 0: all low-noise; N: all high-noise. ``KSamplerAdvanced``'s
    ``end_at_step`` of the high-noise sampler (and ``start_at_step`` of the low-noise one)."""
    s = _levels(sigmas)
    b = float(boundary)
    if not (math.isfinite(b) and b > 0):
        raise InversionInputError(f"the switch boundary must be a finite sigma > 0 (got {boundary!r}); use Wan "
                                  f"2.2's {DEFAULT_BOUNDARY} (text-to-video) or {WAN22_BOUNDARY['i2v']} "
                                  "(image-to-video)")
    n = len(s) - 1
    return sum(1 for j in range(n) if s[j] >= b)


def boundary_for_step(sigmas: Sequence, k: int) -> float:
    """A boundary sigma that switches at sampling step ``k`` (0..N): halfway between the levels the two
    experts start from, so rounding of a stored sigma cannot move the switch; inverse of :func:`switch_step`."""
    s = _levels(sigmas)
    n = len(s) - 1
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise InversionInputError(f"switch step {k!r} is outside the schedule's 0..{n} steps; use a step in it "
                                  "(the high-noise KSamplerAdvanced's end_at_step)")
    if k == 0:
        return s[0] * 2.0 + 1.0            # above every level: the low-noise expert everywhere
    return (s[k - 1] + s[k]) / 2.0         # k = N: between the last step's start and the clean level


def sampling_experts(n: int, k: int) -> list:
    """Expert of each sampling step 0..N-1 (descending sigma): high-noise for j < k."""
    return [HIGH] * k + [LOW] * (n - k)


def inversion_experts(n: int, k: int) -> list:
    """Expert of each inversion step 0..N-1 (ascending sigma): the expert of the sampling step it reverses."""
    return list(reversed(sampling_experts(n, k)))


def by_sigma(low_fn: Callable, high_fn: Callable, boundary: float) -> Callable:
    """``model_fn(x, sigma)`` that evaluates the high-noise expert at sigma >= boundary and the low-noise one
    below (one sigma per call: a batch of latents shares its level)."""
    b = float(boundary)

    def model_fn(x, sigma, *args, **kwargs):
        s = float(sigma.flatten()[0]) if hasattr(sigma, "flatten") else float(sigma)
        return (high_fn if expert_of(s, b) == HIGH else low_fn)(x, sigma, *args, **kwargs)
    return model_fn


# ---------------------------------------------------------------------------------------------- one guider per segment
class _Switch(Exception):
    """Raised inside a segment's loop when an evaluation needs the other expert (caught by :func:`run_segments`,
    never leaves it)."""


REPLAY_RTOL = 1e-5   # replayed evaluation inputs must match the recorded ones (a deterministic loop: exactly)


def expert_of(sigma: float, boundary: float) -> str:
    """The expert that evaluates at ``sigma``: high-noise at or above the boundary (as :func:`by_sigma`)."""
    return HIGH if float(sigma) >= float(boundary) else LOW


def _fingerprint(x):
    """Two device-side sums of an evaluation's input (no host sync): enough to see a replay that diverged."""
    xd = x.detach().double()
    return (xd.sum(), (xd * xd).sum())


def run_segments(loop: Callable, run_with: Callable, boundary: float, first: str = LOW):
    """Run ``loop(model_fn, device, progress)`` with two experts, each segment inside its own expert's runner.

    ``run_with(expert, seg_loop)`` runs ``seg_loop(model_fn, device, progress)`` with that expert's guided model
    (the adapter: one CFGGuider per expert segment, so only one expert needs to be loaded at a time, as in the
    two-KSamplerAdvanced workflow) and returns its result. Evaluations dispatch on their sigma
    (:func:`expert_of`). When the loop asks for the other expert, the segment stops there and the loop runs again
    inside the other expert's runner, its earlier evaluations answered from what the first segment recorded (the
    loop is deterministic, so the replay retraces the same states; checked on the evaluation inputs, once, at
    the end), and its progress reported once per step. A segment whose expert was guessed wrong (no evaluation)
    costs one runner start. The result equals one pass with :func:`by_sigma` of the
    two models. Returns ``(result, experts run in order)``. ``first``: the expert of the loop's first evaluation
    (a wrong guess costs one runner start, not a result)."""
    b = float(boundary)
    if first not in (HIGH, LOW):
        raise InversionInputError(f"expert {first!r} is unknown; use {HIGH!r} or {LOW!r}")
    recorded = []            # (sigma, denoised, input fingerprint) of the finished segments' evaluations
    reported = [0]           # progress calls made by the finished segments
    order = []
    drift = []               # device-side fingerprint differences of replayed inputs
    evaluated = set()        # experts that evaluated something in a finished segment
    expert = first
    while True:
        order.append(expert)
        seg = {"n": 0, "calls": 0, "switch": None, "new": 0}

        def seg_loop(model_fn, device, progress, expert=expert, seg=seg):
            def fn(x, sigma, *args, **kwargs):
                n = seg["n"]
                if n < len(recorded):                   # replay of a finished segment's evaluation
                    s, D, fp = recorded[n]
                    if float(sigma) != s:
                        raise InversionInputError(
                            f"the replay evaluated sigma {float(sigma):.6g} where the first expert's segment "
                            f"evaluated {s:.6g} (a nondeterministic loop); run it with one model, or report this")
                    now = _fingerprint(x)
                    drift.append(max((now[i] - fp[i]).abs() / fp[i].abs().clamp_min(1e-30) for i in (0, 1)))
                    seg["n"] += 1
                    return D.to(x.device)
                need = expert_of(sigma, b)
                if need != expert:
                    seg["switch"] = need
                    raise _Switch()
                D = model_fn(x, sigma, *args, **kwargs)
                recorded.append((float(sigma), D, _fingerprint(x)))
                seg["n"] += 1
                seg["new"] += 1
                return D

            def prog(*a):
                seg["calls"] += 1
                if progress is not None and seg["calls"] > reported[0]:
                    progress(*a)
            try:
                return loop(fn, device, prog)
            except _Switch:
                return None
        result = run_with(expert, seg_loop)
        if seg["switch"] is None:
            break
        reported[0] = seg["calls"]
        if seg["new"]:
            evaluated.add(expert)
        expert = seg["switch"]
        if expert in evaluated:
            raise InversionInputError(
                f"the loop went back to the {expert}-noise expert (its evaluation sigmas are not monotonic across "
                f"the boundary {b:g}); run it with one model, or report this as a bug")
    if drift:
        worst = float(max(d.to("cpu") for d in drift))
        if not worst <= REPLAY_RTOL:
            raise InversionInputError(
                f"replaying the first expert's steps did not retrace them (relative difference {worst:.3g} in the "
                "model inputs): the loop is not deterministic on this device; run it with one model, or report this")
    return result, order


# ------------------------------------------------------------------------------------------ what a trajectory records
def record(sigmas: Sequence, boundary: float, low_id: str, high_id: str) -> dict:
    """What DDIM Invert writes to ``trajectory.extra['experts']``: the boundary, the switch step on the
    trajectory's own schedule (``sigmas`` in sampling order) and the two experts' identities (opaque strings)."""
    return {"boundary": float(boundary), "switch_step": switch_step(sigmas, boundary), "low": str(low_id),
            "high": str(high_id)}


def check_record(rec) -> Optional[dict]:
    """A trajectory's ``extra['experts']`` (None: one model), checked."""
    if rec is None:
        return None
    fix = "invert again with DDIM Invert"
    if not isinstance(rec, dict) or not {"boundary", "switch_step", "low", "high"} <= set(rec):
        raise InversionInputError(f"trajectory extra['experts'] must be a dict with boundary, switch_step, low and "
                                  f"high; {fix}")
    b = rec["boundary"]
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not (math.isfinite(b) and b > 0):
        raise InversionInputError(f"trajectory extra['experts']['boundary'] must be a finite sigma > 0; {fix}")
    return rec


def describe(rec: dict, steps: int, offset: int = 0) -> str:
    """The switch in the words of the two-KSamplerAdvanced workflow (``offset``: the first sampling step of the
    trajectory's schedule in the full one, DDIM Invert's start_step)."""
    k, b = int(rec["switch_step"]), float(rec["boundary"])
    if k == 0:
        return f"two experts, boundary {b:g}: every step is below it, the low-noise expert (model) only"
    if k == steps:
        return f"two experts, boundary {b:g}: every step is at or above it, the high-noise expert only"
    return (f"two experts, boundary {b:g}: high-noise (model_high_noise) for sampling steps {offset}-{offset + k - 1}, "
            f"low-noise (model) from step {offset + k} (KSamplerAdvanced end_at_step / start_at_step "
            f"{offset + k})")


def check_pair(rec: Optional[dict], low_id: str, high_id: Optional[str]) -> list:
    """The sampler's experts against the trajectory's record: raises for a pair that cannot regenerate it (a
    second model missing or extra, the two swapped); returns warnings for experts that are other models."""
    if rec is None:
        if high_id is not None:
            raise InversionInputError("model_high_noise is connected but the trajectory was inverted with one model; "
                                      "disconnect model_high_noise, or invert with both experts")
        return []
    where = f"boundary {float(rec['boundary']):g}, switch at sampling step {int(rec['switch_step'])}"
    if high_id is None:
        raise InversionInputError(f"the trajectory was inverted with two experts ({where}) but model_high_noise is "
                                  "not connected; connect the high-noise expert to model_high_noise and the "
                                  "low-noise one to model, as in DDIM Invert")
    if low_id != high_id and low_id == rec["high"] and high_id == rec["low"]:
        raise InversionInputError(f"the experts are swapped: model is the trajectory's high-noise expert and "
                                  f"model_high_noise its low-noise one ({where}); connect the low-noise expert to "
                                  "model and the high-noise one to model_high_noise")
    warns = []
    for name, now, was in (("model", low_id, rec["low"]), ("model_high_noise", high_id, rec["high"])):
        if now != was:
            warns.append(f"{name} is not the model that inverted this trajectory's "
                         f"{'low' if name == 'model' else 'high'}-noise steps (another or reloaded model)")
    return warns


def pair_fingerprint(low_fp: Optional[str], high_fp: Optional[str], boundary: float) -> Optional[str]:
    """One guidance fingerprint for two experts and their switch (None when either is not comparable)."""
    if low_fp is None or high_fp is None:
        return None
    return hashlib.blake2b(f"experts|{low_fp}|{high_fp}|{float(boundary)!r}".encode(), digest_size=20).hexdigest()


# ------------------------------------------------------------------------------- the sampler's switch (regeneration)
TRAJECTORY_SWITCH = 0.0   # the sampler's ``boundary`` input: 0 = the switch the trajectory recorded


@dataclass(frozen=True)
class Regeneration:
    """The switch a regeneration dispatches on. ``step``: its switch step on the trajectory's schedule (sampling
    steps j < step run the high-noise expert); ``recorded``: the inversion's."""
    boundary: float
    step: int
    recorded: int
    notes: tuple = ()


def regeneration_switch(sigmas: Sequence, rec: Optional[dict], boundary: float) -> Optional[Regeneration]:
    """The Inverted-Latent Sampler's switch: ``boundary`` 0 (:data:`TRAJECTORY_SWITCH`) takes the trajectory's
    recorded one (DDIM Invert's, Wan 2.2's own by default), another sigma switches there on the trajectory's
    schedule (``sigmas``, sampling order). For a one-model trajectory: None, or with a boundary given only a note
    that it is ignored. A boundary that lands on the recorded switch step dispatches every level as the inversion
    did."""
    b = boundary
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not (math.isfinite(b) and b >= 0):
        raise InversionInputError(f"boundary must be a finite sigma >= 0 (got {boundary!r}); use 0 for the "
                                  f"trajectory's switch, or a sigma such as Wan 2.2's {DEFAULT_BOUNDARY}")
    b = float(b)
    if rec is None:
        return None if b == TRAJECTORY_SWITCH else Regeneration(0.0, 0, 0, (
            f"boundary {b:g} ignored: the trajectory was inverted with one model (set it to 0)",))
    recorded = int(rec["switch_step"])
    if b == TRAJECTORY_SWITCH:
        return Regeneration(float(rec["boundary"]), recorded, recorded)
    step = switch_step(sigmas, b)
    notes = ()
    if step == recorded:
        notes = (f"boundary {b:g} switches at the trajectory's step {recorded}: the inversion's experts at every "
                 "step",)
    return Regeneration(b, step, recorded, notes)


def changed_steps(regen: Regeneration, evaluated: Sequence) -> tuple:
    """The sampling steps among ``evaluated`` whose expert is not the one that inverted them."""
    lo, hi = sorted((regen.step, regen.recorded))
    return tuple(int(j) for j in evaluated if lo <= j < hi)


def check_regeneration(regen: Optional[Regeneration], replay: str, evaluated: Sequence, drift: bool) -> list:
    """Notes on what a regeneration with ``regen``'s switch does; raises where it breaks the reconstruction a BDIA
    replay promises. ``evaluated``: the sampling steps the replay evaluates; ``drift``: correction source_drift
    (it re-runs the stored states with the same experts, so the source stays pinned whatever the switch)."""
    if regen is None:
        return []
    notes = list(regen.notes)
    if regen.step == regen.recorded:
        return notes
    changed = changed_steps(regen, evaluated)
    where = f"boundary {regen.boundary:g} switches at sampling step {regen.step}, the inversion at step " \
            f"{regen.recorded}"
    if not changed:
        return notes + [f"{where}; no step this replay evaluates changes expert: the inversion's experts"]
    now = HIGH if regen.step > regen.recorded else LOW
    was = LOW if now == HIGH else HIGH
    span = f"{changed[0]}" if len(changed) == 1 else f"{changed[0]}-{changed[-1]}"
    what = f"sampling step{'s' if len(changed) > 1 else ''} {span} run the {now}-noise expert where the " \
           f"inversion ran the {was}-noise one"
    if replay == "bdia" and not drift:
        raise InversionInputError(f"{where}: {what}, so the exact (BDIA) replay cannot reconstruct this trajectory; "
                                  "set boundary 0 (the trajectory's switch), or exact_replay ddim (or correction "
                                  "source_drift) to regenerate with the new switch")
    if drift:
        return notes + [f"{where}: {what}; source_drift re-runs the stored states with the same experts, so the "
                        "source prompt still reconstructs"]
    return notes + [f"{where}: {what}; this changes the result (it does not reconstruct the source: boundary 0 "
                    "does, or correction source_drift)"]
