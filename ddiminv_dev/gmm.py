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
                subset: Optional[Sequence[int]] = None,
                log_weight_shift: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Exact E[x0 | x] at level sigma (scalar or [B]) for the mixture restricted to ``subset``.

        ``log_weight_shift`` ([B, K] for the K components used, differentiable) is added to the log mixture
        weights of each sample: the exact posterior mean of the reweighted mixture (a shift of -1e4 removes a
        component exactly in float64)."""
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
        if log_weight_shift is not None:
            logp = logp + log_weight_shift.to(torch.float64).reshape(B, len(idx))
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


# ---------------------------------------------------------------------------------------------- embeddings
OUT_OF_PROMPT = -1.0e4     # log-weight shift that removes a component exactly (exp(-1e4) == 0 in float64)


@dataclass
class EmbeddingOracle:
    """The GMM denoiser conditioned on an *embedding tensor* [B, tokens, dim] (the oracle's text encoder).

    A component subset is too coarse a "prompt" for null-text inversion to have anything to fit, so here the
    prompt is a float tensor, as a text encoder's cross-attention tensor is. With v = emb.flatten(1) (M =
    tokens * dim values per sample):

    * ``v[:, :K]`` shift the K log mixture weights (the posterior mean of the reweighted mixture: a smooth,
      nonlinear map through the responsibilities);
    * ``v[:, K:]`` add ``scale * A @ tanh(v[:, K:])`` to the posterior mean (A a fixed [D, M-K] Gaussian
      matrix with entries N(0, 1/(M-K)); a smooth, bounded, nonlinear offset, like a cross-attention output).

    So each sample's embedding has M degrees of freedom (default 8 x 48 = 384: 4 weight logits + 380 offset
    coordinates) against D = 256 state values. ``empty()`` (all zeros: no shift, no offset) is the
    unconditional model (the full mixture); ``encode(subset)`` puts ``OUT_OF_PROMPT`` on the other components'
    logits, which is exactly ``GMM.denoise(subset=...)``. Conditional and unconditional predictions are the
    same network with two embeddings, as in a real model, so negative-prompt inversion (negative := the
    source prompt's embedding) makes the guided prediction equal the conditional one. Rows of a batch are
    independent (each sample uses its own embedding row).
    """
    gmm: GMM
    flow: bool
    proj: torch.Tensor          # [D, M-K] float64
    tokens: int
    dim: int
    scale: float

    @staticmethod
    def make(gmm: GMM, flow: bool = False, tokens: int = 8, dim: int = 48, scale: float = 1.0,
             seed: int = 0) -> "EmbeddingOracle":
        K, D = gmm.means.shape
        m = tokens * dim - K
        if m < 1:
            raise ValueError(f"tokens * dim must exceed the {K} weight logits")
        g = torch.Generator().manual_seed(seed)
        proj = torch.randn(D, m, generator=g, dtype=torch.float64) / math.sqrt(m)
        return EmbeddingOracle(gmm, flow, proj, tokens, dim, float(scale))

    @property
    def degrees_of_freedom(self) -> int:
        return self.tokens * self.dim

    def empty(self, batch: int = 1) -> torch.Tensor:
        """The empty prompt's encoding: zeros [batch, tokens, dim] float32 (the unconditional model)."""
        return torch.zeros(batch, self.tokens, self.dim, dtype=torch.float32)

    def encode(self, subset: Optional[Sequence[int]] = None, style: Optional[torch.Tensor] = None,
               batch: int = 1) -> torch.Tensor:
        """The prompt "components ``subset`` (None = all), in ``style``" as an embedding [batch, tokens, dim].

        ``style`` ([M-K] values, see :meth:`style`) fills the offset coordinates: the prompt then also moves
        the prediction by ``scale * A @ tanh(style)`` at every level, as a real prompt changes a real
        model's prediction near the data too (which is what makes CFG drift away from a CFG-1 inversion)."""
        K = self.gmm.means.shape[0]
        e = self.empty(batch)
        flat = e.view(batch, -1)
        if subset is not None:
            out = [k for k in range(K) if k not in set(subset)]
            flat[:, out] = OUT_OF_PROMPT
        if style is not None:
            flat[:, K:] = style.reshape(1, -1).to(torch.float32)
        return e

    def style(self, amplitude: float, seed: int = 1) -> torch.Tensor:
        """A seeded style: offset coordinates whose offset ``scale * A @ tanh(style)`` has RMS ``amplitude``."""
        g = torch.Generator().manual_seed(seed)
        K = self.gmm.means.shape[0]
        z = torch.randn(self.tokens * self.dim - K, generator=g, dtype=torch.float64)
        def rms(c):
            return float((self.scale * self.proj @ torch.tanh(c * z)).pow(2).mean().sqrt())
        lo, hi = 0.0, 1.0
        while rms(hi) < amplitude:
            hi *= 2.0
            if hi > 1e3:
                raise ValueError(f"amplitude {amplitude} is beyond this oracle's offset range")
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if rms(mid) < amplitude else (lo, mid)
        return (0.5 * (lo + hi) * z).to(torch.float32)

    def offset(self, emb: torch.Tensor) -> torch.Tensor:
        """The embedding's offset of the prediction, [B, D] float64."""
        K = self.gmm.means.shape[0]
        v = emb.reshape(emb.shape[0], -1)
        return self.scale * torch.tanh(v[:, K:].to(torch.float64)) @ self.proj.to(v.device).T

    def denoise(self, x: torch.Tensor, sigma, emb: torch.Tensor) -> torch.Tensor:
        """Posterior mean of the reweighted mixture plus the embedding's offset; differentiable in ``emb``."""
        B = x.shape[0]
        K = self.gmm.means.shape[0]
        v = emb.reshape(emb.shape[0], -1)
        if v.shape[0] == 1 and B > 1:
            v = v.expand(B, -1)
        if tuple(v.shape) != (B, self.tokens * self.dim):
            raise ValueError(f"embedding must be [B or 1, {self.tokens}, {self.dim}]; got {tuple(emb.shape)}")
        base = self.gmm.denoise(x, sigma, self.flow, log_weight_shift=v[:, :K])
        return (base.to(torch.float64) + self.offset(v).reshape(x.shape)).to(x.dtype)

    def cond_fn(self, subset: Optional[Sequence[int]] = None):
        """``cond_fn(x, sigma) -> D_c`` for the prompt ``subset`` (the same network, its encoding)."""
        e = self.encode(subset)
        return lambda x, sigma: self.denoise(x, sigma, e)

    def uncond_fn(self):
        """``uncond_fn(x, sigma, emb) -> D_u`` (differentiable in ``emb``)."""
        return self.denoise

    def model_fn(self, cond: torch.Tensor, uncond: torch.Tensor, cfg: float):
        """A guided ``model_fn(x, sigma)`` with fixed positive/negative embeddings (for ``methods.sample``)."""
        def fn(x, sigma):
            dc = self.denoise(x, sigma, cond)
            du = self.denoise(x, sigma, uncond)
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


def inversion_schedule(flow: bool, steps: int) -> torch.Tensor:
    """The schedule the oracle tests invert along (ascending): ``simple`` on the flow table, ``ddim_uniform`` on
    SD1.x's table otherwise, as ComfyUI builds them."""
    return (simple(flow_table(), steps) if flow else ddim_uniform(sd15_sigmas_table(), steps)).flip(0)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------- a prompt cfg moves
CFG_STYLE_AMPLITUDE = 0.1   # RMS of the styled prompt's offset (the data's per-component std is 0.3)


def styled_prompt_fn(gmm: GMM, flow: bool = False, cond: Optional[Sequence[int]] = (0, 1, 2), cfg: float = 1.0,
                     amplitude: float = CFG_STYLE_AMPLITUDE, seed: int = 1):
    """A guided ``model_fn(x, sigma)`` whose prompt changes the prediction at every level, so the cfg axis of a
    round trip means something.

    ``GMM.model_fn(cond=...)`` guides between a component subset and the full mixture: for a source sampled
    from the subset the two posterior means agree almost everywhere along the trajectory (the other
    components have no responsibility there), so cfg 7.5 gives the cfg-1 round trip. Here the positive is the
    :class:`EmbeddingOracle` encoding of ``cond`` *in a seeded style* (an offset of RMS ``amplitude`` added to
    the prediction at every level, as a real prompt moves a real model's prediction near the data too) and the
    negative is the empty prompt (the full mixture, no offset): the guided prediction is
    ``D_u + cfg * (D_c + offset - D_u)``, so the guidance moves the state by ``cfg * offset`` wherever the
    source is."""
    eo = EmbeddingOracle.make(gmm, flow)
    pos = eo.encode(cond, style=eo.style(amplitude, seed))
    return eo.model_fn(pos, eo.empty(), cfg)
