"""Null-text inversion and negative-prompt inversion: per-step negative embeddings (pure torch; no ComfyUI).

Why. A CFG-1 DDIM inversion (the *pivot*, states x*_0 ... x*_N) reconstructs its source when it is sampled
at CFG 1, but editing wants CFG ~7.5, and at CFG 7.5 the sampler leaves the pivot and the reconstruction
drifts. Null-text inversion (Mokady et al., CVPR 2023) keeps the prompt and the weights and instead tunes the
*unconditional* (negative) embedding, one per sampling step, so that the guided sampler follows the pivot.
Negative-prompt inversion (Miyake et al. 2023) is its zero-cost approximation: use the source prompt's
embedding as the negative, so the guided prediction ``D_u + w (D_c - D_u)`` equals the conditional one at
any w and the sampler is the CFG-1 sampler that the pivot inverts.

The model is seen through two callables, in ComfyUI's sigma parameterisation (model space, float32 [B, ...]
states, python-float sigma, denoised = x0 estimate, as in ``methods.py``):

* ``cond_fn(x, sigma) -> D_c``: the positive (source prompt) prediction; called under ``torch.no_grad()``.
* ``uncond_fn(x, sigma, emb) -> D_u``: the negative prediction with the negative's embedding ``emb``
  replaced by the given tensor; must be differentiable in ``emb`` (the only tensor that requires grad).
  ``emb`` has a leading batch dimension B (row b conditions sample b; see *Batches*); in ComfyUI it is the
  negative's cross-attention tensor [B, tokens, dim], everything else (pooled output, ...) held fixed.

The algorithm (``optimize``). Sampling step k = 0 .. N-1 goes from level i = N-k to i-1 (descending
``sigmas``; ``sigmas[k] -> sigmas[k+1]`` in the result). The sampler starts at x_N = x*_N. At step k:

1. ``D_c = cond_fn(x_i, sigma_i)`` once (no grad).
2. Up to ``iterations`` Adam updates of e (starting from the previous step's final e; step 0 from ``null0``)
   on the step loss  L(e) = mean( (c_in(sigma_{i-1}) * (x*_{i-1} - step(x_i, D_u(e) + w (D_c - D_u(e)))))^2 )
   where ``step`` is the DDIM step ``methods.ddim_step`` from sigma_i to sigma_{i-1} and the gradient flows
   through the unconditional branch only. Every iteration first evaluates L at the current e; when L is at
   most the threshold (``early_stop`` + ``early_stop_ramp`` * k / N) the step stops *before* updating, so
   the state the sampler keeps was produced by exactly the embedding it keeps.
3. x_{i-1} = that guided step with the final e (the forward of the last iteration: no extra evaluation).

``optimize`` is the loop over the steps; :func:`optimize_step` is one step (1.-3.).

Masks. With a ``mask`` (1 = regenerate, broadcastable to a state) the optimiser does what the masked sampler
(``methods.sample(mask=...)``) does: after every step the state outside the mask is pinned to the pivot's,
x_{i-1} = m step(...) + (1 - m) x*_{i-1}, so the loss is the miss of that pinned state,
mean((c_in m (x*_{i-1} - step(...)))^2) / mean(m^2): the mean squared miss *inside* the mask (the outside
cannot miss; the division keeps the early-stop threshold a per-element figure for any mask size). A sample
whose mask is empty stops at once (loss 0).

Loss scale. The loss is the per-sample mean squared error in the network-input scale c_in(sigma) * x (c_in
= 1/sqrt(1+sigma^2) for EPS/V: the DDPM latent sqrt(abar) x0 + sqrt(1-abar) eps the paper's loss and
thresholds are written in; c_in = 1 for flow, whose model space already is that scale). Override with
``input_scale``. The batch loss is the sum of the per-sample losses, so no sample's gradient sees another.

Learning rate. Each step gets a fresh Adam with lr_k = ``learning_rate`` * (1 - ``lr_decay`` * k / N): the
paper's 1e-2 * (1 - i/100) at 50 steps for the default lr_decay = 0.5, the same relative decay at any N.

Early stop. The paper stops when L < 1e-5 + 2e-5 * i at 50 steps, i.e. the threshold ramps up to ~1e-3 on
the last (clean) steps. Default here: ``early_stop`` = 1e-5 and ``early_stop_ramp`` = 0 (no ramp): the ramp
lets the last steps stop at an RMS error of ~0.03 in latent scale, and the last steps' residual is what is
left of the reconstruction error (oracle, EPS, 50 steps: 0.027 with the ramp at 122 evaluations, 0.011
without at 228; tests/unit/test_nulltext.py). ``early_stop_ramp = 1e-3`` is the paper's rule at any N
(2e-5 per step at 50 steps). A non-finite loss raises :class:`NullTextError` (an ``InversionInputError``)
naming the step and the fix.

Cost per sampling step (B samples are one batched call): 1 cond evaluation (no grad) + (u + 1)
unconditional evaluations (u with a graph) + u backward passes through the unconditional branch, where
u = the largest number of Adam updates any sample of the batch needed there (0 <= u <= ``iterations``).
Backward passes use ``torch.autograd.grad`` w.r.t. the embedding only: no ``.grad`` is ever written to a
model weight, nothing is stepped but the embedding. The paper's loop costs ``iterations`` (forward +
backward) + one final guided (cond + uncond) evaluation + the cond per step.

Embeddings are returned in *sampling order*: ``result.embeddings[k]`` ([B, *emb.shape[1:]], float32) is the
negative of the step ``result.sigmas[k] -> result.sigmas[k+1]``, i.e. of the model evaluations at sigma =
``result.sigmas[k]``; a ComfyUI sampler replays them by binding embeddings[k] to the evaluations at sigmas[k]
(``nodes/_comfy_grad.step_ranges``). ``result.states`` and ``result.denoised`` are what that replay produces
(the sampler's states and guided x0 estimates), so nothing has to be re-run to show the reconstruction.

Batches: one embedding per sample. ``null0`` may have a leading dimension 1 (shared start, expanded) or B;
the result always has B rows, optimised independently (per-sample loss, per-sample early stop: a finished
sample's row is frozen while the others continue), so a batch gives the same embeddings as single runs,
provided ``uncond_fn`` treats rows independently. Flow models (sigma up to 1) need nothing special: the DDIM
step divides by sigma only.

Autograd. ``optimize`` enables autograd locally (``torch.inference_mode(False)`` + ``torch.enable_grad()``,
so it works inside ComfyUI's inference mode and its samplers' ``no_grad``), works on clones (never mutates the
pivot, ``null0`` or anything returned by the callables) and returns only detached tensors. A model whose
weights are inference tensors cannot be differentiated: that is reported as a :class:`NullTextError` saying
what the adapter must do.

Negative-prompt inversion needs no code here: its negative is the source prompt's conditioning itself
(the node passes it through).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .errors import InversionInputError
from .methods import ddim_step, default_input_scale
from .trajectory import Trajectory

CondFn = Callable[[torch.Tensor, float], torch.Tensor]
UncondFn = Callable[[torch.Tensor, float, torch.Tensor], torch.Tensor]
Progress = Callable[[int, int, torch.Tensor, torch.Tensor], None]

MODES = ("null_text", "negative_prompt")


class NullTextError(InversionInputError):
    """Bad null-text options or inputs, or an optimisation that cannot go on; the message names the fix (the
    pack's one error model: at a node boundary it becomes that node's ``InversionInputError``)."""


@dataclass(frozen=True)
class NullTextOptions:
    cfg: float = 7.5                 # guidance scale the embeddings are optimised for (must be > 1)
    iterations: int = 10             # Adam updates per sampling step at most
    learning_rate: float = 1e-2      # Adam lr of the first sampling step
    lr_decay: float = 0.5            # lr_k = learning_rate * (1 - lr_decay * k / N)  (paper: 0.5)
    early_stop: float = 1e-5         # stop a step once its loss <= early_stop + early_stop_ramp * k / N
    early_stop_ramp: float = 0.0     # paper: 1e-3 (= 2e-5 per step at 50 steps); see the module docstring

    def check(self) -> "NullTextOptions":
        w = float(self.cfg)
        if not math.isfinite(w) or w <= 1.0:
            raise NullTextError(
                f"null-text inversion needs cfg > 1 (got {self.cfg}): at cfg 1 the negative has no effect on the "
                "guided prediction, so there is nothing to optimise; sample the CFG-1 inversion at cfg 1 directly "
                "(or use negative-prompt inversion / source_drift for other cfg values)")
        if isinstance(self.iterations, bool) or int(self.iterations) != self.iterations or int(self.iterations) < 1:
            raise NullTextError(f"iterations must be an integer >= 1 (got {self.iterations}); use e.g. 10")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise NullTextError(f"learning_rate must be > 0 (got {self.learning_rate}); use e.g. 1e-2")
        if not (0.0 <= self.lr_decay < 1.0):
            raise NullTextError(f"lr_decay must be in [0, 1) (got {self.lr_decay}); use 0.5, the paper's schedule")
        if not (math.isfinite(self.early_stop) and self.early_stop >= 0):
            raise NullTextError(f"early_stop must be >= 0 (got {self.early_stop}); use e.g. 1e-5 (0 disables it)")
        if not (math.isfinite(self.early_stop_ramp) and self.early_stop_ramp >= 0):
            raise NullTextError(f"early_stop_ramp must be >= 0 (got {self.early_stop_ramp}); use 0 (none) or "
                                "the paper's 1e-3")
        return self

    def lr(self, k: int, steps: int) -> float:
        """Adam learning rate of sampling step k of ``steps``."""
        return float(self.learning_rate) * (1.0 - float(self.lr_decay) * k / steps)

    def threshold(self, k: int, steps: int) -> float:
        """Early-stop threshold on the step loss of sampling step k of ``steps``."""
        return float(self.early_stop) + float(self.early_stop_ramp) * k / steps


@dataclass(frozen=True)
class NullTextResult:
    """Per-step negative embeddings and what producing them cost. All tensors are detached (no graph).

    Indexing is by sampling step k = 0 .. N-1 (step k goes ``sigmas[k] -> sigmas[k+1]``, ``sigmas``
    descending, ``sigmas[0]`` = the pivot's noise level).
    """
    method: str                       # "null_text"
    embeddings: torch.Tensor          # [N, B, *emb] float32: embeddings[k] is the negative of step k
    sigmas: torch.Tensor              # [N+1] float32, descending (the sampling schedule)
    cfg: float                        # guidance the embeddings were optimised for
    losses: torch.Tensor              # [N, B] float64: final step loss per sample
    iterations: torch.Tensor          # [N, B] int64: Adam updates (= backward rows) used per step and sample
    nfe_cond_per_step: tuple = ()     # cond evaluations per step (batched calls)
    nfe_uncond_per_step: tuple = ()   # uncond evaluations per step (batched calls)
    backward_per_step: tuple = ()     # backward passes per step (batched)
    states: Optional[torch.Tensor] = None   # [N+1, B, ...] sampler states in sampling order: states[k] at
    #                                         sigmas[k]; states[0] = pivot noise, states[N] = reconstruction
    denoised: Optional[torch.Tensor] = None  # [N, B, ...] guided x0 estimate of step k (the kept embedding)
    options: Optional[NullTextOptions] = None

    @property
    def steps(self) -> int:
        return int(self.sigmas.shape[0]) - 1

    @property
    def x0(self) -> torch.Tensor:
        """The sampler's reconstruction x_0."""
        return self.states[-1]

    @property
    def nfe_cond(self) -> int:
        return int(sum(self.nfe_cond_per_step))

    @property
    def nfe_uncond(self) -> int:
        return int(sum(self.nfe_uncond_per_step))

    @property
    def nfe(self) -> int:
        """All model evaluations (batched calls; a cond and an uncond evaluation count once each)."""
        return self.nfe_cond + self.nfe_uncond

    @property
    def backward(self) -> int:
        return int(sum(self.backward_per_step))


# ---------------------------------------------------------------------------------------------- helpers
def _combine(Du: torch.Tensor, Dc: torch.Tensor, w: float) -> torch.Tensor:
    """The guided prediction, as ComfyUI's CFG computes it from the two branches."""
    return Du + w * (Dc - Du)


def _batch_rows(emb: torch.Tensor, B: int, what: str) -> torch.Tensor:
    if not isinstance(emb, torch.Tensor) or emb.ndim < 1:
        raise NullTextError(f"{what} is not a tensor with a leading batch dimension; pass e.g. [1, tokens, dim]")
    if emb.shape[0] == B:
        return emb
    if emb.shape[0] == 1:
        return emb.expand(B, *emb.shape[1:])
    raise NullTextError(f"{what} has batch {emb.shape[0]} but the latent batch is {B}; pass one row "
                        f"(shared start) or {B} rows (one per sample)")


def _pivot_levels(pivot: Trajectory) -> list:
    if not isinstance(pivot, Trajectory):
        raise NullTextError("the pivot is not a Trajectory; pass the CFG-1 inversion (e.g. methods.invert(...))")
    if pivot.steps < 1:
        raise NullTextError("the pivot has no step; invert with steps >= 1")
    return [float(v) for v in pivot.sigmas.tolist()]


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.ndim - 1)))


INFERENCE_HINT = (
    "the negative branch was computed with tensors created under torch.inference_mode() (ComfyUI runs nodes "
    "in inference mode, so a model loaded there has inference-tensor weights, and a model patch may create "
    "more), which autograd cannot save for the backward pass; the model must run with normal tensors: "
    "(re)load / cast its weights inside torch.inference_mode(False), or clone the affected tensors (a custom "
    "model patch that makes tensors in inference mode must make them outside it)")


def _uncond(uncond_fn: UncondFn, x: torch.Tensor, s: float, e: torch.Tensor) -> torch.Tensor:
    try:
        return uncond_fn(x, s, e).to(torch.float32)
    except RuntimeError as err:
        if "Inference tensors cannot be saved for backward" in str(err):
            raise NullTextError(INFERENCE_HINT) from err
        raise


@dataclass(frozen=True)
class StepResult:
    """One sampling step of :func:`optimize` (all tensors detached)."""
    x: torch.Tensor            # [B, ...] the state the sampler keeps (the guided step with ``embedding``)
    denoised: torch.Tensor     # [B, ...] its guided x0 estimate
    embedding: torch.Tensor    # [B, *emb] the kept negative (frozen at the iteration each sample stopped)
    loss: torch.Tensor         # [B] float64 the kept state's loss
    updates: torch.Tensor      # [B] int64 Adam updates each sample used
    nfe_uncond: int            # unconditional evaluations (batched)
    backward: int              # backward passes (batched)


def optimize_step(k: int, x: torch.Tensor, target: torch.Tensor, s: float, t: float, Dc: torch.Tensor,
                  e_start: torch.Tensor, uncond_fn: UncondFn, opts: NullTextOptions, *, scale: float, lr: float,
                  threshold: float, mask: Optional[torch.Tensor] = None, progress=None,
                  check_interrupt: Optional[Callable[[], None]] = None) -> StepResult:
    """Step 2.-3. of the module docstring for sampling step ``k`` from level ``s`` to ``t``: Adam on the
    negative ``e`` (from ``e_start``) until each sample's loss against ``target`` (the pivot's state at
    ``t``) is at most ``threshold`` or ``opts.iterations`` updates are spent. ``Dc``: the positive
    prediction at (x, s). ``mask``: see *Masks*. ``progress(j, x, D)`` after every unconditional evaluation
    (j = 0 .. iterations). Call under ``torch.inference_mode(False)``; nothing passed in is modified."""
    B = x.shape[0]
    dev = x.device
    w = float(opts.cfg)
    iters = int(opts.iterations)
    m = None if mask is None else mask.to(dev, torch.float32).expand_as(x)
    norm = None if m is None else m.pow(2).flatten(1).mean(1).clamp(min=1e-12)    # [B]
    e = e_start.clone().requires_grad_(True)
    adam = torch.optim.Adam([e], lr=lr)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    used = torch.zeros(B, dtype=torch.long, device=dev)
    loss = torch.zeros(B, dtype=torch.float64, device=dev)
    x_keep, d_keep, e_keep = torch.zeros_like(x), torch.zeros_like(x), e_start.clone()
    unc = bwd = 0
    for j in range(iters + 1):
        last = j == iters
        if check_interrupt is not None:
            check_interrupt()
        with torch.set_grad_enabled(not last):
            Du = _uncond(uncond_fn, x, s, e if not last else e.detach())
            D = _combine(Du, Dc, w)
            xp = ddim_step(x, D, s, t)
            if m is None:
                per = ((xp - target) * scale).pow(2).flatten(1).mean(1)               # [B] per-sample loss
            else:
                xp = m * xp + (1 - m) * target                                      # the masked sampler's pin
                per = ((xp - target) * scale).pow(2).flatten(1).mean(1) / norm
        unc += 1
        per_d = per.detach()
        if not bool(torch.isfinite(per_d).all()):
            bad = [b for b in range(B) if not math.isfinite(float(per_d[b]))]
            raise NullTextError(
                f"the loss of sample(s) {bad} is not finite at sampling step {k} (sigma {s:.4g}), iteration {j}: "
                "the model's prediction overflowed or the optimisation diverged; run the model in float32, "
                "or lower learning_rate")
        newly = ~done & ((per_d <= threshold) | last)
        if bool(newly.any()):
            x_keep = torch.where(_rows(newly, x), xp.detach(), x_keep)
            d_keep = torch.where(_rows(newly, x), D.detach(), d_keep)
            e_keep = torch.where(_rows(newly, e_keep), e.detach(), e_keep)
            loss = torch.where(newly, per_d.to(torch.float64), loss)
            done = done | newly
        if progress is not None:
            progress(j, xp.detach(), D.detach())
        if bool(done.all()):
            break
        # one backward pass through the unconditional branch, w.r.t. the embedding only
        active = ~done
        with torch.enable_grad():
            (g,) = torch.autograd.grad(per.sum(), [e])
        bwd += 1
        with torch.no_grad():
            e.grad = torch.where(_rows(active, g), g, torch.zeros_like(g))
            adam.step()
            e.grad = None
            e.copy_(torch.where(_rows(done, e), e_keep, e))    # finished samples stay frozen
        used = used + active.long()
    return StepResult(x_keep, d_keep, e_keep, loss, used, unc, bwd)


# ---------------------------------------------------------------------------------------------- null-text
def optimize(pivot: Trajectory, cond_fn: CondFn, uncond_fn: UncondFn, null0: torch.Tensor,
             opts: NullTextOptions = NullTextOptions(), *, input_scale: Optional[Callable[[float], float]] = None,
             mask: Optional[torch.Tensor] = None, progress: Optional[Progress] = None,
             check_interrupt: Optional[Callable[[], None]] = None, device: Optional[torch.device] = None,
             store_device: Optional[torch.device] = None) -> NullTextResult:
    """Null-text inversion of ``pivot`` at guidance ``opts.cfg`` (see the module docstring).

    ``null0``: the initial negative embedding (an empty prompt's encoding), leading dim 1 or B.
    ``input_scale``: c_in(sigma) of the loss (default ``methods.default_input_scale(pivot.family)``).
    ``mask``: 1 = regenerate, broadcastable to a state (see *Masks*); None = the whole latent.
    ``progress(n, total, x, D)``: after every unconditional evaluation, n = k * (iterations + 1) + j
    (0-based; a step that stops early skips the rest of its slots), total = N * (iterations + 1), x the
    state the current embedding lands on, D its guided prediction.
    ``check_interrupt()``: before every evaluation (raise from it to abort; nothing is left modified).
    ``device``: where to compute (default: the pivot's); ``store_device``: where the results go (default:
    ``device``). Returns a :class:`NullTextResult` with the embeddings in sampling order.
    """
    opts = opts.check()
    sig = _pivot_levels(pivot)
    N, B = pivot.steps, pivot.batch_size
    rows0 = _batch_rows(null0, B, "null0")
    cin = input_scale if input_scale is not None else default_input_scale(pivot.family)
    dev = torch.device(device) if device is not None else pivot.states.device
    out_dev = store_device if store_device is not None else dev
    slots = int(opts.iterations) + 1

    with torch.inference_mode(False), torch.no_grad():
        # private, normal (non-inference) copies: nothing the caller holds is ever touched
        e_cur = rows0.detach().to(dev, torch.float32).clone()
        m = None if mask is None else mask.detach().to(dev, torch.float32).clone()
        x = pivot.states[N].detach().to(dev, torch.float32).clone()
        states, steps = [x], []
        for k in range(N):
            i = N - k
            s, t = sig[i], sig[i - 1]
            if check_interrupt is not None:
                check_interrupt()
            Dc = cond_fn(x, s).detach().to(torch.float32).clone()
            report = None if progress is None else (
                lambda j, xp, D, k=k: progress(k * slots + j, N * slots, xp, D))
            r = optimize_step(k, x, pivot.states[i - 1].detach().to(dev, torch.float32).clone(), s, t, Dc, e_cur,
                              uncond_fn, opts, scale=float(cin(t)), lr=opts.lr(k, N), threshold=opts.threshold(k, N),
                              mask=m, progress=report, check_interrupt=check_interrupt)
            x, e_cur = r.x, r.embedding
            states.append(x)
            steps.append(r)

        def stack(name):
            return torch.stack([getattr(r, name) for r in steps]).to(out_dev)

        return NullTextResult(
            method="null_text",
            embeddings=stack("embedding"),
            sigmas=torch.tensor(sig[::-1], dtype=torch.float32),
            cfg=float(opts.cfg),
            losses=stack("loss"),
            iterations=stack("updates"),
            nfe_cond_per_step=(1,) * N, nfe_uncond_per_step=tuple(r.nfe_uncond for r in steps),
            backward_per_step=tuple(r.backward for r in steps),
            states=torch.stack(states).to(out_dev),
            denoised=stack("denoised"),
            options=opts,
        )
