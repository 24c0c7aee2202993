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
(2e-5 per step at 50 steps). A non-finite loss raises ``FloatingPointError`` naming the step.

Cost per sampling step (B samples are one batched call): 1 cond evaluation (no grad) + (u + 1)
unconditional evaluations (u with a graph) + u backward passes through the unconditional branch, where
u = the largest number of Adam updates any sample of the batch needed there (0 <= u <= ``iterations``).
Backward passes use ``torch.autograd.grad`` w.r.t. the embedding only: no ``.grad`` is ever written to a
model weight, nothing is stepped but the embedding. The paper's loop costs ``iterations`` (forward +
backward) + one final guided (cond + uncond) evaluation + the cond per step.

Embeddings are returned in *sampling order*: ``result.embeddings[k]`` ([B, *emb.shape[1:]], float32) is the
negative of the step ``result.sigmas[k] -> result.sigmas[k+1]``, i.e. of the model evaluations at sigma =
``result.sigmas[k]`` (``result.step_for_sigma`` finds k for a sigma). ``sample_with_embeddings`` replays
them; a ComfyUI sampler does the same by binding embeddings[k] to the evaluations at sigmas[k].

Batches: one embedding per sample. ``null0`` may have a leading dimension 1 (shared start, expanded) or B;
the result always has B rows, optimised independently (per-sample loss, per-sample early stop: a finished
sample's row is frozen while the others continue), so a batch gives the same embeddings as single runs,
provided ``uncond_fn`` treats rows independently. Flow models (sigma up to 1) need nothing special: the DDIM
step divides by sigma only.

Autograd. ``optimize`` enables autograd locally (``torch.inference_mode(False)`` + ``torch.enable_grad()``,
so it works inside ComfyUI's inference mode and its samplers' ``no_grad``), works on clones (never mutates the
pivot, ``null0`` or anything returned by the callables) and returns only detached tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from .methods import ddim_step, default_input_scale
from .trajectory import Trajectory

CondFn = Callable[[torch.Tensor, float], torch.Tensor]
UncondFn = Callable[[torch.Tensor, float, torch.Tensor], torch.Tensor]
Progress = Callable[[int, int, torch.Tensor, torch.Tensor], None]

MODES = ("null_text", "negative_prompt")


class NullTextError(ValueError):
    """Bad null-text options or inputs; the message names the fix."""


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
                f"null-text inversion needs cfg > 1 (e.g. 7.5); got {self.cfg}. At cfg 1 the negative has no "
                "effect on the guided prediction, so there is nothing to optimise: sample the CFG-1 inversion "
                "at cfg 1 directly (or use negative-prompt inversion / source_drift for other cfg values).")
        if isinstance(self.iterations, bool) or int(self.iterations) != self.iterations or int(self.iterations) < 1:
            raise NullTextError(f"iterations must be an integer >= 1 (e.g. 10); got {self.iterations}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise NullTextError(f"learning_rate must be > 0 (e.g. 1e-2); got {self.learning_rate}")
        if not (0.0 <= self.lr_decay < 1.0):
            raise NullTextError(f"lr_decay must be in [0, 1) (0.5 = the paper's schedule); got {self.lr_decay}")
        if not (math.isfinite(self.early_stop) and self.early_stop >= 0):
            raise NullTextError(f"early_stop must be >= 0 (e.g. 1e-5; 0 disables it); got {self.early_stop}")
        if not (math.isfinite(self.early_stop_ramp) and self.early_stop_ramp >= 0):
            raise NullTextError(f"early_stop_ramp must be >= 0 (0 = none; the paper's is 1e-3); "
                                f"got {self.early_stop_ramp}")
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
    method: str                       # "null_text" | "negative_prompt"
    embeddings: torch.Tensor          # [N, B, *emb] float32: embeddings[k] is the negative of step k
    sigmas: torch.Tensor              # [N+1] float32, descending (the sampling schedule)
    cfg: Optional[float]              # guidance the embeddings were optimised for (None: any, for NPI)
    losses: torch.Tensor              # [N, B] float64: final step loss per sample (NaN: not evaluated, NPI)
    iterations: torch.Tensor          # [N, B] int64: Adam updates (= backward rows) used per step and sample
    nfe_cond_per_step: tuple = ()     # cond evaluations per step (batched calls)
    nfe_uncond_per_step: tuple = ()   # uncond evaluations per step (batched calls)
    backward_per_step: tuple = ()     # backward passes per step (batched)
    states: Optional[torch.Tensor] = None   # [N+1, B, ...] sampler states in sampling order: states[k] at
    #                                         sigmas[k]; states[0] = pivot noise, states[N] = reconstruction
    options: Optional[NullTextOptions] = None

    @property
    def steps(self) -> int:
        return int(self.sigmas.shape[0]) - 1

    @property
    def x0(self) -> Optional[torch.Tensor]:
        """The sampler's reconstruction x_0 (None when nothing was sampled, as for NPI)."""
        return None if self.states is None else self.states[-1]

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

    def step_for_sigma(self, sigma: float, rtol: float = 1e-4) -> int:
        """The sampling step k whose evaluations are at ``sigma`` (sigmas[k] == sigma to ``rtol``)."""
        lv = self.sigmas[:-1].to(torch.float64)
        d = (lv - float(sigma)).abs()
        k = int(d.argmin())
        if float(d[k]) > rtol * max(abs(float(sigma)), 1e-12):
            raise NullTextError(f"sigma {float(sigma):.6g} is not a level of this schedule "
                                f"({[round(v, 6) for v in lv.tolist()]}); sample with the pivot's sigmas")
        return k

    def embedding_for_sigma(self, sigma: float, rtol: float = 1e-4) -> torch.Tensor:
        return self.embeddings[self.step_for_sigma(sigma, rtol)]


# ---------------------------------------------------------------------------------------------- helpers
def guided(cond_fn: CondFn, uncond_fn: UncondFn, emb: torch.Tensor, cfg: float) -> Callable:
    """``model_fn(x, sigma)`` = D_u + cfg (D_c - D_u) with a fixed negative ``emb`` (for ``methods.sample``)."""
    def fn(x, sigma):
        Dc = cond_fn(x, sigma).to(torch.float32)
        Du = uncond_fn(x, sigma, emb).to(torch.float32)
        return _combine(Du, Dc, float(cfg))
    return fn


def _combine(Du: torch.Tensor, Dc: torch.Tensor, w: float) -> torch.Tensor:
    """The guided prediction; the one expression both the optimiser and the replay use."""
    return Du + w * (Dc - Du)


def _batch_rows(emb: torch.Tensor, B: int, what: str) -> torch.Tensor:
    if not isinstance(emb, torch.Tensor) or emb.ndim < 1:
        raise NullTextError(f"{what} must be a tensor with a leading batch dimension (e.g. [1, tokens, dim])")
    if emb.shape[0] == B:
        return emb
    if emb.shape[0] == 1:
        return emb.expand(B, *emb.shape[1:])
    raise NullTextError(f"{what} has batch {emb.shape[0]} but the latent batch is {B}: pass one row "
                        f"(shared start) or {B} rows (one per sample)")


def _pivot_levels(pivot: Trajectory) -> list:
    if not isinstance(pivot, Trajectory):
        raise NullTextError("pivot must be a Trajectory (the CFG-1 inversion, e.g. methods.invert(...))")
    if pivot.steps < 1:
        raise NullTextError("the pivot has no step; invert with steps >= 1")
    return [float(v) for v in pivot.sigmas.tolist()]


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.ndim - 1)))


_INFERENCE_HINT = (
    "uncond_fn computed with tensors created under torch.inference_mode() (ComfyUI runs nodes in inference "
    "mode, so a model loaded there has inference-tensor weights), and autograd cannot save them for the "
    "backward pass. The adapter must run the model with normal tensors: e.g. (re)load / cast its weights "
    "inside torch.inference_mode(False), or clone the affected parameters.")


# ---------------------------------------------------------------------------------------------- null-text
def optimize(pivot: Trajectory, cond_fn: CondFn, uncond_fn: UncondFn, null0: torch.Tensor,
             opts: NullTextOptions = NullTextOptions(), *, input_scale: Optional[Callable[[float], float]] = None,
             progress: Optional[Progress] = None, check_interrupt: Optional[Callable[[], None]] = None,
             device: Optional[torch.device] = None,
             store_device: Optional[torch.device] = None) -> NullTextResult:
    """Null-text inversion of ``pivot`` at guidance ``opts.cfg`` (see the module docstring).

    ``null0``: the initial negative embedding (an empty prompt's encoding), leading dim 1 or B.
    ``input_scale``: c_in(sigma) of the loss (default ``methods.default_input_scale(pivot.family)``).
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
    w = float(opts.cfg)
    iters = int(opts.iterations)
    total = N * (iters + 1)

    with torch.inference_mode(False), torch.no_grad():
        # private, normal (non-inference) copies: nothing the caller holds is ever touched
        e_cur = rows0.detach().to(dev, torch.float32).clone()
        x = pivot.states[N].detach().to(dev, torch.float32).clone()
        states, embs, losses, used_all = [x], [], [], []
        n_cond, n_unc, n_bwd = [], [], []
        for k in range(N):
            i = N - k
            s, t = sig[i], sig[i - 1]
            target = pivot.states[i - 1].detach().to(dev, torch.float32).clone()
            scale = float(cin(t))
            thr = opts.threshold(k, N)
            if check_interrupt is not None:
                check_interrupt()
            Dc = cond_fn(x, s).detach().to(torch.float32).clone()
            e = e_cur.clone().requires_grad_(True)
            adam = torch.optim.Adam([e], lr=opts.lr(k, N))
            done = torch.zeros(B, dtype=torch.bool, device=dev)
            used = torch.zeros(B, dtype=torch.long, device=dev)
            loss_k = torch.zeros(B, dtype=torch.float64, device=dev)
            x_next = torch.zeros_like(x)
            e_fin = e_cur.clone()
            unc = bwd = 0
            for j in range(iters + 1):
                last = j == iters
                if check_interrupt is not None:
                    check_interrupt()
                with torch.set_grad_enabled(not last):
                    try:
                        Du = uncond_fn(x, s, e if not last else e.detach()).to(torch.float32)
                    except RuntimeError as err:
                        if "Inference tensors cannot be saved for backward" in str(err):
                            raise RuntimeError(_INFERENCE_HINT) from err
                        raise
                    D = _combine(Du, Dc, w)
                    xp = ddim_step(x, D, s, t)
                    per = ((xp - target) * scale).pow(2).flatten(1).mean(1)        # [B] per-sample loss
                unc += 1
                per_d = per.detach()
                if not bool(torch.isfinite(per_d).all()):
                    bad = [b for b in range(B) if not math.isfinite(float(per_d[b]))]
                    raise FloatingPointError(
                        f"null-text step {k} (sigma {s:.4g}), iteration {j}: the loss of sample(s) {bad} is not "
                        "finite; the model's prediction overflowed (run it in float32) or the learning rate is too "
                        "large for it (lower learning_rate)")
                newly = ~done & ((per_d <= thr) | last)
                if bool(newly.any()):
                    xm = _rows(newly, x)
                    x_next = torch.where(xm, xp.detach(), x_next)
                    e_fin = torch.where(_rows(newly, e_fin), e.detach(), e_fin)
                    loss_k = torch.where(newly, per_d.to(torch.float64), loss_k)
                    done = done | newly
                if progress is not None:
                    progress(k * (iters + 1) + j, total, xp.detach(), D.detach())
                if bool(done.all()):
                    break
                # one backward pass through the unconditional branch, w.r.t. the embedding only
                active = ~done
                with torch.enable_grad():
                    (g,) = torch.autograd.grad(per.sum(), [e])
                bwd += 1
                e.grad = torch.where(_rows(active, g), g, torch.zeros_like(g))
                adam.step()
                e.grad = None
                e.copy_(torch.where(_rows(done, e), e_fin, e))    # finished samples stay frozen
                used = used + active.long()
                del per, xp, D, Du, g
            x = x_next
            e_cur = e_fin
            states.append(x)
            embs.append(e_fin)
            losses.append(loss_k)
            used_all.append(used)
            n_cond.append(1)
            n_unc.append(unc)
            n_bwd.append(bwd)
            del adam, e

        return NullTextResult(
            method="null_text",
            embeddings=torch.stack(embs).to(out_dev),
            sigmas=torch.tensor(sig[::-1], dtype=torch.float32),
            cfg=w,
            losses=torch.stack(losses).to(out_dev),
            iterations=torch.stack(used_all).to(out_dev),
            nfe_cond_per_step=tuple(n_cond), nfe_uncond_per_step=tuple(n_unc), backward_per_step=tuple(n_bwd),
            states=torch.stack(states).to(out_dev),
            options=opts,
        )


# ---------------------------------------------------------------------------------------------- NPI
def negative_prompt_embeddings(pivot: Trajectory, source_emb: torch.Tensor) -> NullTextResult:
    """Negative-prompt inversion: every step's negative := the source prompt's embedding (no optimisation).

    The guided prediction D_u + w (D_c - D_u) then equals D_c at any w: sampling at any CFG is the CFG-1
    sampler of the pivot. Returned in the same form as :func:`optimize` (embeddings [N, B, *emb] in sampling
    order; zero evaluations; ``losses`` NaN and ``states`` None: nothing was evaluated), so the same
    downstream code replays both. ``source_emb``: leading dim 1 or B.
    """
    sig = _pivot_levels(pivot)
    N, B = pivot.steps, pivot.batch_size
    with torch.inference_mode(False), torch.no_grad():
        rows = _batch_rows(source_emb, B, "source_emb").detach().to(torch.float32)
        embs = rows.unsqueeze(0).expand(N, *rows.shape).clone()
        return NullTextResult(
            method="negative_prompt", embeddings=embs, sigmas=torch.tensor(sig[::-1], dtype=torch.float32),
            cfg=None, losses=torch.full((N, B), float("nan"), dtype=torch.float64, device=embs.device),
            iterations=torch.zeros(N, B, dtype=torch.long, device=embs.device),
            nfe_cond_per_step=(0,) * N, nfe_uncond_per_step=(0,) * N, backward_per_step=(0,) * N,
        )


def embeddings_for(mode: str, pivot: Trajectory, cond_fn: CondFn, uncond_fn: UncondFn, null0: torch.Tensor,
                   source_emb: Optional[torch.Tensor] = None, opts: NullTextOptions = NullTextOptions(),
                   **kw) -> NullTextResult:
    """One entry point for the adapter: ``mode`` "null_text" (``optimize``) or "negative_prompt" (NPI)."""
    if mode == "null_text":
        return optimize(pivot, cond_fn, uncond_fn, null0, opts, **kw)
    if mode == "negative_prompt":
        if source_emb is None:
            raise NullTextError("negative_prompt mode needs source_emb (the positive prompt's embedding)")
        return negative_prompt_embeddings(pivot, source_emb)
    raise NullTextError(f"mode must be one of {MODES}; got {mode!r}")


# ---------------------------------------------------------------------------------------------- replay
def sample_with_embeddings(start: Union[Trajectory, torch.Tensor], sigmas: Optional[torch.Tensor],
                           cond_fn: CondFn, uncond_fn: UncondFn,
                           embeddings: Union[torch.Tensor, Sequence[torch.Tensor], NullTextResult], cfg: float, *,
                           progress: Optional[Progress] = None, device: Optional[torch.device] = None,
                           return_states: bool = False):
    """Deterministic DDIM sampling where step k uses its own negative ``embeddings[k]``.

    ``start``: a Trajectory (start from its noise, ``sigmas`` None or its sampling schedule) or a state
    tensor at ``sigmas[0]`` (``sigmas`` descending, N+1 levels). ``embeddings``: [N, B, ...], a sequence of
    N tensors, or a :class:`NullTextResult`. Step k: D = D_u(x, sigmas[k]; embeddings[k]) + cfg (D_c - D_u),
    x <- ddim_step(x, D, sigmas[k], sigmas[k+1]): exactly the optimiser's step, so replaying a null-text
    result reproduces its reconstruction. 2 evaluations per step, no grad. Returns x_0 (float32), or the
    states [N+1, B, ...] in sampling order with ``return_states``.
    """
    if isinstance(embeddings, NullTextResult):
        embeddings = embeddings.embeddings
    if isinstance(start, Trajectory):
        own = start.sampling_sigmas()
        if sigmas is not None and not torch.allclose(sigmas.reshape(-1).float().cpu(), own.float(), rtol=1e-6):
            raise NullTextError("sigmas differ from the trajectory's schedule; pass sigmas=None")
        sig = [float(v) for v in own.tolist()]
        x0 = start.noise
    else:
        if sigmas is None:
            raise NullTextError("sampling from a state tensor needs its (descending) sigmas")
        sig = [float(v) for v in sigmas.reshape(-1).tolist()]
        x0 = start
    N = len(sig) - 1
    if N < 1 or any(b >= a for a, b in zip(sig, sig[1:], strict=False)):
        raise NullTextError("sampling sigmas must be strictly decreasing with at least 2 levels")
    if len(embeddings) != N:
        raise NullTextError(f"{len(embeddings)} embeddings for {N} steps: pass one per sampling step")
    dev = torch.device(device) if device is not None else x0.device
    w = float(cfg)
    with torch.no_grad():
        x = x0.detach().to(dev, torch.float32).clone()
        out = [x]
        for k in range(N):
            s, t = sig[k], sig[k + 1]
            Dc = cond_fn(x, s).to(torch.float32)
            Du = uncond_fn(x, s, embeddings[k].to(dev)).to(torch.float32)
            D = _combine(Du, Dc, w)
            x = ddim_step(x, D, s, t)
            out.append(x)
            if progress is not None:
                progress(k, N, x, D)
        return torch.stack(out) if return_states else x
