"""Analytic Gaussian-mixture denoiser: the exact posterior mean E[x0 | x_sigma] (pure torch).

Data: p0 = sum_k pi_k N(mu_k, s_k^2 I). In ComfyUI's model space x = a(sigma) x0 + sigma eps with
a = 1 (VP families: EPS/V) or a = 1 - sigma (flow). Then x | k ~ N(a mu_k, (a^2 s_k^2 + sigma^2) I) and
E[x0 | x, k] = mu_k + a s_k^2 / (a^2 s_k^2 + sigma^2) (x - a mu_k). Because the denoiser is exact, the
probability-flow ODE is known exactly; component subsets act as "prompts" (classifier-free guidance
mixes the subset's posterior mean with the full mixture's).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class GMM:
    means: torch.Tensor        # [K, D] float64
    stds: torch.Tensor         # [K] float64
    weights: torch.Tensor      # [K] float64
    shape: tuple               # latent shape (C, H, W)

    @staticmethod
    def make(k: int = 4, shape=(4, 8, 8), std: float = 0.3, seed: int = 0) -> "GMM":
        g = torch.Generator().manual_seed(seed)
        d = int(math.prod(shape))
        means = torch.randn(k, d, generator=g, dtype=torch.float64)
        stds = torch.full((k,), std, dtype=torch.float64)
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
        return GMM(means, stds, weights, tuple(shape))

    def sample_x0(self, comps: Sequence[int], seed: int = 1) -> torch.Tensor:
        """One clean sample per entry of ``comps`` (component index), shape [B, C, H, W] float32."""
        g = torch.Generator().manual_seed(seed)
        out = []
        for c in comps:
            z = torch.randn(self.means.shape[1], generator=g, dtype=torch.float64)
            out.append(self.means[c] + self.stds[c] * z)
        return torch.stack(out).reshape(len(comps), *self.shape).to(torch.float32)

    def denoise(self, x: torch.Tensor, sigma, flow: bool = False,
                subset: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Exact E[x0 | x] at level sigma (scalar or [B]) for the mixture restricted to ``subset``."""
        B = x.shape[0]
        xf = x.reshape(B, -1).to(torch.float64)
        sig = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1)
        if sig.numel() == 1:
            sig = sig.expand(B)
        sig = sig[:, None]                                               # [B, 1]
        a = (1.0 - sig) if flow else torch.ones_like(sig)
        idx = list(range(self.means.shape[0])) if subset is None else list(subset)
        mu = self.means[idx].to(x.device)                               # [K, D]
        s2 = (self.stds[idx] ** 2).to(x.device)                         # [K]
        logw = torch.log(self.weights[idx].to(x.device))
        var = a ** 2 * s2[None, :] + sig ** 2                           # [B, K]
        diff = xf[:, None, :] - a[:, :, None] * mu[None]                # [B, K, D]
        D = xf.shape[1]
        logp = logw[None] - 0.5 * diff.pow(2).sum(-1) / var - 0.5 * D * torch.log(var)
        r = torch.softmax(logp, dim=1)                                  # [B, K]
        post = mu[None] + (a * s2[None, :] / var)[:, :, None] * diff    # [B, K, D]
        x0 = (r[:, :, None] * post).sum(1)
        return x0.reshape(x.shape).to(x.dtype)

    def responsibilities(self, x0: torch.Tensor) -> torch.Tensor:
        """Component posterior at sigma = 0 (which component a clean latent belongs to), [B, K]."""
        B = x0.shape[0]
        xf = x0.reshape(B, -1).to(torch.float64)
        s2 = self.stds ** 2
        diff = xf[:, None, :] - self.means[None]
        logp = torch.log(self.weights)[None] - 0.5 * diff.pow(2).sum(-1) / s2 - 0.5 * xf.shape[1] * torch.log(s2)
        return torch.softmax(logp, dim=1)

    def model_fn(self, flow: bool = False, cond: Optional[Sequence[int]] = None,
                 uncond: Optional[Sequence[int]] = None, cfg: float = 1.0):
        """A ``model_fn(x, sigma) -> denoised`` with classifier-free guidance between two subsets."""
        def fn(x, sigma):
            dc = self.denoise(x, sigma, flow, cond)
            if cfg == 1.0:
                return dc
            du = self.denoise(x, sigma, flow, uncond)
            return du + cfg * (dc - du)
        return fn


# ---------------------------------------------------------------------------------------------- schedules
def sd15_sigmas_table() -> torch.Tensor:
    """SD1.x discrete sigmas (scaled_linear betas 0.00085..0.012, 1000 steps), as ComfyUI computes them."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1.0 - betas, dim=0)
    return (((1 - ac) / ac) ** 0.5).to(torch.float32)


def ddim_uniform(table: torch.Tensor, steps: int) -> torch.Tensor:
    """ComfyUI's ``ddim_uniform`` scheduler over a discrete sigma table (descending, ending at 0)."""
    sigs = []
    x = 1
    if math.isclose(float(table[x]), 0, abs_tol=1e-5):
        steps += 1
    else:
        sigs = [0.0]
    ss = max(len(table) // steps, 1)
    while x < len(table):
        sigs.append(float(table[x]))
        x += ss
    return torch.tensor(sigs[::-1], dtype=torch.float32)


def flow_table(shift: float = 3.0, timesteps: int = 1000) -> torch.Tensor:
    t = torch.arange(1, timesteps + 1, dtype=torch.float64) / timesteps
    return (shift * t / (1 + (shift - 1) * t)).to(torch.float32)


def simple(table: torch.Tensor, steps: int) -> torch.Tensor:
    """ComfyUI's ``simple`` scheduler (descending, ending at 0)."""
    ss = len(table) / steps
    sigs = [float(table[-(1 + int(x * ss))]) for x in range(steps)] + [0.0]
    return torch.tensor(sigs, dtype=torch.float32)
