"""Inversion methods and their paired samplers (pure torch; no ComfyUI import).

The model is seen only through ``model_fn(x, sigma) -> denoised``: ``x`` a float32 [B, ...] state in
model space, ``sigma`` a python float, ``denoised`` the (guided) x0 estimate. That is exactly what
ComfyUI's samplers see, for every model family.

The DDIM step in ComfyUI's sigma parameterisation
-------------------------------------------------
For EPS / V-prediction models the model-space state is ``x = x0 + sigma*eps``; for CONST (flow:
SD3, Flux) it is ``x = (1-sigma)*x0 + sigma*eps``. The deterministic DDIM (eta=0) step from ``s`` to ``t``
keeps the predicted noise and moves the predicted x0 to the new level. In both families it reduces to the
same update (the family is already inside ``denoised``)::

    x_t = (t/s) * x_s + (1 - t/s) * D(x_s, s)        ( = D(x_s, s) when t == 0 )

i.e. Euler in sigma on dx/dsigma = (x - D)/sigma, which is what ComfyUI's ``euler`` / ``ddim`` samplers do.
Nothing divides by (1 - sigma), so flow inversion ends exactly at sigma = 1 with finite values.

Which sigma each evaluation uses (inversion step ``i`` goes ``s = sigmas[i] -> t = sigmas[i+1]``).
The exact inverse of the sampler's step needs D(x_t, t) at the unknown x_t; the explicit variants differ in
where they evaluate instead:
* ``ddim``/``predicted`` (the default, ``auto``): D(x_p, t) at x_p = x_s + (t - s) * d_prev, the state the
  previous step's slope d_prev = (x - D)/sigma predicts (O(h^2) from x_t instead of O(h)); the first step is
  a ``destination`` step. Still one evaluation per step (the previous one is reused, as FireFlow reuses its
  velocity). On the oracle at CFG 1 it cuts the round-trip error 7-10x at 50 steps (EPS 0.0053 vs 0.035,
  flow 0.0023 vs 0.025) and 1.4-1.8x at 10; at high inversion CFG the guided map can fold and every explicit
  variant can fail on some draws (bench/RESULTS.md).
* ``ddim``/``destination``: the network sees the *same input tensor* it would see
  at the current level, told it is at the destination level: D(c * x_s, t) with c = c_in(s)/c_in(t)
  (c_in = ComfyUI's ``calculate_input`` scale: 1/sqrt(1+sigma^2) for EPS/V, 1 for flow). This is exactly
  prompt-to-prompt/null-text's ``next_step`` (eps_theta(z_{t-1}, t)) written in ComfyUI's parameterisation.
  On the analytic oracle it beats the current-sigma order for every family (cycle factor on N(0,I) data,
  SD schedule, 50 leading steps: 0.9992 vs 0.9479; see tests/unit/test_methods.py).
  It is also the first step of ``predicted`` and of ``exact``.
* ``ddim``/``current``: D(x_s, s) -- Song et al.'s ordering; for ``s == 0`` (a clean source) the model is
  evaluated at ``min(FIRST_EVAL_SIGMA, t/2)`` (as ComfyUI's FlipSigmas does with 1e-4).
* ``implicit``: D(x_t, t) at the solution x_t of ``step(x_t, t -> s) == x_s``: the exact inverse of the
  sampler's step, found per sample by the attempts of ``inversion/implicit.py`` (a safeguarded
  Anderson-accelerated fixed point, then jumps across a fold and seeded restarts, within a budget).
* ``exact``: BDIA-DDIM (Zhang et al., ECCV'24): D(x_i, s_i) at every interior level (the first step,
  0 -> s_1, is a ``ddim``/``destination`` step); the sampler runs the same recurrence backwards from the
  stored float64 pair, so the round trip is exact up to float64 rounding.

Layout: one function per method (:func:`invert_ddim`, :func:`invert_implicit`, :func:`invert_exact`) writes
into a :class:`Recorder`; :func:`invert` dispatches and builds the :class:`~inversion.trajectory.Trajectory`.
:func:`sample` replays a trajectory with ``replay="ddim"`` (the plain DDIM sampler) or ``"bdia"`` (the exact
recurrence, exact trajectories only); the trajectory itself is never rewritten.

Host syncs: ``ddim`` and ``exact`` never read a device value inside the loop (states move to the storage
device once, at the end); ``implicit`` reads its per-sample residuals once per evaluation to freeze the
samples that are done.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import implicit as _implicit
from .errors import InversionInputError
from .trajectory import Trajectory

ModelFn = Callable[[torch.Tensor, float], torch.Tensor]
Progress = Callable[[int, int, torch.Tensor, torch.Tensor], None]

METHODS = ("ddim", "implicit", "exact")
EVAL_SIGMAS = ("auto", "predicted", "destination", "current")
REPLAYS = ("ddim", "bdia")
FIRST_EVAL_SIGMA = 1e-4


class MethodError(InversionInputError):
    """Bad method options; the message names the fix."""


@dataclass(frozen=True)
class Options:
    method: str = "ddim"
    eval_sigma: str = "auto"      # ddim (and exact's first step)
    tolerance: float = 1e-6       # implicit: relative residual of the sampler step per sample
    max_iters: int = 30           # implicit: evaluations of one solve attempt
    damping: float = 1.0          # implicit: initial mixing (halved on every failed iterate)
    anderson: int = 5             # implicit: history length (0 = plain damped fixed point)
    gamma: float = 1.0            # exact: BDIA gamma in (0, 1]
    restarts: int = 6             # implicit: extra attempts for a step the first solve cannot close

    def check(self) -> "Options":
        if self.method not in METHODS:
            raise MethodError(f"method {self.method!r} is unknown; use one of {', '.join(METHODS)}")
        if self.eval_sigma not in EVAL_SIGMAS:
            raise MethodError(f"eval_sigma {self.eval_sigma!r} is unknown; use one of {', '.join(EVAL_SIGMAS)}")
        if not (self.tolerance > 0 and math.isfinite(self.tolerance)):
            raise MethodError(f"tolerance must be a number > 0 (got {self.tolerance}); use e.g. 1e-6")
        if not int(self.max_iters) >= 1:
            raise MethodError(f"max_iters must be >= 1 (got {self.max_iters}); use e.g. 30")
        if not (0 < self.damping <= 1):
            raise MethodError(f"damping must be in (0, 1] (got {self.damping}); use e.g. 1.0")
        if not int(self.restarts) >= 0:
            raise MethodError(f"restarts must be >= 0 (got {self.restarts}); use e.g. 6")
        if not int(self.anderson) >= 0:
            raise MethodError(f"anderson history must be >= 0 (got {self.anderson}); use e.g. 5")
        if not (0 < self.gamma <= 1):
            raise MethodError(f"gamma must be in (0, 1] (got {self.gamma}); use 1.0 (exact BDIA)")
        return self


# ---------------------------------------------------------------------------------------------- steps
def ddim_step(x: torch.Tensor, denoised: torch.Tensor, s: float, t: float) -> torch.Tensor:
    """Deterministic DDIM step from level ``s`` (> 0) to ``t``, in ComfyUI's sigma parameterisation."""
    if t == 0:
        return denoised.to(x.dtype).clone()
    r = t / s
    return x * r + denoised.to(x.dtype) * (1.0 - r)


def resolve_eval_sigma(mode: str) -> str:
    return "predicted" if mode == "auto" else mode


def default_input_scale(family: str) -> Callable[[float], float]:
    """c_in(sigma) of ComfyUI's calculate_input: 1/sqrt(1+sigma^2) for VP families, 1 for flow."""
    if family == "flow":
        return lambda sigma: 1.0
    return lambda sigma: 1.0 / math.sqrt(1.0 + sigma * sigma)


def _eval(model_fn: ModelFn, x: torch.Tensor, sigma: float) -> torch.Tensor:
    out = model_fn(x.to(torch.float32), float(sigma))
    return out.to(x.dtype)


def _explicit_step(model_fn: ModelFn, x: torch.Tensor, s: float, t: float, mode: str, cin, d_prev=None):
    """One explicit DDIM inversion step s -> t; returns (x_t, denoised, eval_sigma, slope d used)."""
    if mode == "predicted" and d_prev is not None:
        xp = x + (t - s) * d_prev            # where the previous slope says x_t is (O(h^2) off)
        D = _eval(model_fn, xp, t)
        d = (xp - D) / t
        return x + (t - s) * d, D, t, d
    if mode in ("destination", "predicted"):
        y = x * (cin(s) / cin(t))
        D = _eval(model_fn, y, t)
        d = (y - D) / t
        return x + (t - s) * d, D, t, d
    se = s if s > 0 else min(FIRST_EVAL_SIGMA, t / 2)
    D = _eval(model_fn, x, se)
    d = (x - D) / se
    return x + (t - s) * d, D, se, d


# ---------------------------------------------------------------------------------------------- recording
class Recorder:
    """What an inversion produced, step by step: the state after each step, the x0 estimate and sigma of the
    step's (final) evaluation and its evaluation count. Reports progress after every step."""

    def __init__(self, x0: torch.Tensor, sigmas: list, progress: Optional[Progress] = None):
        self.sigmas = sigmas
        self.steps = len(sigmas) - 1
        self.states = [x0]
        self.denoised: list = []
        self.eval_sigmas: list = []
        self.nfe: list = []
        self.progress = progress

    @property
    def x(self) -> torch.Tensor:
        return self.states[-1]

    def record(self, x: torch.Tensor, D: torch.Tensor, eval_sigma: float, nfe: int = 1) -> None:
        i = len(self.denoised)
        self.states.append(x)
        self.denoised.append(D)
        self.eval_sigmas.append(float(eval_sigma))
        self.nfe.append(int(nfe))
        if self.progress:
            self.progress(i, self.steps, x, D)

    def build(self, method: str, family: str, options: dict, replay: dict, store_device) -> Trajectory:
        dev = store_device if store_device is not None else self.states[0].device
        return Trajectory(
            sigmas=torch.tensor(self.sigmas, dtype=torch.float32),
            states=torch.stack(self.states).to(torch.float32).to(dev),
            denoised=torch.stack(self.denoised).to(torch.float32).to(dev),
            eval_sigmas=torch.tensor(self.eval_sigmas, dtype=torch.float64),
            method=method, cfg=1.0, nfe=int(sum(self.nfe)), nfe_per_step=tuple(self.nfe),
            options=options, replay={k: v.to(dev) for k, v in replay.items()}, family=family,
        )


# ---------------------------------------------------------------------------------------------- the methods
def invert_ddim(rec: Recorder, model_fn: ModelFn, opts: Options, cin) -> tuple:
    """Explicit DDIM inversion, one evaluation per step, at the sigma ``opts.eval_sigma`` names."""
    mode = resolve_eval_sigma(opts.eval_sigma)
    sig = rec.sigmas
    d = None
    for i in range(rec.steps):
        x, D, se, d = _explicit_step(model_fn, rec.x, sig[i], sig[i + 1], mode, cin, d)
        rec.record(x, D, se)
    return {"eval_sigma": mode}, {}


def invert_implicit(rec: Recorder, model_fn: ModelFn, opts: Options, cin=None) -> tuple:
    """The exact inverse of every sampler step, solved per sample within a budget (``inversion/implicit.py``)."""
    sig = rec.sigmas
    budget = _implicit.Budget(rec.x.shape[0], rec.steps, int(opts.max_iters), device=rec.x.device)
    worst = torch.zeros(rec.x.shape[0], dtype=torch.float64, device=rec.x.device)
    above, unsolved = [], []
    for i in range(rec.steps):
        # start from x_s (first iterate = the destination step): starting from the previous slope's
        # prediction saves ~0.2 evaluations/step but lands on another branch where a step folds
        x, D, n, res, used = _implicit.solve_step(model_fn, rec.x, sig[i], sig[i + 1], opts,
                                                  budget=budget.available(i))
        budget.used += used
        worst = torch.maximum(worst, res)
        above.append(res > opts.tolerance)
        unsolved.append(res > opts.tolerance * _implicit.NEAR)
        rec.record(x, D, sig[i + 1], n)
    steps_above = int(torch.stack(above).any(1).sum())
    steps_unsolved = int(torch.stack(unsolved).any(1).sum())
    return {"tolerance": opts.tolerance, "max_iters": int(opts.max_iters), "damping": opts.damping,
            "anderson": int(opts.anderson), "restarts": int(opts.restarts), "max_residual": float(worst.max()),
            "steps_above_tolerance": steps_above, "steps_unsolved": steps_unsolved,
            "budget_per_sample": budget.total,
            "evaluations_per_sample": [int(v) for v in budget.used.tolist()]}, {}


def invert_exact(rec: Recorder, model_fn: ModelFn, opts: Options, cin) -> tuple:
    """BDIA-DDIM: a ddim first step, then x_{i+1} = step(x_i -> s_{i+1}) + (x_{i-1} - step(x_i -> s_{i-1})) / gamma
    in float64; the paired sampler runs the recurrence backwards from the stored pair (x_N, x_{N-1})."""
    gamma = float(opts.gamma)
    mode = resolve_eval_sigma(opts.eval_sigma)
    mode = "destination" if mode == "predicted" else mode
    sig = rec.sigmas
    x, D, se, _ = _explicit_step(model_fn, rec.x, sig[0], sig[1], mode, cin)
    rec.record(x, D, se)
    for i in range(1, rec.steps):
        xm, xi = rec.states[i - 1], rec.states[i]
        D = _eval(model_fn, xi, sig[i])
        up = ddim_step(xi, D, sig[i], sig[i + 1])
        down = ddim_step(xi, D, sig[i], sig[i - 1])
        rec.record(up + (xm - down) / gamma, D, sig[i])
    pair = torch.stack([rec.states[-1], rec.states[-2]])  # float64, bit-exact start
    return {"gamma": gamma, "first_step": "ddim/" + mode}, {"pair": pair}


INVERTERS = {"ddim": invert_ddim, "implicit": invert_implicit, "exact": invert_exact}


def invert(x0: torch.Tensor, sigmas: torch.Tensor, model_fn: ModelFn, opts: Options = Options(), *,
           family: str = "vp", progress: Optional[Progress] = None,
           store_device: Optional[torch.device] = None,
           input_scale: Optional[Callable[[float], float]] = None) -> Trajectory:
    """Invert ``x0`` (model space, at level ``sigmas[0]``) along the ascending ``sigmas`` with ``opts.method``.

    Never modifies ``x0``. Runs under ``torch.no_grad()``. States stay on the compute device during the loop
    and move to ``store_device`` once at the end.
    """
    opts = opts.check()
    sig = [float(v) for v in sigmas.reshape(-1).tolist()]
    if len(sig) < 2:
        raise MethodError("the schedule has no step; use steps >= 1")
    if any(b <= a for a, b in zip(sig, sig[1:], strict=False)):
        raise MethodError("inversion sigmas must be strictly increasing; pass the sampling schedule reversed")
    dtype = torch.float64 if opts.method == "exact" else torch.float32
    cin = input_scale if input_scale is not None else default_input_scale(family)
    with torch.no_grad():
        rec = Recorder(x0.detach().to(dtype).clone(), sig, progress)
        options, replay = INVERTERS[opts.method](rec, model_fn, opts, cin)
        return rec.build(opts.method, family, options, replay, store_device)


# ---------------------------------------------------------------------------------------------- sampling
def default_replay(traj: Trajectory) -> str:
    return "bdia" if traj.method == "exact" else "ddim"


def bdia_steps(traj: Trajectory, start_step: int = 0) -> int:
    """Model evaluations a BDIA replay from ``start_step`` runs (it starts from the stored pair one level
    below the DDIM start, so it has one step less)."""
    return traj.steps - int(start_step) - 1


def check_replay(traj: Trajectory, replay: Optional[str], start_step: int) -> tuple:
    """(first level, replay) of a regeneration from ``start_step``; raises when it cannot run."""
    N = traj.steps
    if not (0 <= int(start_step) < N):
        raise MethodError(f"start_step must be in [0, {N - 1}] for this {N}-step trajectory (got {start_step}); "
                          "choose a step inside the trajectory")
    replay = replay or default_replay(traj)
    if replay not in REPLAYS:
        raise MethodError(f"replay {replay!r} is unknown; use one of {', '.join(REPLAYS)}")
    if replay == "bdia":
        if traj.method != "exact":
            raise MethodError(f"replay 'bdia' needs an 'exact' trajectory (this one is {traj.method!r}); use replay "
                              "'ddim'")
        if bdia_steps(traj, start_step) < 1:
            raise MethodError(f"a BDIA replay from start_step {start_step} of {N} has no step left to run (it would "
                              f"return the source unchanged); use start_step <= {N - 2} or the ddim replay")
    return N - int(start_step), replay


def _sampler_step(replay: str, gamma: float, x_hi, x_cur, D, sig, i):
    """One paired-sampler step producing the state at level i-1 from the state at i (and i+1 for bdia)."""
    down = ddim_step(x_cur, D, sig[i], sig[i - 1])
    if replay != "bdia":
        return down
    return down + gamma * (x_hi - ddim_step(x_cur, D, sig[i], sig[i + 1]))


def source_drift(traj: Trajectory, source_fn: ModelFn, *, replay: Optional[str] = None, start_step: int = 0,
                 progress: Optional[Progress] = None, device: Optional[torch.device] = None) -> dict:
    """The *source_drift* correction (the Direct-Inversion idea, without attention sharing).

    For every sampling step that produces level j-1, the gap between the stored inversion state and the
    paired sampler step re-run from the stored states with ``source_fn`` (the source prompt/CFG):
    ``gap[j-1] = states[j-1] - step_source(states[j] (, states[j+1]))``. Adding it to the regeneration
    (``sample(..., drift=gap)``) pins everything the source prompt explains: with the source prompt the
    stored states are reproduced exactly whatever the CFG; with another prompt the result moves by the
    accumulated difference of the two prompts' predictions. Costs one (guided) evaluation per step.
    """
    j0, replay = check_replay(traj, replay, start_step)
    bdia = replay == "bdia"
    dtype = torch.float64 if bdia else torch.float32
    dev = device if device is not None else traj.states.device
    sig = [float(v) for v in traj.sigmas.tolist()]
    gamma = float(traj.options.get("gamma", 1.0))
    gaps = {}
    with torch.no_grad():
        levels = range(j0 - 1, 0, -1) if bdia else range(j0, 0, -1)
        total = len(levels)
        for n, i in enumerate(levels):
            x_cur = traj.states[i].to(dev, dtype)
            x_hi = traj.states[i + 1].to(dev, dtype) if bdia else None
            D = _eval(source_fn, x_cur, sig[i])
            gaps[i - 1] = traj.states[i - 1].to(dev, dtype) - _sampler_step(replay, gamma, x_hi, x_cur, D, sig, i)
            if progress:
                progress(n, total, x_cur, D)
    return gaps


def sample(traj: Trajectory, model_fn: ModelFn, *, replay: Optional[str] = None, start_step: int = 0,
           drift: Optional[dict] = None, mask: Optional[torch.Tensor] = None, progress: Optional[Progress] = None,
           device: Optional[torch.device] = None, control=None, inline_drift: bool = False) -> torch.Tensor:
    """Regenerate from a trajectory; returns the state at ``traj.sigmas[0]``. The trajectory is only read.

    * ``replay="ddim"`` (default for ddim/implicit trajectories): the deterministic DDIM sampler (ComfyUI's
      euler/ddim) on the reversed schedule, one evaluation per step at the current sigma.
    * ``replay="bdia"`` (default for exact trajectories): the BDIA recurrence run backwards from the stored
      float64 pair (x_N, x_N-1); for an exact trajectory ``"ddim"`` runs plain DDIM from its inverted noise.
    * ``start_step`` k skips the first k sampling steps: sampling starts from ``traj.states[N-k]``
      (bdia: from the stored pair at that level), so a later start keeps more of the source.
    * ``drift``: gaps from :func:`source_drift` (made with the same replay), added after each step.
    * ``mask`` (broadcastable to a state, 1 = regenerate): outside it the state is pinned to the stored
      inversion state at every level, so the unmasked region ends exactly at the source.
    * ``control`` (attention control, ``inversion/attention.py``): an object with ``source(x, sigma, step)`` and
      ``after(step, x_new, x_source)``. Before every evaluation of ``model_fn`` (the edit branch, which injects)
      ``control.source`` evaluates the source branch on the *stored* state of that level (it records); after
      the step ``control.after`` returns the state to go on with (a local blend against the stored state of the
      next level) and checks what happened. ``step`` is the sampling step of the full schedule (N - level).
    * ``inline_drift`` (with ``control``): the source_drift gap of each step from the source branch's own
      evaluation (``control.source`` returns it): the correction at no extra evaluation, equal to
      :func:`source_drift` made with the source branch's guidance.
    """
    j0, replay = check_replay(traj, replay, start_step)
    bdia = replay == "bdia"
    dev = device if device is not None else traj.states.device
    dtype = torch.float64 if bdia else torch.float32
    sig = [float(v) for v in traj.sigmas.tolist()]
    gamma = float(traj.options.get("gamma", 1.0))
    with torch.no_grad():
        S = traj.states

        def stored(j):
            return S[j].to(dev, dtype)

        m = None if mask is None else mask.to(dev, dtype)

        def finish(x, j):
            if drift is not None and j in drift:
                x = x + drift[j].to(dev, dtype)
            return x if m is None else x * m + stored(j) * (1 - m)

        if bdia:
            if int(start_step) == 0 and "pair" in traj.replay:
                x_hi, x_cur = traj.replay["pair"][0].to(dev, dtype), traj.replay["pair"][1].to(dev, dtype)
            else:
                x_hi, x_cur = stored(j0), stored(j0 - 1)
            levels = range(j0 - 1, 0, -1)
        else:
            x_hi, x_cur = None, stored(j0)
            levels = range(j0, 0, -1)
        total = len(levels)
        for n, i in enumerate(levels):
            if control is not None:
                D_src = control.source(stored(i).to(torch.float32), sig[i], traj.steps - i)
            D = _eval(model_fn, x_cur, sig[i])
            x_new = _sampler_step(replay, gamma, x_hi, x_cur, D, sig, i)
            if inline_drift:
                x_new = x_new + stored(i - 1) - _sampler_step(replay, gamma, stored(i + 1) if bdia else None,
                                                              stored(i), D_src.to(dtype), sig, i)
            x_new = finish(x_new, i - 1)
            if control is not None:
                x_new = control.after(traj.steps - i, x_new, stored(i - 1))
            x_hi, x_cur = x_cur, x_new
            if progress:
                progress(n, total, x_cur, D)
        return x_cur.to(torch.float32)
