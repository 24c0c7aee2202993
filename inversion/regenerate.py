"""The regeneration plan: every decision the Inverted-Latent Sampler makes, as one pure function (no ComfyUI).

:func:`plan` takes the trajectory, the sampler's choices (:class:`Choices`: cfg, ``start_step``, ``correction``,
``exact_replay``, ``null_text``), the prompts (:class:`Prompts`; CONDITIONING objects are passed through, only
checked) and the guidance comparison of DDIM Invert's fingerprint (a callable, asked only when an exact
trajectory's replay is ``auto``), and returns a :class:`Plan`:

* ``negative`` -- the negative the loop samples with: the trajectory's optimised negative (Null-Text Inversion,
  either mode) when ``null_text`` is ``auto`` and the trajectory has one, else the ``negative`` input;
* ``replay`` -- ``ddim`` or ``bdia`` (exact trajectories: ``exact_replay``, ``auto`` = bdia only when the
  guidance provably equals the inversion's and a BDIA step is left);
* ``drift`` -- the (positive, negative) pair ``correction=source_drift`` is computed with, or None. The drift
  negative is *the negative the loop samples with* unless ``source_negative`` names another one, and with an
  optimised negative always that negative: the drift then cancels exactly the guidance the loop applies, so the
  source prompt reconstructs the stored states (pairing the drift with the plain negative while the loop uses
  the optimised one corrected the guidance twice: error 0.75 on the oracle, issue 19);
* ``steps`` / ``drift_steps`` -- the model evaluations of each run (the progress bars' lengths);
* ``notes`` / ``warnings`` -- what the node's text output says.

:func:`run` executes a plan with a ``guided(positive, negative, loop, steps, label)`` runner (the adapter's
``run_guided`` in the node; a plain model function on the oracle in the tests), so the node and the math-core
tests run the same code. Nothing here reads or writes a model.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch

from . import attention as A
from . import checks, methods
from . import p2p as P2P
from .errors import InversionInputError
from .trajectory import Trajectory

CORRECTIONS = ("none", "source_drift")
EXACT_REPLAYS = ("auto", "bdia", "ddim")
NULL_TEXT = ("auto", "off")


@dataclass(frozen=True)
class Choices:
    """The sampler's widgets (what the user chose), validated by :meth:`check`."""
    cfg: float = 1.0
    start_step: int = 0
    correction: str = "none"
    exact_replay: str = "auto"
    null_text: str = "auto"

    def check(self) -> "Choices":
        for name, value, allowed in (("correction", self.correction, CORRECTIONS),
                                     ("exact_replay", self.exact_replay, EXACT_REPLAYS),
                                     ("null_text", self.null_text, NULL_TEXT)):
            if value not in allowed:
                raise InversionInputError(f"{name} {value!r} is unknown; use one of {', '.join(allowed)}")
        if isinstance(self.start_step, bool) or not isinstance(self.start_step, int):
            raise InversionInputError(f"start_step must be an integer (got {self.start_step!r}); use e.g. 0")
        return replace(self, cfg=checks.check_cfg(self.cfg))


@dataclass(frozen=True)
class Prompts:
    """The sampler's CONDITIONING inputs (opaque here: passed through to the runner, checked only)."""
    positive: Any
    negative: Any
    source_positive: Any = None
    source_negative: Any = None


@dataclass(frozen=True)
class Pair:
    positive: Any
    negative: Any


@dataclass(frozen=True)
class Plan:
    replay: str                   # "ddim" | "bdia"
    start_step: int
    cfg: float
    guidance: Pair                # what the loop samples with
    negative_from: str            # "negative" | "null_text" | "negative_prompt": where guidance.negative comes from
    drift: Optional[Pair]         # what source_drift is computed with (None: no correction)
    steps: int                    # model evaluations of the loop
    drift_steps: int              # model evaluations of the drift run (0 without it)
    masked: bool                  # the trajectory's noise_mask pins the unmasked region
    notes: tuple = ()
    warnings: tuple = ()
    attention: Optional["AttentionPlan"] = None   # attention control (None: a plain regeneration)

    @property
    def negative(self):
        return self.guidance.negative

    def with_drift_negative(self, negative) -> "Plan":
        """The same plan with the drift computed with another negative (only to measure what that costs)."""
        return replace(self, drift=Pair(self.drift.positive, negative))


@dataclass(frozen=True)
class Attention:
    """What attention control needs from the model (read by the adapter): its layers and the chunk kinds every
    evaluation runs (COND, plus UNCOND unless cfg 1 skips it)."""
    control: A.Control
    layers: tuple
    chunks: tuple
    family: Optional[str] = None     # ComfyUI's supported_models class name: family defaults (masactrl's blocks)


@dataclass(frozen=True)
class AttentionPlan:
    control: A.Control
    source: Pair                  # the source branch's guidance (stored states, source prompt)
    schedule: A.Schedule
    alignment: Optional[P2P.Alignment]
    blend_cols: tuple             # (source columns, edit columns) of the blend words
    chunks: tuple = (A.UNCOND, A.COND)   # the chunk kinds every evaluation runs
    source_runs: Optional[dict] = None   # {sampling step: chunks the source branch evaluates} (plan() sets it)

    def describe(self) -> str:
        c = self.control
        how = f"{c.method}" + (f" {c.mode}" if c.method == "p2p" else "")
        return f"attention control {how}: {self.schedule.report()}; {self.cost()}"

    def cost(self) -> str:
        """What the source branch costs: on how many steps it runs (all chunks / cond only) or is skipped."""
        runs = self.source_runs
        if runs is None:
            return "2 evaluations per step (source + edit)"
        n = len(self.chunks)
        full = sum(1 for v in runs.values() if len(v) == n)
        part = sum(1 for v in runs.values() if 0 < len(v) < n)
        skip = sum(1 for v in runs.values() if not v)
        what = [f"{full} full"] + ([f"{part} cond only"] if part else []) + ([f"{skip} skipped"] if skip else [])
        return (f"source branch {', '.join(what)} of {len(runs)} steps: "
                f"{A.source_cost(runs, self.chunks):.2f} evaluations per step (a plain edit: 1)")


def run_steps(traj: Trajectory, replay: str, k: int) -> range:
    """The sampling steps (of the full schedule) a replay from start_step ``k`` evaluates."""
    return range(k + 1 if replay == "bdia" else k, traj.steps)


def _p2p_alignment(c: A.Control, prompts: Prompts):
    if c.method != "p2p":
        return None, ((), ())
    src = P2P.prompt_of(prompts.source_positive, "source_positive")
    edit = P2P.prompt_of(prompts.positive, "positive")
    al = P2P.align(src, edit, c.mode, c.reweight_words, c.reweight)
    cols = ((), ())
    if c.blend_words and c.mask is None:
        cols = (tuple(P2P.word_columns(src, c.blend_words, "blend_words", required=False)),
                tuple(P2P.word_columns(edit, c.blend_words, "blend_words", required=False)))
        if not cols[0] and not cols[1]:
            raise InversionInputError(f"blend_words {', '.join(c.blend_words)!r} are in neither prompt; name "
                                      "words of the source or the edit prompt")
    return al, cols


def _attention_plan(traj: Trajectory, attn: Attention, prompts: Prompts, source: Pair, replay: str,
                    k: int) -> AttentionPlan:
    c = A.check(A.for_model(attn.control, attn.layers, attn.family))
    if prompts.source_positive is None:
        raise InversionInputError("attention control needs source_positive (the prompt the source was inverted "
                                  "with: the source branch records its attention); connect it")
    al, cols = _p2p_alignment(c, prompts)
    sched = A.schedule(c, attn.layers, traj.steps, run_steps(traj, replay, k), attn.chunks)
    if sched.injections == 0:
        raise InversionInputError(
            f"attention control {c.method} would inject nothing: its windows and blocks cover no layer of this "
            f"model at the steps that run (start_step {k} of {traj.steps}, {len(attn.layers)} attention layers); "
            "widen the windows, lower start_step, or disconnect attention_control")
    return AttentionPlan(c, source, sched, al, cols)


def _loop_negative(traj: Trajectory, choices: Choices, prompts: Prompts):
    """(the negative the loop samples with, where it comes from, notes)."""
    opt = traj.optimized_negative
    if opt is None:
        return prompts.negative, "negative", []
    how = "null-text" if opt["mode"] == "null_text" else "negative-prompt"
    if choices.null_text == "off":
        return prompts.negative, "negative", [f"null_text off: sampling with 'negative' (the trajectory's {how} "
                                              "negative is not used)"]
    neg = opt["conditioning"]
    checks.check_conditioning(neg, traj.batch_size, "the trajectory's optimised negative")
    return neg, opt["mode"], [f"negative: the trajectory's {how} negative ({len(neg)} entries)"]


def _replay(traj: Trajectory, choices: Choices, same_guidance: Optional[Callable[[Any], bool]], negative):
    """(replay, notes) for this trajectory and choice."""
    k = choices.start_step
    if traj.method != "exact":
        notes = []
        if choices.exact_replay != "auto":
            notes.append(f"exact_replay {choices.exact_replay} is for 'exact' trajectories; this one is "
                         f"{traj.method!r}: replay ddim")
        return "ddim", notes
    if choices.exact_replay != "auto":
        return choices.exact_replay, []     # an explicit bdia with no step left is refused by check_replay
    same = bool(same_guidance(negative)) if same_guidance is not None else False
    replay = "bdia" if same else "ddim"
    why = "the inversion's model, prompts and cfg" if same else "guidance differs from the inversion's"
    if same and methods.bdia_steps(traj, k) < 1:
        replay = "ddim"
        why = f"start_step {k} leaves no BDIA step: one plain DDIM step from the stored state"
    return replay, [f"exact_replay auto -> {replay} ({why})"]


def plan(traj: Trajectory, choices: Choices, prompts: Prompts,
         same_guidance: Optional[Callable[[Any], bool]] = None, attention: Optional[Attention] = None) -> Plan:
    """The regeneration plan (see the module docstring). Raises :class:`InversionInputError` for anything that
    cannot run, before any model evaluation. ``traj`` must have passed ``checks.check_trajectory``.

    ``same_guidance(negative)``: whether (model, positive, ``negative``, cfg) provably equals the guidance
    DDIM Invert recorded; called at most once, only for an exact trajectory with ``exact_replay`` auto."""
    choices = choices.check()
    B, k = traj.batch_size, choices.start_step
    checks.check_conditioning(prompts.positive, B, "positive")
    checks.check_conditioning(prompts.negative, B, "negative")
    negative, negative_from, notes = _loop_negative(traj, choices, prompts)
    warnings = []
    replay, replay_notes = _replay(traj, choices, same_guidance, negative)
    notes += replay_notes
    methods.check_replay(traj, replay, k)          # start_step in range; bdia needs an exact trajectory and a step
    drift = None
    if choices.correction == "source_drift":
        sp = prompts.source_positive if prompts.source_positive is not None else prompts.positive
        sn = prompts.source_negative if prompts.source_negative is not None else negative
        if negative_from != "negative" and prompts.source_negative is not None:
            sn = negative
            notes.append("source_negative ignored: the drift uses the trajectory's optimised negative, the one "
                         "the loop samples with (another negative would correct the guidance twice)")
        checks.check_conditioning(sp, B, "source_positive")
        checks.check_conditioning(sn, B, "source_negative")
        drift = Pair(sp, sn)
    elif attention is None and (prompts.source_positive is not None or prompts.source_negative is not None):
        notes.append("source_positive/source_negative are used only by correction source_drift and attention "
                     "control; ignored")
    opt = traj.optimized_negative
    if negative_from == "null_text" and opt.get("cfg") is not None and abs(float(opt["cfg"]) - choices.cfg) > 1e-6:
        if drift is None:
            warnings.append(f"the negative was optimised for cfg {float(opt['cfg']):g}; at cfg {choices.cfg:g} "
                            "the sampler does not retrace the pivot (use that cfg, or correction source_drift)")
        else:
            notes.append(f"the negative was optimised for cfg {float(opt['cfg']):g}; at cfg {choices.cfg:g} "
                         "source_drift still pins the source")
    steps = methods.bdia_steps(traj, k) if replay == "bdia" else traj.steps - k
    attn = None
    if attention is not None:
        attn = _attention_plan(traj, attention, prompts, _source_pair(prompts, negative, negative_from, B), replay, k)
    p = Plan(replay=replay, start_step=k, cfg=choices.cfg, guidance=Pair(prompts.positive, negative),
             negative_from=negative_from, drift=drift, steps=steps, drift_steps=steps if drift else 0,
             masked=traj.noise_mask is not None, notes=tuple(notes), warnings=tuple(warnings), attention=attn)
    inline = _inline_drift(p)
    if inline:
        p = replace(p, drift_steps=0, notes=p.notes + ("source_drift from the source branch's evaluations (no "
                                                       "extra pass)",))
    if attn is not None:
        runs = {s: A.source_chunks(attn.schedule, s, attention.chunks, inline, batched=replay == "bdia")
                for s in attn.schedule.actions}
        p = replace(p, attention=replace(attn, chunks=tuple(attention.chunks), source_runs=runs))
    return p


def _source_pair(prompts: Prompts, negative, negative_from: str, batch: int) -> Pair:
    """The source branch's guidance: source_positive with the negative the loop samples with, unless
    source_negative names another (an optimised negative is always used as is, as for the drift)."""
    sn = prompts.source_negative if (prompts.source_negative is not None and negative_from == "negative") \
        else negative
    if prompts.source_positive is not None:
        checks.check_conditioning(prompts.source_positive, batch, "source_positive")
    checks.check_conditioning(sn, batch, "source_negative")
    return Pair(prompts.source_positive, sn)


# ---------------------------------------------------------------------------------------------- running a plan
Guided = Callable[[Any, Any, Callable, int, str], Any]


def run(p: Plan, traj: Trajectory, guided: Guided, mask: Optional[torch.Tensor] = None,
        controlled: Optional[Callable] = None) -> torch.Tensor:
    """Run a plan: the source drift (if any) with ``p.drift``, then the loop with ``p.guidance``.

    ``guided(positive, negative, loop, steps, label)`` runs ``loop(model_fn, device, progress)`` with the guided
    model of that pair at ``p.cfg`` and returns its result. With attention control ``controlled(edit, source,
    loop, steps, label)`` (both :class:`Pair`) runs ``loop(model_fn, device, progress, control=...)`` instead:
    the control evaluates the source branch before every edit evaluation (``methods.sample``).
    ``mask``: the trajectory's noise mask, prepared for the latent (required when ``p.masked``). Returns the
    regenerated state (model space)."""
    if p.masked and mask is None:
        raise InversionInputError("the plan pins a masked region but no mask was given; pass the prepared "
                                  "noise_mask")
    inline = _inline_drift(p)
    drift = None
    if p.drift is not None and not inline:
        def drift_loop(model_fn, device, progress):
            return methods.source_drift(traj, model_fn, replay=p.replay, start_step=p.start_step,
                                        progress=progress, device=device)
        drift = guided(p.drift.positive, p.drift.negative, drift_loop, p.drift_steps, "source_drift")

    def loop(model_fn, device, progress, control=None):
        return methods.sample(traj, model_fn, replay=p.replay, start_step=p.start_step, drift=drift,
                              mask=mask if p.masked else None, progress=progress, device=device, control=control,
                              inline_drift=inline)
    if p.attention is not None:
        if controlled is None:
            raise InversionInputError("the plan controls attention but no controlled runner was given; pass one")
        return controlled(p.guidance, p.attention.source, loop, p.steps, "attention control")
    return guided(p.guidance.positive, p.guidance.negative, loop, p.steps, "")


def _inline_drift(p: Plan) -> bool:
    """source_drift with attention control whose source branch uses the drift's own guidance: the gap comes
    from the source branch's evaluations (no drift pass)."""
    a = p.attention
    return (a is not None and p.drift is not None and p.drift.positive is a.source.positive
            and p.drift.negative is a.source.negative)


def describe(p: Plan, traj: Trajectory) -> str:
    """Where the regeneration ran (the node's first text line and its error messages' context)."""
    gamma = float(traj.options.get("gamma", 1.0))
    return (f"replay {p.replay}, {p.steps} steps, cfg {p.cfg:g}" + (f", gamma {gamma:g}" if p.replay == "bdia"
                                                                     else ""))
