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
  sampler's step, found by a safeguarded Anderson-accelerated fixed-point iteration.
* ``exact``: BDIA-DDIM (Zhang et al., ECCV'24): D(x_i, s_i) at every interior level (the first step,
  0 -> s_1, is a ``ddim``/``destination`` step); the sampler runs the same recurrence backwards from the
  stored float64 pair, so the round trip is exact up to float64 rounding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .trajectory import Trajectory

ModelFn = Callable[[torch.Tensor, float], torch.Tensor]
Progress = Callable[[int, int, torch.Tensor, torch.Tensor], None]

METHODS = ("ddim", "implicit", "exact")
EVAL_SIGMAS = ("auto", "predicted", "destination", "current")
FIRST_EVAL_SIGMA = 1e-4


class MethodError(ValueError):
    """Bad method options; the message names the fix."""


@dataclass(frozen=True)
class Options:
    method: str = "ddim"
    eval_sigma: str = "auto"      # ddim only
    tolerance: float = 1e-6       # implicit: relative residual of the sampler step per sample
    max_iters: int = 30           # implicit: evaluations per step at most
    damping: float = 1.0          # implicit: initial mixing (halved on every failed iterate)
    anderson: int = 5             # implicit: history length (0 = plain damped fixed point)
    gamma: float = 1.0            # exact: BDIA gamma in (0, 1]
    restarts: int = 6             # implicit: extra seeded starts for a step the local solve cannot close

    def check(self) -> "Options":
        if self.method not in METHODS:
            raise MethodError(f"method must be one of {METHODS}; got {self.method!r}")
        if self.eval_sigma not in EVAL_SIGMAS:
            raise MethodError(f"eval_sigma must be one of {EVAL_SIGMAS}; got {self.eval_sigma!r}")
        if not (self.tolerance > 0 and math.isfinite(self.tolerance)):
            raise MethodError(f"tolerance must be > 0 (e.g. 1e-6); got {self.tolerance}")
        if int(self.max_iters) < 1:
            raise MethodError(f"max_iters must be >= 1 (e.g. 30); got {self.max_iters}")
        if not (0 < self.damping <= 1):
            raise MethodError(f"damping must be in (0, 1]; got {self.damping}")
        if int(self.restarts) < 0:
            raise MethodError(f"restarts must be >= 0; got {self.restarts}")
        if int(self.anderson) < 0:
            raise MethodError(f"anderson history must be >= 0; got {self.anderson}")
        if not (0 < self.gamma <= 1):
            raise MethodError(f"gamma must be in (0, 1] (1 = exact BDIA); got {self.gamma}")
        return self


# ---------------------------------------------------------------------------------------------- steps
def ddim_step(x: torch.Tensor, denoised: torch.Tensor, s: float, t: float) -> torch.Tensor:
    """Deterministic DDIM step from level ``s`` (> 0) to ``t``, in ComfyUI's sigma parameterisation."""
    if t == 0:
        return denoised.to(x.dtype).clone()
    r = t / s
    return x * r + denoised.to(x.dtype) * (1.0 - r)


def resolve_eval_sigma(mode: str, family: str) -> str:
    return "predicted" if mode == "auto" else mode


def default_input_scale(family: str) -> Callable[[float], float]:
    """c_in(sigma) of ComfyUI's calculate_input: 1/sqrt(1+sigma^2) for VP families, 1 for flow."""
    if family == "flow":
        return lambda sigma: 1.0
    return lambda sigma: 1.0 / math.sqrt(1.0 + sigma * sigma)


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


def _eval(model_fn: ModelFn, x: torch.Tensor, sigma: float) -> torch.Tensor:
    out = model_fn(x.to(torch.float32), float(sigma))
    return out.to(x.dtype)


def _rms(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).pow(2).mean(1).sqrt()


# ---------------------------------------------------------------------------------------------- implicit
def solve_step(model_fn: ModelFn, x_s: torch.Tensor, s: float, t: float, opts: Options,
               y0: Optional[torch.Tensor] = None):
    """Find x_t with ddim_step(x_t, D(x_t, t), t, s) == x_s (per sample, to opts.tolerance).

    First a local solve from ``y0`` (see :func:`_local_solve`). Where guidance bends the step's map, the
    local solve can stall on a near-fold (measured: smallest Jacobian singular value 3.5e-3) although an
    exact preimage exists elsewhere; then up to ``opts.restarts`` further solves start from x_s plus a
    seeded perturbation of growing size (the seed comes from the sample's own values and the step, so
    results are deterministic and do not depend on the batch). Each sample keeps its best point.
    Returns (x_t, D(x_t, t), evaluations, residuals).
    """
    y, D, evals, res = _local_solve(model_fn, x_s, s, t, opts, y0)
    B = x_s.shape[0]
    scale = torch.clamp(_rms(x_s), min=1e-3)
    for r in range(int(opts.restarts)):
        bad = res > opts.tolerance
        if not bool(bad.any()):
            break
        starts = []
        for b in range(B):
            if not bool(bad[b]):
                starts.append(y[b])
                continue
            seed = (int(torch.frexp(x_s[b].double().sum())[0].item() * 2**40) ^ (r * 7919 + int(t * 1e6))) & (2**62 - 1)
            gen = torch.Generator().manual_seed(seed)
            noise = torch.randn(x_s[b].shape, generator=gen, dtype=torch.float32).to(x_s.device, x_s.dtype)
            starts.append(x_s[b] + noise * scale[b] * (0.1 + 0.25 * r))
        y2, D2, n2, res2 = _local_solve(model_fn, x_s, s, t, opts, torch.stack(starts))
        evals += n2
        better = res2 < res
        sel = better.view(B, *([1] * (x_s.ndim - 1)))
        y, D, res = torch.where(sel, y2, y), torch.where(sel, D2, D), torch.where(better, res2, res)
    return y, D, evals, res


def _local_solve(model_fn: ModelFn, x_s: torch.Tensor, s: float, t: float, opts: Options,
                 y0: Optional[torch.Tensor] = None):
    """Local fixed-point solve of one implicit step (per sample, to opts.tolerance).

    Fixed-point map (freezing the model's noise estimate): g(y) = x_s + (t - s) * (y - D(y, t)) / t.
    It starts from ``y0`` (default x_s, whose first iterate is the destination-sigma DDIM step). Anderson acceleration (history
    ``opts.anderson``) on top; an iterate that does not improve a sample's residual is rejected for
    that sample, which restarts from its best point with half the mixing. So it never diverges: the
    returned point is the best one seen. Returns (x_t, D(x_t, t), evaluations, residuals).
    """
    B = x_s.shape[0]
    shape = x_s.shape
    xs = x_s.reshape(B, -1)
    scale = torch.clamp(_rms(x_s), min=1e-3)
    y = xs.clone() if y0 is None else y0.reshape(B, -1).to(xs.dtype).clone()
    best_y = y.clone()
    best_g = y.clone()
    best_d = torch.zeros_like(y)
    best_res = torch.full((B,), float("inf"), dtype=torch.float64, device=x_s.device)
    beta = torch.full((B, 1), float(opts.damping), dtype=y.dtype, device=y.device)
    hist_y: list = []
    hist_f: list = []
    age = torch.zeros(B, dtype=torch.long, device=y.device)
    m = int(opts.anderson)
    evals = 0
    for _ in range(int(opts.max_iters)):
        D = _eval(model_fn, y.reshape(shape), t).reshape(B, -1)
        evals += 1
        g = xs + (t - s) * (y - D) / t
        # residual of the *sampler* step from y: step(y, t->s) - x_s  (exact, no extra evaluation)
        back = D if s == 0 else y * (s / t) + D * (1.0 - s / t)
        res = (_rms(back - xs) / scale).to(torch.float64)
        improved = res < best_res
        if improved.any():
            sel = improved[:, None]
            best_y = torch.where(sel, y, best_y)
            best_g = torch.where(sel, g, best_g)
            best_d = torch.where(sel, D, best_d)
            best_res = torch.where(improved, res, best_res)
        if bool((best_res <= opts.tolerance).all()):
            break
        bad = ~improved
        if bad.any():  # reject: restart those samples from their best point with half the mixing
            selb = bad[:, None]
            y = torch.where(selb, best_y, y)
            g = torch.where(selb, best_g, g)
            beta = torch.where(selb, beta * 0.5, beta)
            age = torch.where(bad, torch.zeros_like(age), age)
        f = g - y
        hist_y.append(y)
        hist_f.append(f)
        age = age + 1
        if len(hist_y) > m + 1:
            hist_y.pop(0)
            hist_f.pop(0)
        k = len(hist_y) - 1  # number of difference columns
        y_new = y + beta * f
        if m > 0 and k > 0:
            dY = torch.stack([hist_y[j + 1] - hist_y[j] for j in range(k)], dim=2)  # [B, n, k]
            dF = torch.stack([hist_f[j + 1] - hist_f[j] for j in range(k)], dim=2)
            # column j is valid for a sample when both ends were recorded since its last restart
            col = torch.arange(k, device=y.device)[None, :]
            valid = (col >= (k + 1 - age)[:, None]).to(y.dtype)  # [B, k]
            dY = dY * valid[:, None, :]
            dF = dF * valid[:, None, :]
            A = dF.transpose(1, 2).double() @ dF.double()                          # [B, k, k]
            rhs = dF.transpose(1, 2).double() @ f.double()[:, :, None]             # [B, k, 1]
            lam = 1e-10 * A.diagonal(dim1=1, dim2=2).sum(-1).clamp(min=1e-30)[:, None, None]
            eye = torch.eye(k, dtype=torch.float64, device=y.device)[None]
            # invalid columns get a unit diagonal so they solve to 0
            A = A + lam * eye + torch.diag_embed(1.0 - valid.double())
            gam = torch.linalg.solve(A, rhs).to(y.dtype)                            # [B, k, 1]
            y_new = y_new - ((dY + beta[:, :, None] * dF) @ gam)[:, :, 0]
        y = y_new
    return best_y.reshape(shape), best_d.reshape(shape), evals, best_res


# ---------------------------------------------------------------------------------------------- inversion
def invert(x0: torch.Tensor, sigmas: torch.Tensor, model_fn: ModelFn, opts: Options = Options(), *,
           family: str = "vp", progress: Optional[Progress] = None,
           store_device: Optional[torch.device] = None,
           input_scale: Optional[Callable[[float], float]] = None) -> Trajectory:
    """Invert ``x0`` (model space, at level ``sigmas[0]``) along the ascending ``sigmas``.

    Never modifies ``x0``. Runs under ``torch.no_grad()``. States are kept on the compute device during
    the loop and moved to ``store_device`` once at the end (no host sync per step).
    """
    opts = opts.check()
    sig = [float(v) for v in sigmas.reshape(-1).tolist()]
    N = len(sig) - 1
    if N < 1:
        raise MethodError("the schedule has no step; use steps >= 1")
    if any(b <= a for a, b in zip(sig, sig[1:])):
        raise MethodError("inversion sigmas must be strictly increasing")
    state_dtype = torch.float64 if opts.method == "exact" else torch.float32
    cin = input_scale if input_scale is not None else default_input_scale(family)
    with torch.no_grad():
        x = x0.detach().to(state_dtype).clone()
        states = [x]
        dens = []
        eval_sig = []
        per_step = []
        replay = {}
        options = {}
        if opts.method == "ddim":
            mode = resolve_eval_sigma(opts.eval_sigma, family)
            options["eval_sigma"] = mode
            d = None
            for i in range(N):
                x, D, se, d = _explicit_step(model_fn, x, sig[i], sig[i + 1], mode, cin, d)
                states.append(x); dens.append(D); eval_sig.append(se); per_step.append(1)
                if progress:
                    progress(i, N, x, D)
        elif opts.method == "implicit":
            options.update(tolerance=opts.tolerance, max_iters=int(opts.max_iters), damping=opts.damping,
                           anderson=int(opts.anderson), restarts=int(opts.restarts))
            worst = 0.0
            for i in range(N):
                s, t = sig[i], sig[i + 1]
                # start from x_s (first iterate = the destination step): starting from the previous slope's
                # prediction saves ~0.2 evaluations/step but lands on another branch where a step folds
                # (flow, CFG 7.5, 10 steps: 0.75 instead of 7.5e-3)
                x, D, n, res = solve_step(model_fn, x, s, t, opts)
                worst = max(worst, float(res.max()))
                states.append(x); dens.append(D); eval_sig.append(t); per_step.append(n)
                if progress:
                    progress(i, N, x, D)
            options["max_residual"] = worst
        else:  # exact: BDIA
            gamma = float(opts.gamma)
            mode = resolve_eval_sigma(opts.eval_sigma, family)
            mode = "destination" if mode == "predicted" else mode
            options.update(gamma=gamma, first_step="ddim/" + mode)
            x, D, se, _ = _explicit_step(model_fn, x, sig[0], sig[1], mode, cin)
            states.append(x); dens.append(D); eval_sig.append(se); per_step.append(1)
            if progress:
                progress(0, N, x, D)
            for i in range(1, N):
                xm, xi = states[i - 1], states[i]
                D = _eval(model_fn, xi, sig[i])
                up = ddim_step(xi, D, sig[i], sig[i + 1])
                down = ddim_step(xi, D, sig[i], sig[i - 1])
                x = up + (xm - down) / gamma
                states.append(x); dens.append(D); eval_sig.append(sig[i]); per_step.append(1)
                if progress:
                    progress(i, N, x, D)
            replay["pair"] = torch.stack([states[N], states[N - 1]])  # float64, bit-exact start
        dev = store_device if store_device is not None else x0.device
        traj = Trajectory(
            sigmas=torch.tensor(sig, dtype=torch.float32),
            states=torch.stack(states).to(torch.float32).to(dev),
            denoised=torch.stack(dens).to(torch.float32).to(dev),
            eval_sigmas=torch.tensor(eval_sig, dtype=torch.float64),
            method=opts.method, cfg=1.0, nfe=int(sum(per_step)), nfe_per_step=tuple(per_step),
            options=options, replay={k: v.to(dev) for k, v in replay.items()}, family=family,
        )
    return traj


# ---------------------------------------------------------------------------------------------- sampling
def _check_start(traj: Trajectory, start_step: int) -> int:
    N = traj.steps
    if not (0 <= int(start_step) < N):
        raise MethodError(f"start_step must be in [0, {N - 1}] for a trajectory of {N} steps; got {start_step}")
    return N - int(start_step)


def _sampler_step(method: str, gamma: float, x_hi, x_cur, D, sig, i):
    """One paired-sampler step producing the state at level i-1 from the state at i (and i+1 for exact)."""
    down = ddim_step(x_cur, D, sig[i], sig[i - 1])
    if method != "exact":
        return down
    return down + gamma * (x_hi - ddim_step(x_cur, D, sig[i], sig[i + 1]))


def source_drift(traj: Trajectory, source_fn: ModelFn, *, start_step: int = 0,
                 progress: Optional[Progress] = None, device: Optional[torch.device] = None) -> dict:
    """The *source_drift* correction (the Direct-Inversion idea, without attention sharing).

    For every sampling step that produces level j-1, the gap between the stored inversion state and the
    paired sampler step re-run from the stored states with ``source_fn`` (the source prompt/CFG):
    ``gap[j-1] = states[j-1] - step_source(states[j] (, states[j+1]))``. Adding it to the regeneration
    (``sample(..., drift=gap)``) pins everything the source prompt explains: with the source prompt the
    stored states are reproduced exactly whatever the CFG; with another prompt the result moves by the
    accumulated difference of the two prompts' predictions. Costs one (guided) evaluation per step.
    """
    j0 = _check_start(traj, start_step)
    exact = traj.method == "exact"
    dtype = torch.float64 if exact else torch.float32
    dev = device if device is not None else traj.states.device
    sig = [float(v) for v in traj.sigmas.tolist()]
    gamma = float(traj.options.get("gamma", 1.0))
    gaps = {}
    with torch.no_grad():
        levels = range(j0, 0, -1) if not exact else range(j0 - 1, 0, -1)
        total = len(levels)
        for n, i in enumerate(levels):
            x_cur = traj.states[i].to(dev, dtype)
            x_hi = traj.states[i + 1].to(dev, dtype) if exact else None
            D = _eval(source_fn, x_cur, sig[i])
            gaps[i - 1] = traj.states[i - 1].to(dev, dtype) - _sampler_step(traj.method, gamma, x_hi, x_cur, D, sig, i)
            if progress:
                progress(n, total, x_cur, D)
    return gaps


def sample(traj: Trajectory, model_fn: ModelFn, *, start_step: int = 0, drift: Optional[dict] = None,
           mask: Optional[torch.Tensor] = None, progress: Optional[Progress] = None,
           device: Optional[torch.device] = None) -> torch.Tensor:
    """Regenerate from a trajectory with its paired sampler; returns the state at ``traj.sigmas[0]``.

    * ``ddim`` / ``implicit`` trajectories: the deterministic DDIM sampler (ComfyUI's euler/ddim) on the
      reversed schedule, one evaluation per step at the current sigma.
    * ``exact``: the BDIA recurrence run backwards from the stored float64 pair (x_N, x_N-1).
    * ``start_step`` k skips the first k sampling steps: sampling starts from ``traj.states[N-k]``
      (for exact, from the stored pair at that level), so a later start keeps more of the source.
    * ``drift``: gaps from :func:`source_drift`, added after each step.
    * ``mask`` (broadcastable to a state, 1 = regenerate): outside it the state is pinned to the stored
      inversion state at every level, so the unmasked region ends exactly at the source.
    """
    j0 = _check_start(traj, start_step)
    dev = device if device is not None else traj.states.device
    exact = traj.method == "exact"
    dtype = torch.float64 if exact else torch.float32
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

        if exact:
            if start_step == 0 and "pair" in traj.replay:
                x_hi, x_cur = traj.replay["pair"][0].to(dev, dtype), traj.replay["pair"][1].to(dev, dtype)
            else:
                x_hi, x_cur = stored(j0), stored(j0 - 1)
            levels = range(j0 - 1, 0, -1)
        else:
            x_hi, x_cur = None, stored(j0)
            levels = range(j0, 0, -1)
        total = len(levels)
        for n, i in enumerate(levels):
            D = _eval(model_fn, x_cur, sig[i])
            x_new = finish(_sampler_step(traj.method, gamma, x_hi, x_cur, D, sig, i), i - 1)
            x_hi, x_cur = x_cur, x_new
            if progress:
                progress(n, total, x_cur, D)
        return x_cur.to(torch.float32)
