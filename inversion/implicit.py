"""The implicit inversion step: find x_t whose deterministic DDIM step back to ``s`` lands on x_s.

For inversion step ``s -> t`` solve, per sample, ``F(y) = step(y, D(y, t), t -> s) - x_s = 0`` with the
fixed-point map ``g(y) = x_s + (t - s) * (y - D(y, t)) / t`` (its fixed points are the roots of F). Strong
guidance can fold the step's map: the local solve then stalls at a point where ``|F|`` is locally minimal
although an exact preimage exists elsewhere. The solver therefore makes several *attempts* per step:

1. a local solve from ``x_s`` (its first iterate is the destination-sigma DDIM step): Anderson acceleration
   (history ``Options.anderson``) with a per-sample safeguard (an iterate that does not improve a sample's
   residual is rejected and that sample restarts from its best point with half the mixing);
2. a sample that stalls close to the tolerance (within 10 x: float32's floor rather than a fold) gets one more
   local solve from its best point with a fresh history; one that stalls far from it gets, up to
   ``Options.restarts`` attempts in all, local solves from a *jump*: the stalled point
   moved along the residual direction ``step(y) - x_s`` by -0.1, +0.1, -0.4, +0.4, -1.0, +1.0 times |x_s|
   (the denoiser's Jacobian is symmetric, so at a fold the residual points along the fold's normal: the
   preimage lies across it), then seeded random perturbations of x_s. The seed comes from the sample's own
   values and the step, so results are deterministic.

Every sample is solved on its own: a sample that meets ``tolerance`` (or stalls, or spends its budget) is
frozen; evaluations still run on the whole batch (per-latent conditioning needs it) but frozen samples are
never updated, and each sample's budget counts only the evaluations it was active for. So a sample's result
does not depend on the batch it is in.

Budget: one attempt uses at most ``Options.max_iters`` evaluations and stops early when the sample's best
residual has not shrunk by 10% in 8 evaluations; a whole inversion gives each sample at most
``2 * steps * max_iters`` evaluations (:class:`Budget`): restarts draw on what earlier steps left unused, and
every later step keeps a full first attempt. Each iteration reads its residuals on the host (one device sync
per evaluation) to decide whom to freeze.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

ModelFn = Callable[[torch.Tensor, float], torch.Tensor]

JUMPS = (-0.1, 0.1, -0.4, 0.4, -1.0, 1.0)        # along the residual direction, times |x_s|
RANDOM_SCALES = (0.7, 1.0, 1.4, 2.0, 0.5, 3.0)    # times rms(x_s) per element
PATIENCE = 8              # evaluations without a 10% improvement of the best residual = stalled
STALL_FACTOR = 0.9
NEAR = 10                 # a sample stalled within NEAR x tolerance is at its precision floor: no jumps
RUN_BUDGET_FACTOR = 2     # per sample and run: at most RUN_BUDGET_FACTOR * steps * max_iters evaluations


def rms(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).pow(2).mean(1).sqrt()


class Budget:
    """Per-sample evaluation budget of one implicit inversion.

    ``total = RUN_BUDGET_FACTOR * steps * max_iters``. At step ``i`` a sample may spend on restarts only what
    leaves ``max_iters`` for the first attempt of each later step.
    """

    def __init__(self, batch: int, steps: int, max_iters: int, device=None):
        self.steps = int(steps)
        self.max_iters = int(max_iters)
        self.total = RUN_BUDGET_FACTOR * self.steps * self.max_iters
        self.used = torch.zeros(batch, dtype=torch.long, device=device)

    def available(self, step: int) -> torch.Tensor:
        """Evaluations each sample may spend on ``step`` (0-based), leaving a full first attempt to every later
        step (always >= max_iters)."""
        reserve = (self.steps - 1 - int(step)) * self.max_iters
        return (self.total - reserve - self.used).clamp(min=0)


def _residual(y, D, xs, s, t, scale):
    back = D if s == 0 else y * (s / t) + D * (1.0 - s / t)
    return back, (rms(back - xs) / scale).to(torch.float64)


def local_solve(model_fn: ModelFn, xs: torch.Tensor, s: float, t: float, y0: torch.Tensor, active: torch.Tensor,
                limit: torch.Tensor, *, tolerance: float, damping: float = 1.0, anderson: int = 5):
    """One local attempt for the ``active`` samples (flattened [B, n] states), each for at most ``limit[b]``
    evaluations. Returns (best_y, best_D, best_res, evals_per_sample, evaluations)."""
    B = xs.shape[0]
    dev = xs.device
    scale = torch.clamp(rms(xs), min=1e-3)
    y = y0.clone()
    best_y, best_g, best_d = y.clone(), y.clone(), torch.zeros_like(y)
    best_res = torch.full((B,), float("inf"), dtype=torch.float64, device=dev)
    beta = torch.full((B, 1), float(damping), dtype=y.dtype, device=dev)
    hist_y: list = []
    hist_f: list = []
    age = torch.zeros(B, dtype=torch.long, device=dev)
    since = torch.zeros(B, dtype=torch.long, device=dev)
    ref = torch.full((B,), float("inf"), dtype=torch.float64, device=dev)
    spent = torch.zeros(B, dtype=torch.long, device=dev)
    act = active & (limit > 0)
    m = int(anderson)
    evals = 0
    while bool(act.any()):
        D = model_fn(y, t)
        evals += 1
        spent = spent + act.long()
        g = xs + (t - s) * (y - D) / t
        _, res = _residual(y, D, xs, s, t, scale)
        improved = (res < best_res) & act
        sel = improved[:, None]
        best_y = torch.where(sel, y, best_y)
        best_g = torch.where(sel, g, best_g)
        best_d = torch.where(sel, D, best_d)
        best_res = torch.where(improved, res, best_res)
        real = best_res < ref * STALL_FACTOR
        ref = torch.where(real, best_res, ref)
        since = torch.where(real, torch.zeros_like(since), since + 1)
        act = act & (best_res > tolerance) & (since < PATIENCE) & (spent < limit)
        if not bool(act.any()):
            break
        bad = (~improved)[:, None]   # rejected: back to the best point with half the mixing
        y = torch.where(bad, best_y, y)
        g = torch.where(bad, best_g, g)
        beta = torch.where(bad, beta * 0.5, beta)
        age = torch.where(bad[:, 0], torch.zeros_like(age), age)
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
            col = torch.arange(k, device=dev)[None, :]
            valid = (col >= (k + 1 - age)[:, None]).to(y.dtype)  # [B, k]
            dY = dY * valid[:, None, :]
            dF = dF * valid[:, None, :]
            A = dF.transpose(1, 2).double() @ dF.double()                          # [B, k, k]
            rhs = dF.transpose(1, 2).double() @ f.double()[:, :, None]             # [B, k, 1]
            lam = 1e-10 * A.diagonal(dim1=1, dim2=2).sum(-1).clamp(min=1e-30)[:, None, None]
            eye = torch.eye(k, dtype=torch.float64, device=dev)[None]
            A = A + lam * eye + torch.diag_embed(1.0 - valid.double())            # invalid columns solve to 0
            gam = torch.linalg.solve(A, rhs).to(y.dtype)                            # [B, k, 1]
            y_new = y_new - ((dY + beta[:, :, None] * dF) @ gam)[:, :, 0]
        y = torch.where(act[:, None], y_new, best_y)                               # frozen samples stay put
    return best_y, best_d, best_res, spent, evals


def _seed(x: torch.Tensor, r: int, t: float) -> int:
    return (int(torch.frexp(x.double().sum())[0].item() * 2**40) ^ (r * 7919 + int(t * 1e6))) & (2**62 - 1)


def solve_step(model_fn: ModelFn, x_s: torch.Tensor, s: float, t: float, opts,
               budget: Optional[torch.Tensor] = None):
    """Solve one implicit step for every sample of ``x_s`` (see the module docstring).

    ``opts``: the inversion's ``methods.Options`` (checked), passed whole: its ``tolerance``, ``max_iters``,
    ``restarts``, ``damping`` and ``anderson`` are the solver's settings.
    ``budget`` [B]: evaluations each sample may spend on this step, first attempt and restarts together
    (default ``(1 + restarts) * max_iters``).
    Returns (x_t, D(x_t, t), evaluations (batched model calls), residuals [B] float64, used [B] per sample).
    """
    tolerance, max_iters, restarts = float(opts.tolerance), int(opts.max_iters), int(opts.restarts)
    shape = x_s.shape
    B = shape[0]
    dev = x_s.device
    xs = x_s.reshape(B, -1)

    def fn(y, sigma):
        return model_fn(y.reshape(shape), sigma).reshape(B, -1).to(y.dtype)

    kw = dict(tolerance=tolerance, damping=float(opts.damping), anderson=int(opts.anderson))
    full = torch.full((B,), max_iters, dtype=torch.long, device=dev)
    cap = (budget.to(dev).long() if budget is not None else full * (1 + restarts))
    y, D, res, used, evals = local_solve(fn, xs, s, t, xs, torch.ones(B, dtype=torch.bool, device=dev),
                                         torch.minimum(full, cap), **kw)
    left = torch.minimum(cap - used, full * restarts)
    scale = torch.clamp(rms(xs), min=1e-3)
    polished = torch.zeros(B, dtype=torch.bool, device=dev)
    jumps = torch.zeros(B, dtype=torch.long, device=dev)
    for _ in range(restarts):
        near = (res > tolerance) & (res <= tolerance * NEAR) & ~polished & (left > 0)
        bad = ((res > tolerance * NEAR) & (left > 0)) | near
        if not bool(bad.any()):
            break
        back, _ = _residual(y, D, xs, s, t, scale)
        direction = back - xs
        direction = direction / direction.norm(dim=1, keepdim=True).clamp(min=1e-30)
        starts = y.clone()
        for b in torch.nonzero(bad).flatten().tolist():
            r = int(jumps[b])
            if bool(near[b]):
                continue               # close to the tolerance: polish from the best point with a fresh history
            jumps[b] += 1
            if r < len(JUMPS):
                starts[b] = y[b] + JUMPS[r] * direction[b] * xs[b].norm()
            else:
                gen = torch.Generator().manual_seed(_seed(xs[b], r, t))
                noise = torch.randn(xs[b].shape, generator=gen, dtype=torch.float32).to(dev, xs.dtype)
                starts[b] = xs[b] + noise * scale[b] * RANDOM_SCALES[(r - len(JUMPS)) % len(RANDOM_SCALES)]
        polished = polished | near
        y2, D2, r2, spent, n = local_solve(fn, xs, s, t, starts, bad, torch.minimum(left, full), **kw)
        evals += n
        used = used + spent
        left = left - spent
        better = (r2 < res) & bad
        sel = better[:, None]
        y, D, res = torch.where(sel, y2, y), torch.where(sel, D2, D), torch.where(better, r2, res)
    return y.reshape(shape), D.reshape(shape), evals, res, used
