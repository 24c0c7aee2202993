"""Math core of ddim-inversion: pure torch, no ComfyUI import (unit-testable in milliseconds).

``methods`` (the three inversions and their paired sampler), ``implicit`` (the implicit step's solver),
``nulltext`` (null-text and negative-prompt inversion: per-step negative embeddings), ``regenerate`` (the
Inverted-Latent Sampler's plan: which negative, replay, drift pair and steps), ``schedule`` (sigma schedules and
their per-step conditioning ranges), ``flowedit`` (FlowEdit: inversion-free editing of flow models, two guided
denoisers), ``checks`` (the validation layer every node input passes), ``imaging``
(pixel and preview arithmetic), ``trajectory`` (the DDIM_TRAJECTORY contract), ``errors`` (the one error class).
"""
from .errors import InversionInputError, node_boundary
from .methods import (EVAL_SIGMAS, FIRST_EVAL_SIGMA, METHODS, REPLAYS, MethodError, Options, ddim_step, invert,
                      sample, source_drift)
from .schedule import ScheduleError, check_sampling_sigmas, inversion_order, segment, step_ranges
from .trajectory import CONTRACT_VERSION, Trajectory

__all__ = ["InversionInputError", "node_boundary", "EVAL_SIGMAS", "FIRST_EVAL_SIGMA", "METHODS", "REPLAYS",
           "MethodError", "Options", "ddim_step", "invert", "sample", "source_drift", "ScheduleError",
           "check_sampling_sigmas", "inversion_order", "segment", "step_ranges", "CONTRACT_VERSION", "Trajectory"]
