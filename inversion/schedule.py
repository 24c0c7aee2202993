"""Sigma schedules: validation, partial ranges and the inversion order.

A *sampling* schedule is what ComfyUI's schedulers return: 1-D, descending, usually ending at 0.
Inversion walks the same sigmas in ascending order, so regenerating with the sampling schedule retraces
exactly the inverted steps: no step skipped, none duplicated.
"""
from __future__ import annotations

import torch


class ScheduleError(ValueError):
    """A schedule that cannot be inverted; the message names the fix."""


def check_sampling_sigmas(sigmas: torch.Tensor, name: str = "sigmas") -> torch.Tensor:
    """Validate a descending sampling schedule and return it as a float32 CPU tensor (a copy)."""
    if not isinstance(sigmas, torch.Tensor):
        raise ScheduleError(f"{name} must be a SIGMAS tensor (connect a scheduler node such as BasicScheduler)")
    s = sigmas.detach().to("cpu", torch.float32).reshape(-1).clone()
    if s.ndim != 1 or s.numel() < 2:
        raise ScheduleError(f"{name} needs at least 2 values (one step); got {s.numel()}. Use steps >= 1.")
    if not torch.isfinite(s).all():
        raise ScheduleError(f"{name} contains NaN or Inf; use a scheduler node's output unmodified")
    if (s < 0).any():
        raise ScheduleError(f"{name} contains negative values; sigmas must be >= 0")
    if not (s[:-1] > s[1:]).all():
        if (s[:-1] < s[1:]).all():
            raise ScheduleError(
                f"{name} is ascending; give the sampling schedule (descending, as BasicScheduler emits) "
                "and do not insert FlipSigmas: DDIM Invert reverses it itself")
        raise ScheduleError(
            f"{name} must be strictly decreasing (no repeated or out-of-order values) so that its reversal "
            "is strictly increasing; remove duplicated sigmas")
    return s


def segment(sigmas: torch.Tensor, start_step: int = 0, end_step: int = 10000) -> torch.Tensor:
    """The part of a sampling schedule that KSamplerAdvanced's start_at_step/end_at_step would run.

    With ``steps = len(sigmas) - 1``: sampling from ``start_step`` to ``end_step`` uses
    ``sigmas[start_step : end_step + 1]``. Inverting that segment lands at ``sigmas[start_step]``.
    """
    steps = int(sigmas.shape[0]) - 1
    if start_step < 0:
        raise ScheduleError(f"start_step must be >= 0; got {start_step}")
    end = min(int(end_step), steps)
    if end < 0:
        raise ScheduleError(f"end_step must be >= 0; got {end_step}")
    if start_step >= end:
        raise ScheduleError(
            f"start_step ({start_step}) must be smaller than end_step ({min(end_step, steps)}, capped at "
            f"steps={steps}); lower start_step or raise end_step")
    return sigmas[start_step:end + 1].clone()


def inversion_order(sampling_sigmas: torch.Tensor) -> torch.Tensor:
    """Ascending schedule for inversion (the exact reverse of the sampling schedule)."""
    return sampling_sigmas.flip(0).clone()
