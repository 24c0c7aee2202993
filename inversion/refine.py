"""Decoder inversion (pure torch): optimise a latent z so that ``decode(z)`` matches an image.

The VAE's encoder gives the posterior mean ``z0``; ``decode(z0)`` is softer than the image (the "VAE ceiling").
:func:`refine_latent` runs Adam on ``z`` (Hong et al., CVPR 2024, decoder inversion), starting at ``z0``, on the
per-image objective::

    J(z) = mse(decode(z), image over the valid pixels) + anchor * mean(((z - z0) / s)^2)

where ``s`` is the standard deviation of that image's ``z0`` (so ``anchor`` and the learning rate do not depend on
the VAE's latent scale): the second term keeps ``z`` near the encoder's distribution, the one the diffusion model
was trained on. The learning rate (in units of ``s``) decays on a cosine from ``lr`` to ``lr * lr_floor``; the loop
stops early once no image improved its best ``J`` by a relative ``tol`` in ``patience`` iterations. Every image of
the batch keeps its own **best iterate** (lowest ``J``, the mean included), so the result never has a higher ``J``
-- nor, since the anchor term is 0 at ``z0``, a worse pixel error -- than the mean.

``decode`` is any differentiable function ``z [N,C,h,w] -> image [N,H,W,3]`` (the layout of ``target``); the core
never sees ComfyUI. Large latents are optimised in windows (``windows``): each window is decoded with a margin of
context, only its core is compared, and the gradients of all windows are summed before the step, so memory is
that of one window's backward pass. Nothing passed in is modified; the returned latent carries no graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .errors import InversionInputError

DEFAULT_LR = 0.1
DEFAULT_ANCHOR = 0.0
LOSSES = ("clamped", "unclamped", "straight")
DEFAULT_LOSS = "clamped"
LR_FLOOR = 0.1
TOL = 1e-4


class RefineError(InversionInputError):
    """Decoder inversion cannot run on this input (message: what is wrong; the fix)."""


@dataclass
class RefineResult:
    latent: torch.Tensor              # best iterate per image, detached, dtype/device of z0
    mse_before: list                  # per image: pixel MSE of decode(z0) over the valid pixels
    mse_after: list                   # per image: pixel MSE of the returned latent
    iterations: int                   # optimiser steps taken (<= steps)
    best_iteration: list              # per image: the iteration of the returned latent (0 = the mean)
    stopped: str = "done"             # "done", "early" (no progress) or "non-finite" (loss became NaN/Inf)
    history: list = field(default_factory=list)   # mean J over the batch per evaluation


def cosine_lr(step: int, steps: int, lr: float, floor: float = LR_FLOOR) -> float:
    """Learning rate of optimiser step ``step`` (0-based) of ``steps``: cosine from ``lr`` to ``lr * floor``."""
    if steps <= 1:
        return float(lr)
    t = step / (steps - 1)
    return float(lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))))


def windows_for(h: int, w: int, core: int, margin: int) -> list:
    """Windows covering an ``h`` x ``w`` latent: ``[(y0, y1, x0, x1, cy0, cy1, cx0, cx1)]``, each decoded region
    and its measured core (latent pixels). The cores tile the latent exactly (no gap, no overlap); each decoded
    region is its core plus up to ``margin`` latent pixels of context on every side."""
    if core <= 0 or margin < 0:
        raise ValueError("core must be positive and margin non-negative")
    out = []
    for cy0 in range(0, h, core):
        cy1 = min(h, cy0 + core)
        for cx0 in range(0, w, core):
            cx1 = min(w, cx0 + core)
            out.append((max(0, cy0 - margin), min(h, cy1 + margin), max(0, cx0 - margin), min(w, cx1 + margin),
                        cy0, cy1, cx0, cx1))
    return out


# windows for VAE Encode (Inversion)'s refine: latents up to WHOLE_MAX latent pixels (512x512 images at factor
# 8) are decoded whole; larger ones (or tiled=True) in windows of a CORE x CORE core and MARGIN pixels of context
WHOLE_MAX = 64 * 64
CORE, MARGIN = 32, 8


def plan_windows(h: int, w: int, tiled: bool) -> Optional[list]:
    """The windows to refine an ``h`` x ``w`` latent in (:func:`windows_for`), or None to decode it whole."""
    return windows_for(h, w, CORE, MARGIN) if tiled or h * w > WHOLE_MAX else None


def keep_refined(db_mean: float, db_refined: float) -> bool:
    """Whether the refined latent replaces the posterior mean: only when its measured ceiling is strictly better
    (a tie, a loss or a NaN keeps the mean)."""
    return bool(db_refined > db_mean)


def _finite(v: torch.Tensor) -> bool:
    return bool(torch.isfinite(v).all())


def _check_args(steps, lr: float, anchor: float, loss: str) -> int:
    if loss not in LOSSES:
        raise RefineError(f"unknown refine loss {loss!r}; use one of {', '.join(LOSSES)}")
    steps = int(steps)
    if steps < 0:
        raise RefineError(f"refine must be >= 0 (got {steps}); use 0 for the posterior mean")
    for name, v in (("learning rate", lr), ("anchor", anchor)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise RefineError(f"the {name} must be a finite number >= 0 (got {v!r}); use the default")
    return steps


def _compared(dec: torch.Tensor, z: torch.Tensor, tgt: torch.Tensor, win, vh: int, vw: int):
    """(decoded, target) over the pixels one decode is compared on: the valid pixels, or a window's core."""
    f = dec.shape[-3] // z.shape[-2]
    if win is None:
        rec, ref = dec[..., :vh, :vw, :], tgt[..., :vh, :vw, :].to(dec.device)
    else:
        y0, _, x0, _, cy0, cy1, cx0, cx1 = win
        py0, py1 = (cy0 - y0) * f, (cy1 - y0) * f
        px0, px1 = (cx0 - x0) * f, (cx1 - x0) * f
        gy0, gx0 = cy0 * f, cx0 * f
        hh, ww = max(0, min(py1 - py0, vh - gy0)), max(0, min(px1 - px0, vw - gx0))
        rec = dec[..., py0:py0 + hh, px0:px0 + ww, :]
        ref = tgt[..., gy0:gy0 + hh, gx0:gx0 + ww, :].to(dec.device)
    if rec.shape != ref.shape:
        raise RefineError(f"the VAE decodes a {tuple(z.shape[2:])} latent to {tuple(dec.shape[1:-1])} "
                          f"pixels, not the image's {tuple(tgt.shape[-3:-1])} (a whole multiple of the latent); "
                          "set refine to 0 for this VAE")
    return rec, ref


def _objective(rec: torch.Tensor, shown: torch.Tensor, ref: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-image squared error the gradient sees (``loss``: see :func:`refine_latent`)."""
    if loss == "clamped":
        d = shown - ref
    elif loss == "unclamped":
        d = rec - ref
    else:
        d = rec + (shown - rec).detach() - ref
    return d.square().flatten(1).sum(1)


@dataclass
class _Problem:
    """What one evaluation of J needs: the mean, its per-image scale, the target and how to compare."""
    base: torch.Tensor
    scale: torch.Tensor
    tgt: torch.Tensor
    decode: Callable
    wins: list
    vh: int
    vw: int
    lo: float
    hi: float
    loss: str
    anchor: float

    def evaluate(self, u: torch.Tensor, grad: bool):
        """Per-image (data, anchor) terms at ``u`` and the first window's decode; with ``grad``, also
        accumulates d(sum J)/du into u.grad."""
        n = self.base.shape[0]
        data = torch.zeros(n, dtype=torch.float64)
        first = None
        count = self.vh * self.vw * self.tgt.shape[-1] * (self.tgt.shape[1] if self.tgt.ndim == 5 else 1)
        for win in self.wins:
            with torch.set_grad_enabled(grad):
                z = self.base + self.scale * u
                if win is not None:
                    y0, y1, x0, x1 = win[:4]
                    z = z[..., y0:y1, x0:x1]
                dec = self.decode(z).to(torch.float32)
                rec, ref = _compared(dec, z, self.tgt, win, self.vh, self.vw)
                shown = rec.clamp(self.lo, self.hi)
                sse = (shown - ref).square().flatten(1).sum(1)
                if grad and not sse.requires_grad:
                    raise RefineError("the decoder returns no autograd graph, so the latent cannot be refined; set "
                                      "refine to 0")
                if grad and rec.numel():
                    (_objective(rec, shown, ref, self.loss).sum() / count).backward()
            data += sse.detach().double().cpu() / count
            if first is None:
                first = dec.detach()
        with torch.no_grad():
            reg = u.detach().square().flatten(1).mean(1).double().cpu()
        if grad and self.anchor > 0:
            with torch.enable_grad():
                (self.anchor * u.square().flatten(1).mean(1).sum()).backward()
        return data, reg, first


def refine_latent(z0: torch.Tensor, target: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor], *,
                  steps: int, lr: float = DEFAULT_LR, anchor: float = DEFAULT_ANCHOR,
                  valid_hw: Optional[Sequence[int]] = None, windows: Optional[list] = None,
                  lr_floor: float = LR_FLOOR, tol: float = TOL, patience: Optional[int] = None,
                  loss: str = DEFAULT_LOSS, clip: Sequence[float] = (0.0, 1.0),
                  on_step: Optional[Callable[[int, int, torch.Tensor], None]] = None) -> RefineResult:
    """Decoder inversion of ``z0`` [N,C,h,w] against ``target`` [N,H,W,3]; see the module docstring. A video
    latent ``z0`` [N,C,t,h,w] is inverted against its clips ``target`` [N,F,H,W,3] (``decode`` returns
    [N,F,H,W,3]) as one unknown over all frames; windows cut h/w only, every window keeps the whole time axis.

    ``valid_hw``: the (H, W) of target pixels that count (padding excluded; default all). ``windows``: from
    :func:`windows_for`, or None to decode the whole latent at once. ``on_step(i, total, decoded)`` is called after
    every evaluation but the last (``decoded``: the first window's decoded image of the current iterate, no graph);
    it may raise to interrupt. ``steps = 0`` returns ``z0`` itself (untouched) after one decode.

    ``decode`` may return pixels outside ``clip`` (a VAE's raw output): every *measure* (the pixel error reported,
    the best iterate, early stop) is taken on the decode clamped to ``clip``, as the image the user gets. ``loss``
    says what the gradient sees: ``clamped`` the same clamped error (pixels past the range get no gradient),
    ``unclamped`` the raw decode's error (overshoot is pulled back even where clamping would hide it),
    ``straight`` the clamped error with the clamp's gradient passed straight through (an overshooting pixel whose
    clamped value is off still gets a gradient; one whose clamped value is right does not).
    """
    steps = _check_args(steps, lr, anchor, loss)
    n = z0.shape[0]
    vh, vw = (int(valid_hw[0]), int(valid_hw[1])) if valid_hw is not None else (target.shape[-3], target.shape[-2])
    with torch.no_grad():
        base = z0.detach().to(torch.float32)
        scale = base.flatten(1).std(dim=1).clamp_min(1e-6).view(n, *([1] * (base.ndim - 1)))
        tgt = target.detach().to(torch.float32)
    prob = _Problem(base, scale, tgt, decode, windows if windows is not None else [None], vh, vw,
                    float(clip[0]), float(clip[1]), loss, anchor)

    u = torch.zeros_like(base, requires_grad=True)
    data0, _, first = prob.evaluate(u, grad=steps > 0)
    if not _finite(data0):
        raise RefineError("the pixel error of the decoded mean is NaN/Inf; run the VAE in float32 (--fp32-vae) or "
                          "set refine to 0")
    best_j = data0.clone()
    best_data = data0.clone()
    best_it = [0] * n
    best_u = torch.zeros_like(base)
    history = [float(data0.mean())]
    if steps == 0:
        return RefineResult(z0, data0.tolist(), data0.tolist(), 0, best_it, "done", history)
    opt = torch.optim.Adam([u], lr=float(lr))
    patience = int(patience) if patience is not None else max(10, steps // 5)
    last_gain, stopped, it = 0, "done", 0
    for it in range(1, steps + 1):
        if on_step is not None:
            on_step(it - 1, steps, first)
        if u.grad is None or not _finite(u.grad):
            stopped, it = "non-finite", it - 1
            break
        for g in opt.param_groups:
            g["lr"] = cosine_lr(it - 1, steps, lr, lr_floor)
        opt.step()
        opt.zero_grad(set_to_none=True)
        data, reg, first = prob.evaluate(u, grad=it < steps)
        j = data + float(anchor) * reg
        if not _finite(j):
            stopped = "non-finite"
            break
        better = j < best_j
        improved = bool((better & (j < best_j * (1.0 - tol))).any())
        if bool(better.any()):
            with torch.no_grad():
                mask = better.to(best_u.device).view(n, *([1] * (base.ndim - 1)))
                best_u = torch.where(mask, u.detach(), best_u)
            best_j = torch.where(better, j, best_j)
            best_data = torch.where(better, data, best_data)
            for i in torch.nonzero(better).flatten().tolist():
                best_it[i] = it
        history.append(float(j.mean()))
        if improved:
            last_gain = it
        elif it - last_gain >= patience:
            stopped = "early"
            break
    with torch.no_grad():
        latent = (base + scale * best_u).to(z0.dtype).detach()
    return RefineResult(latent, data0.tolist(), best_data.tolist(), it, best_it, stopped, history)
