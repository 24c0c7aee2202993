"""Math core of ddim-inversion: pure torch, no ComfyUI import (unit-testable in milliseconds)."""
from .methods import (EVAL_SIGMAS, FIRST_EVAL_SIGMA, METHODS, MethodError, Options, ddim_step, invert,
                      resolve_eval_sigma, sample, solve_step, source_drift)
from .schedule import ScheduleError, check_sampling_sigmas, inversion_order, segment
from .trajectory import CONTRACT_VERSION, Trajectory

__all__ = ["EVAL_SIGMAS", "FIRST_EVAL_SIGMA", "METHODS", "MethodError", "Options", "ddim_step", "invert",
           "resolve_eval_sigma", "sample", "solve_step", "source_drift", "ScheduleError", "check_sampling_sigmas",
           "inversion_order", "segment", "CONTRACT_VERSION", "Trajectory"]
