"""The DDIM_TRAJECTORY contract: what DDIM Invert records and downstream nodes rely on.

Everything is in *model space* (after ``latent_format.process_in``), in ComfyUI's sigma
parameterisation. ``sigmas`` are ascending: ``sigmas[0]`` is the level of the source latent (0 for a
clean image), ``sigmas[-1]`` the level of the inverted noise. ``states[i]`` is the state at
``sigmas[i]``; ``states[0]`` is the source latent itself and ``states[-1]`` the inverted noise.

Step ``i`` (0-based) is the inversion step ``sigmas[i] -> sigmas[i+1]``; ``denoised[i]`` is the x0
estimate of the model evaluation that step used and ``eval_sigmas[i]`` the sigma it was evaluated at
(see ``methods.py`` for which sigma each method uses). Sampling replays the same steps in reverse.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch

CONTRACT_VERSION = 1


@dataclass(frozen=True)
class Trajectory:
    sigmas: torch.Tensor                 # [N+1] float32, ascending, the exact schedule
    states: torch.Tensor                 # [N+1, B, C, H, W] float32, model space
    denoised: torch.Tensor               # [N, B, C, H, W] float32, x0 estimate of each step's evaluation
    eval_sigmas: torch.Tensor            # [N] float64, sigma each step's (final) evaluation used
    method: str                          # "ddim" | "implicit" | "exact"
    cfg: float                           # guidance scale used while inverting
    nfe: int                             # model evaluations (a guided CFG>1 evaluation counts once)
    nfe_per_step: tuple = ()             # evaluations used by each step
    options: dict = field(default_factory=dict)   # method options (eval_sigma, tolerance, gamma, ...)
    replay: dict = field(default_factory=dict)    # what the paired sampler needs (e.g. "pair" for exact)
    latent_format: str = ""              # class name of the model's latent_format
    model_sampling: str = ""             # class name of the model's model_sampling (e.g. ModelSamplingDiscrete+EPS)
    family: str = ""                     # "vp" (x = x0 + sigma*eps) or "flow" (x = (1-sigma)x0 + sigma*eps)
    sampling: dict = field(default_factory=dict)  # prediction type and sigma-table digest (what the sampler compares)
    noise_mask: Optional[torch.Tensor] = None
    batch_index: Optional[list] = None
    version: int = CONTRACT_VERSION
    extra: dict = field(default_factory=dict)     # free space for downstream packs
    # null-text / negative-prompt inversion (Null-Text Inversion node): {"mode", "cfg", "conditioning" (the
    # per-step negative CONDITIONING), evaluation and backward counts, ...}; None for a plain inversion
    optimized_negative: Optional[dict] = None

    # ------------------------------------------------------------------ derived views
    @property
    def steps(self) -> int:
        return int(self.sigmas.shape[0]) - 1

    @property
    def batch_size(self) -> int:
        return int(self.states.shape[1])

    @property
    def latent_shape(self) -> tuple:
        return tuple(self.states.shape[1:])

    @property
    def source(self) -> torch.Tensor:
        return self.states[0]

    @property
    def noise(self) -> torch.Tensor:
        return self.states[-1]

    def sampling_sigmas(self) -> torch.Tensor:
        """The schedule a sampler uses to regenerate: the same sigmas, descending."""
        return self.sigmas.flip(0)

    def with_(self, **changes: Any) -> "Trajectory":
        return replace(self, **changes)

    def summary(self) -> dict:
        return {
            "method": self.method, "steps": self.steps, "cfg": self.cfg, "nfe": self.nfe,
            "sigma_min": float(self.sigmas[0]), "sigma_max": float(self.sigmas[-1]),
            "shape": list(self.latent_shape), "latent_format": self.latent_format,
            "model_sampling": self.model_sampling, "family": self.family,
        }

    def __repr__(self) -> str:  # keep ComfyUI logs short
        return f"Trajectory({self.summary()})"
