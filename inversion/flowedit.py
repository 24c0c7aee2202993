"""FlowEdit (Kulikov et al., 2024, "FlowEdit: Inversion-Free Text-Based Editing Using Pre-Trained Flow Models";
pure torch, no ComfyUI import).

The model is seen only as two guided denoisers ``model_fn(x, sigma) -> denoised``, one per condition (the source
prompt with its CFG, the target prompt with its own), in ComfyUI's flow model space ``x = (1 - sigma) x0 +
sigma eps`` (CONST: SD3, Flux, ...), where the velocity is ``v(x, sigma) = (x - D(x, sigma)) / sigma`` (``= eps -
x0``; CFG on the denoised is CFG on the velocity, both being affine in the prediction). FlowEdit needs that
space: :func:`check_family` refuses a VP (EPS / V) model.

The algorithm (the paper's Algorithm 1, as its authors' SD3 / Flux code runs it), over a descending schedule
``t_0 > t_1 > ... > t_T = 0`` of T steps, step i going ``t_i -> t_{i+1}``, starting from ``z_fe = x_src``:

* ``i < T - n_max``: skipped (the edit starts ``n_max`` steps before the end);
* ``T - n_max <= i < T - n_min`` (FlowEdit steps): for each of ``n_avg`` noise draws N,
  ``z_src = (1 - t_i) x_src + t_i N``, ``z_tar = z_fe + z_src - x_src``, and
  ``V += v_tgt(z_tar, t_i) - v_src(z_src, t_i)``; then ``z_fe += (t_{i+1} - t_i) V / n_avg``;
* ``i >= T - n_min`` (plain steps): at the first, one more draw N puts ``x = z_fe + (1 - t_i) x_src + t_i N -
  x_src`` on the target's path; then Euler steps ``x += (t_{i+1} - t_i) v_tgt(x, t_i)``.

The result is ``z_fe`` (``n_min == 0``, the paper's SD3 / Flux setting) or ``x``. No inversion is stored: the
source enters only through the noised ``z_src``. Here ``z_fe`` is kept as ``x_src + d`` and ``z_tar`` computed as
``z_src + d`` (the same numbers in exact arithmetic): with the target condition equal to the source's, d is 0, so
``z_tar`` is ``z_src`` to the bit, V is exactly 0 and the result is ``x_src`` bit for bit.

Noise: one ``torch.Generator`` seeded with ``seed`` draws float32 standard normals of the state's shape on the
CPU (moved to the state's device), in step order: ``n_avg`` per FlowEdit step, then one for the plain part.

The source velocities depend only on ``x_src`` and the noise, not on the edit, so the work splits into two passes
that each need one condition (what a host that runs one guided model at a time needs):
:func:`source_velocities` (with the source's ``model_fn``) then :func:`edit` (with the target's);
:func:`flowedit` runs both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from .errors import InversionInputError
from .schedule import check_sampling_sigmas

ModelFn = Callable[[torch.Tensor, float], torch.Tensor]
Progress = Callable[[int, int, torch.Tensor, torch.Tensor], None]


class FlowEditError(InversionInputError):
    """Bad FlowEdit input; the message names the fix."""


@dataclass(frozen=True)
class Params:
    """FlowEdit's own parameters (the CFG of each condition lives in its ``model_fn``).

    ``n_max``: steps edited, counted back from the end of the schedule (the paper: 33 of 50 on SD3, 24 of 28 on
    Flux); ``n_min``: of those, the last ones sampled plainly with the target (0 in the paper); ``n_avg``: noise
    draws averaged per step (1 in the paper); ``seed``: of the noise."""
    n_max: int
    n_min: int = 0
    n_avg: int = 1
    seed: int = 0

    def check(self, steps: int) -> "Params":
        for name in ("n_max", "n_min", "n_avg", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise FlowEditError(f"{name} must be an integer (got {v!r}); pass a whole number")
        if not 0 <= self.n_min <= self.n_max <= steps:
            raise FlowEditError(f"FlowEdit needs 0 <= n_min <= n_max <= steps (got n_min {self.n_min}, n_max "
                                f"{self.n_max}, {steps} steps); e.g. n_max = 2/3 of the steps and n_min = 0")
        if self.n_avg < 1:
            raise FlowEditError(f"n_avg must be >= 1 (got {self.n_avg}); use 1 (the paper's setting)")
        return self


def check_family(family: str) -> None:
    """FlowEdit runs on flow models only (``family`` as the adapters read it: 'flow' or 'vp')."""
    if family != "flow":
        raise FlowEditError(f"FlowEdit needs a flow model (x = (1 - sigma) x0 + sigma noise, CONST prediction: "
                            f"SD3, Flux, ...) but this model is {family!r} (EPS / V prediction); edit it with DDIM "
                            "Invert and the Inverted-Latent Sampler instead")


def steps_of(steps: int, p: Params) -> tuple[range, range]:
    """(the FlowEdit steps, the plain steps) of a ``steps``-step schedule: step indices i (``t_i -> t_{i+1}``)."""
    return range(steps - p.n_max, steps - p.n_min), range(steps - p.n_min, steps)


def _schedule(x_src: torch.Tensor, sigmas, family: str, p: Params) -> tuple[list, Params]:
    check_family(family)
    if not isinstance(x_src, torch.Tensor) or not x_src.is_floating_point() or x_src.ndim < 2:
        raise FlowEditError("x_src must be a floating-point latent batch [B, C, ...]; pass the encoded source")
    s = check_sampling_sigmas(sigmas, "sigmas", family="flow")
    if float(s[-1]) != 0.0:
        raise FlowEditError(f"the schedule ends at sigma {float(s[-1]):.4g}, not 0; FlowEdit edits down to the "
                            "clean latent: use a full schedule (denoise 1)")
    return [float(v) for v in s.tolist()], p.check(len(s) - 1)


def _draws(x: torch.Tensor, seed: int) -> Iterator[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    while True:
        yield torch.randn(tuple(x.shape), generator=g, dtype=torch.float32).to(x.device)


def _velocity(model_fn: ModelFn, x: torch.Tensor, sigma: float) -> torch.Tensor:
    return (x - model_fn(x, sigma).to(torch.float32)) / sigma


def source_velocities(source_fn: ModelFn, x_src: torch.Tensor, sigmas, params: Params, *, family: str,
                      progress: Optional[Progress] = None) -> list:
    """The first pass: ``v_src(z_src, t_i)`` for each FlowEdit step and draw, [n_avg, *x_src.shape] per step."""
    sig, p = _schedule(x_src, sigmas, family, params)
    x = x_src.detach().to(torch.float32).clone()
    noise = _draws(x, p.seed)
    fe, _ = steps_of(len(sig) - 1, p)
    out = []
    with torch.no_grad():
        for n, i in enumerate(fe):
            t = sig[i]
            vs = []
            for _ in range(p.n_avg):
                z = (1.0 - t) * x + t * next(noise)
                vs.append(_velocity(source_fn, z, t))
            out.append(torch.stack(vs))
            if progress:
                progress(n, len(fe), z, z - t * vs[-1])
    return out


def edit(target_fn: ModelFn, x_src: torch.Tensor, sigmas, params: Params, v_src: list, *, family: str,
         progress: Optional[Progress] = None) -> torch.Tensor:
    """The second pass: the edited latent (model space, float32) from :func:`source_velocities`' ``v_src`` (made
    with the same ``x_src``, ``sigmas`` and ``params``). ``x_src`` is only read."""
    sig, p = _schedule(x_src, sigmas, family, params)
    x = x_src.detach().to(torch.float32).clone()
    noise = _draws(x, p.seed)
    fe, plain = steps_of(len(sig) - 1, p)
    if len(v_src) != len(fe) or any(tuple(v.shape) != (p.n_avg, *x.shape) for v in v_src):
        raise FlowEditError(f"v_src holds {len(v_src)} steps of shape {[tuple(v.shape) for v in v_src[:1]]} but "
                            f"this edit has {len(fe)} FlowEdit steps of {(p.n_avg, *x.shape)}; pass what "
                            "source_velocities returned for the same x_src, sigmas and params")
    total = len(fe) + len(plain)
    d = torch.zeros_like(x)
    with torch.no_grad():
        for n, i in enumerate(fe):
            t, t_next = sig[i], sig[i + 1]
            V = torch.zeros_like(x)
            for k in range(p.n_avg):
                z_src = (1.0 - t) * x + t * next(noise)
                z_tar = z_src + d
                V += _velocity(target_fn, z_tar, t) - v_src[n][k].to(x.device, torch.float32)
            d = d + (t_next - t) * (V / p.n_avg)
            if progress:
                progress(n, total, x + d, z_tar)
        if not len(plain):
            return x + d
        t = sig[plain[0]]
        y = x + d + t * (next(noise) - x)   # z_fe + (1 - t) x_src + t N - x_src
        for n, i in enumerate(plain, start=len(fe)):
            t, t_next = sig[i], sig[i + 1]
            D = target_fn(y, t).to(torch.float32)
            y = y + (t_next - t) * (y - D) / t
            if progress:
                progress(n, total, y, D)
    return y


def flowedit(source_fn: ModelFn, target_fn: ModelFn, x_src: torch.Tensor, sigmas, params: Params, *, family: str,
             progress: Optional[Progress] = None) -> torch.Tensor:
    """FlowEdit of ``x_src`` (model space) from the source condition (``source_fn``) to the target's
    (``target_fn``) along ``sigmas`` (descending to 0, ComfyUI's sampling schedule): both passes."""
    v_src = source_velocities(source_fn, x_src, sigmas, params, family=family)
    return edit(target_fn, x_src, sigmas, params, v_src, family=family, progress=progress)
