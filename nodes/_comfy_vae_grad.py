"""The adapter's autograd half, VAE side: a differentiable ``decode`` of a ComfyUI VAE for decoder inversion
(``inversion/refine.py``), with ComfyUI's model loading, progress bar, live preview and interrupt.

ComfyUI objects read: a ``comfy.sd.VAE`` (``first_stage_model.decode``, ``process_output``, ``vae_dtype``,
``device``, ``patcher``, ``memory_used_decode``, ``disable_offload``). ComfyUI modules used:
``comfy.model_management`` (``load_models_gpu``, ``throw_exception_if_processing_interrupted``), ``comfy.utils``
(``ProgressBar``, ``PROGRESS_BAR_ENABLED``), ``comfy.cli_args`` (``preview_method``, ``preview_size``).

The gradient seam is the null-text node's (``_comfy_grad.autograd_view``): ComfyUI runs nodes under
``torch.inference_mode()``, so the decoder's weights are inference tensors; for the optimisation only, they are
swapped for ordinary tensors aliasing the same storage (nothing copied, nothing requires grad, restored on exit),
and the only leaf that requires grad is the latent offset the optimiser owns. ``vae.decode`` itself is not used
for the gradient path because it writes its output into a preallocated buffer and splits batches by free memory;
the path here is the same computation (``first_stage_model.decode`` in the VAE's dtype on its device, then
``process_output``), so the loss it optimises is exactly the ceiling's pixel error.
"""
from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

import comfy.model_management
import comfy.utils

from ..inversion import refine as R
from ._comfy_grad import autograd_view

# The backward pass keeps the decoder's activations: the memory asked of ComfyUI's loader is this many times
# what it budgets for a plain decode of the same latent (an estimate: saved activations + their gradients;
# ``bench/vae_encode.py --refine N`` prints the measured peak against core VAE Encode).
BACKWARD_MEMORY_FACTOR = 3
PREVIEW_EVERY_S = 0.25   # at most ~4 previews a second (a JPEG encode per preview)


class NotDifferentiable(Exception):
    """The VAE's decoder gives no gradient (message: why)."""


def _module(vae):
    m = getattr(vae, "first_stage_model", None)
    if m is None or not callable(getattr(m, "decode", None)):
        raise NotDifferentiable("the VAE has no decoder module (first_stage_model.decode)")
    return m


def _clamps_affine(vae) -> bool:
    """Whether ``vae.process_output`` is ComfyUI's image default ``clamp((x + 1) / 2, 0, 1)``."""
    x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 3.0])
    try:
        y = vae.process_output(x.clone())
    except Exception:  # noqa: BLE001 - an unusual process_output: treat it as opaque
        return False
    return isinstance(y, torch.Tensor) and torch.equal(y.float(), torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))


def decode_fn(vae, raw: bool = False):
    """``z [N,C,h,w] -> image [N,H,W,3]`` (a video VAE: ``z [N,C,t,h,w] -> clip [N,F,H,W,3]``): ``vae.decode``'s
    computation, differentiable in ``z``. With ``raw`` and
    ComfyUI's default ``process_output`` (``clamp((x + 1) / 2, 0, 1)``), the values before the clamp (the
    optimiser clamps them itself for every measure); any other ``process_output`` is applied as it is."""
    m = _module(vae)
    unclamped = raw and _clamps_affine(vae)

    def decode(z: torch.Tensor) -> torch.Tensor:
        out = m.decode(z.to(device=vae.device, dtype=vae.vae_dtype)).float()
        return ((out + 1.0) / 2.0 if unclamped else vae.process_output(out)).movedim(1, -1)
    return decode


def probe(decode, z0: torch.Tensor) -> None:
    """Raise NotDifferentiable unless a small window of ``z0`` decodes with a gradient (whether it is finite is
    the optimiser's check: a non-finite loss is an error, not a fallback)."""
    win = z0[:1, ..., :8, :8].detach().clone().to(torch.float32).requires_grad_(True)
    try:
        out = decode(win)
    except Exception as e:  # noqa: BLE001 - any failure means: no gradient path through this decoder
        raise NotDifferentiable(f"its decoder failed under autograd ({type(e).__name__}: {e})") from None
    if not isinstance(out, torch.Tensor) or out.grad_fn is None:
        raise NotDifferentiable("its decoder returns no autograd graph (it decodes without gradients)")
    out.float().square().sum().backward()
    if win.grad is None:
        raise NotDifferentiable("its decoder gives no gradient for the latent")


def _preview(decoded: torch.Tensor):
    from PIL import Image
    from comfy.cli_args import LatentPreviewMethod, args
    if getattr(args, "preview_method", None) == LatentPreviewMethod.NoPreviews:
        return None
    img = decoded[0] if decoded.ndim == 4 else decoded[0, 0]      # a clip previews its first frame
    img = img.detach().float().clamp(0, 1).mul(255).to("cpu", torch.uint8).numpy()
    return ("JPEG", Image.fromarray(img), int(getattr(args, "preview_size", 512) or 512))


def refine(vae, z0: torch.Tensor, target: torch.Tensor, *, steps: int, lr: float, anchor: float, valid_hw,
           windows=None, label: str = "VAE refine", loss: str = R.DEFAULT_LOSS) -> R.RefineResult:
    """Decoder inversion through ``vae`` (see ``inversion.refine.refine_latent``) with progress, preview and
    interrupt; raises NotDifferentiable (before any step) when the decoder gives no gradient."""
    comfy.model_management.throw_exception_if_processing_interrupted()
    shape = tuple(z0.shape) if windows is None else tuple(z0.shape[:-2]) + _largest(windows)   # video: keeps T
    try:
        need = vae.memory_used_decode(shape, vae.vae_dtype) * BACKWARD_MEMORY_FACTOR
    except Exception:  # noqa: BLE001 - a VAE without the estimate: let ComfyUI use its minimum
        need = 0
    comfy.model_management.load_models_gpu([vae.patcher], memory_required=need,
                                           force_full_load=getattr(vae, "disable_offload", False))
    module = _module(vae)
    pbar = comfy.utils.ProgressBar(steps)
    bar = tqdm(total=steps, desc=label, leave=True, disable=not comfy.utils.PROGRESS_BAR_ENABLED)
    last = [0.0]

    def on_step(i, total, decoded):
        bar.update(1)
        now = time.perf_counter()
        preview = None
        if decoded is not None and (now - last[0] >= PREVIEW_EVERY_S or i + 1 == total):
            last[0] = now
            preview = _preview(decoded)
        pbar.update_absolute(i + 1, total, preview)
        comfy.model_management.throw_exception_if_processing_interrupted()

    try:
        with torch.inference_mode(False), torch.enable_grad(), autograd_view(module):
            z = z0.detach().clone()          # ordinary tensors: inference tensors cannot enter autograd
            tgt = target.detach().clone()
            decode = decode_fn(vae, raw=loss != "clamped")
            probe(decode, z)
            return R.refine_latent(z, tgt, decode, steps=steps, lr=lr, anchor=anchor, valid_hw=valid_hw,
                                   windows=windows, loss=loss, on_step=on_step)
    finally:
        bar.close()


def _largest(windows) -> tuple:
    return (max(w[1] - w[0] for w in windows), max(w[3] - w[2] for w in windows))


def warn(msg: str) -> None:
    logging.warning("ddim-inversion: %s", msg)
