"""Sigma schedules: validation, partial ranges and the inversion order.

A *sampling* schedule is what ComfyUI's schedulers return: 1-D, descending, usually ending at 0.
Inversion walks the same sigmas in ascending order, so regenerating with the sampling schedule retraces
exactly the inverted steps: no step skipped, none duplicated.

Every schedule, whether a user connected it or a scheduler made it, passes :func:`check_sampling_sigmas`;
``source`` only changes the fix the message names.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .errors import InversionInputError

FLOW_SIGMA_MAX = 1.0
_FLOW_SLACK = 1e-5   # float32 rounding of a flow table's last value


class ScheduleError(InversionInputError):
    """A schedule that cannot be inverted; the message names the fix."""


def check_sampling_sigmas(sigmas, name: str = "sigmas", *, source: Optional[str] = None,
                          family: Optional[str] = None) -> torch.Tensor:
    """Validate a descending sampling schedule and return it as a float32 CPU tensor (a copy).

    ``source`` describes a schedule the node computed itself (e.g. "the kl_optimal scheduler at 1 step"):
    its fix is another scheduler or more steps. ``family`` "flow" also requires every sigma <= 1.
    """
    what = source or name
    fix = ("choose another scheduler or more steps" if source else
           "connect a scheduler node's output (e.g. BasicScheduler) unmodified")
    if not isinstance(sigmas, torch.Tensor):
        raise ScheduleError(f"{name} is not a SIGMAS tensor (got {type(sigmas).__name__}); "
                            "connect a scheduler node such as BasicScheduler")
    if sigmas.is_complex():
        raise ScheduleError(f"{what} is a complex tensor; {fix}")
    s = sigmas.detach().to("cpu", torch.float32).reshape(-1).clone()
    if s.numel() < 2:
        raise ScheduleError(f"{what} has {s.numel()} value(s) but one step needs at least 2; "
                            + ("use more steps" if source else "use steps >= 1"))
    bad = ~torch.isfinite(s)
    if bad.any():
        raise ScheduleError(f"{what} contains NaN or Inf ({int(bad.sum())} of {s.numel()} values); {fix}")
    if (s < 0).any():
        raise ScheduleError(f"{what} contains negative values (min {float(s.min()):.4g}); sigmas must be >= 0: {fix}")
    if not (s[:-1] > s[1:]).all():
        if (s[:-1] < s[1:]).all():
            raise ScheduleError(
                f"{what} is ascending; give the sampling schedule (descending, as BasicScheduler emits) "
                "and do not insert FlipSigmas: DDIM Invert reverses it itself")
        raise ScheduleError(
            f"{what} must be strictly decreasing (no repeated or out-of-order values) so that its reversal "
            f"is strictly increasing; " + ("choose another scheduler or step count" if source
                                           else "remove duplicated sigmas"))
    if family == "flow" and float(s.max()) > FLOW_SIGMA_MAX + _FLOW_SLACK:
        raise ScheduleError(
            f"{what} reaches sigma {float(s.max()):.7g} but a flow model's noise level ends at 1 "
            "(x = (1-sigma) x0 + sigma noise); use a schedule made for this model (BasicScheduler with this model)")
    return s


def segment(sigmas: torch.Tensor, start_step: int = 0, end_step: int = 10000) -> torch.Tensor:
    """The part of a sampling schedule that KSamplerAdvanced's start_at_step/end_at_step would run.

    With ``steps = len(sigmas) - 1``: sampling from ``start_step`` to ``end_step`` uses
    ``sigmas[start_step : end_step + 1]``. Inverting that segment lands at ``sigmas[start_step]``.
    """
    steps = int(sigmas.shape[0]) - 1
    if start_step < 0:
        raise ScheduleError(f"start_step must be >= 0 (got {start_step}); set it to 0 or more")
    end = min(int(end_step), steps)
    if end < 0:
        raise ScheduleError(f"end_step must be >= 0 (got {end_step}); set it to 1 or more")
    if start_step >= end:
        raise ScheduleError(
            f"start_step ({start_step}) must be smaller than end_step ({min(end_step, steps)}, capped at "
            f"steps={steps}); lower start_step or raise end_step")
    return sigmas[start_step:end + 1].clone()


def inversion_order(sampling_sigmas: torch.Tensor) -> torch.Tensor:
    """Ascending schedule for inversion (the exact reverse of the sampling schedule)."""
    return sampling_sigmas.flip(0).clone()


def _percent_for_sigma(percent_to_sigma: Callable[[float], float], sigma: float) -> float:
    """The percent p with ``percent_to_sigma(p) == sigma`` (bisection: percent_to_sigma is decreasing)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if percent_to_sigma(mid) > sigma:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def step_ranges(percent_to_sigma: Callable[[float], float], sampling_sigmas: torch.Tensor) -> list:
    """``[(start_percent, end_percent)]`` per sampling step of the descending ``sampling_sigmas``: consecutive
    ranges that tile [0, 1] (no gap, no overlap but their shared ends), each containing its own step's
    evaluation sigma strictly inside, so ComfyUI's ``timestep_start``/``timestep_end`` test selects exactly one
    entry per evaluation. The boundary between two steps sits at the geometric mean of their sigmas.

    ``percent_to_sigma`` is the model's (``model_sampling.percent_to_sigma``). A schedule whose steps the model's
    percent scale cannot separate (e.g. two sigmas above the model's sigma_max: a trajectory made with another
    sigma table) raises :class:`ScheduleError` naming the step and the fix."""
    sig = [float(v) for v in sampling_sigmas.tolist()]
    n = len(sig) - 1
    bounds = [0.0]
    for k in range(1, n):
        hi, lo = sig[k - 1], sig[k]
        b = (hi * lo) ** 0.5 if lo > 0 else 0.5 * hi
        bounds.append(_percent_for_sigma(percent_to_sigma, b))
    bounds.append(1.0)
    ranges = list(zip(bounds[:-1], bounds[1:], strict=True))
    for k, (p0, p1) in enumerate(ranges):  # what ComfyUI will compute from them
        top, bottom = percent_to_sigma(p0), percent_to_sigma(p1)
        inside = bottom < sig[k] < top or (k == 0 and bottom < sig[k] <= top)  # sigma_max may equal the top
        if not inside or not p0 < p1:
            raise ScheduleError(
                f"the schedule's step {k} (sigma {sig[k]:.6g}) cannot be bound to its own conditioning range: this "
                f"model's percent scale gives [{bottom:.6g}, {top:.6g}] for it (its noise levels end near sigma "
                f"{percent_to_sigma(1e-6):.6g}); use the model that made the trajectory, or invert with a scheduler "
                "of this model (sigmas within its range)")
    return ranges
