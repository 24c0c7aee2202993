"""Trainers of the learned model (CPU-first, seeded): the TAESD autoencoder, then the low-rank UNet.

``train_vae`` fits ComfyUI's own TAESD encoder/decoder (``comfy.taesd.taesd``) on 32x32 random training crops
(fully convolutional: it is used on 64x64) with L1 + MSE, Adam and a cosine learning rate, then calibrates
``vae_scale``/``vae_shift`` so that ComfyUI's ``encode`` gives SD1.5-scale raw latents (std 1/0.18215, mean 0).

``train_unet`` fits the low-rank SD1.x UNet (:mod:`.lowrank`) by denoising score matching (eps-prediction,
MSE) on ComfyUI's SD15 discrete schedule, on a pool of model-space latents of training crops (encoded once
with the trained encoder), conditioned on cached CLIP-L encodings of the captions (10 % empty prompt).

Both write fp16 safetensors (``vae.safetensors``, ``unet_lowrank.safetensors``) into ``out_dir`` every
``save_every`` iterations and at the end, so a partial run leaves usable weights. ComfyUI must be importable
(:func:`ddiminv_dev.host.import_comfy`).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import training
from ..training import log_line as _log, save_weights as save
from . import data

SD15_LATENT_SCALE = 0.18215
VAE_SEED = 1201
UNET_SEED = 1202
VAE_ITERS = 3000
UNET_ITERS = 2000


def new_taesd(seed: int, latent_channels: int = 4):
    """ComfyUI's TAESD module, seeded torch-default init (ComfyUI's ops skip initialisation); 4 latent channels
    (SD1.5's) or 16 (SD3's, the scenes DiT's)."""
    from ddiminv_dev.host import import_comfy
    import_comfy()
    import comfy.taesd.taesd as taesd
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        m = taesd.TAESD(latent_channels=latent_channels)
        for mod in m.modules():
            if isinstance(mod, torch.nn.Conv2d):
                torch.nn.Conv2d.reset_parameters(mod)
    return m.float()


def vae_state_dict(m) -> dict:
    return {k: v.detach().to(torch.float16).contiguous() for k, v in m.state_dict().items()}


@torch.no_grad()
def calibrate_vae(m, per_class: int = 24, seed: int = 5) -> None:
    """Set ``vae_scale``/``vae_shift`` so that ``m.encode`` gives raw latents with std 1/0.18215 and mean 0
    (over ``per_class`` 64x64 training crops of every photo)."""
    x, _ = data.train_crops(per_class, seed)
    z = torch.cat([m.taesd_encoder(x[i:i + 60]) for i in range(0, len(x), 60)])
    scale = float(z.std()) * SD15_LATENT_SCALE
    m.vae_scale.fill_(scale)
    m.vae_shift.fill_(-float(z.mean()) / scale)


def _cosine(iters: int, lr: float, warmup: int = 50, floor: float = 0.02):
    """Learning rate per iteration: linear warm-up over ``warmup``, then cosine down to ``floor * lr``."""
    def at(it):
        if it < warmup:
            f = (it + 1) / warmup
        else:
            f = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (it - warmup) / max(iters - warmup, 1)))
        return lr * f
    return at


def taesd_step(m, opt, x) -> float:
    """One optimiser step of the TAESD ``m``'s reconstruction loss (L1 + MSE) on images ``x``; returns the loss."""
    y = m.taesd_decoder(m.taesd_encoder(x))
    loss = F.l1_loss(y, x) + F.mse_loss(y, x)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def train_vae(out_dir, iterations: int = VAE_ITERS, seed: int = VAE_SEED, batch: int = 16, size: int = 32,
              lr: float = 1e-3, save_every: int = 200, calib_per_class: int = 24, log=None) -> Path:
    """Train the TAESD autoencoder; writes ``out_dir/vae.safetensors`` (fp16, ComfyUI TAESD keys)."""
    out = Path(out_dir) / "vae.safetensors"
    m = new_taesd(seed)
    params = list(m.taesd_encoder.parameters()) + list(m.taesd_decoder.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    sampler = data.CropSampler(size, seed)

    def save_vae(it, run):
        calibrate_vae(m, calib_per_class)
        save(vae_state_dict(m), out, {"iterations": it, "of": iterations, "seed": seed,
                                      "wall_s": round(time.perf_counter() - t0, 1)})

    t0 = time.perf_counter()
    training.loop(lambda it: taesd_step(m, opt, sampler.batch(batch)[0]), 0, iterations, opt=opt,
                  lr_at=_cosine(iterations, lr), name="vae", log=log, t0=t0, save=save_vae, log_every=50,
                  save_every=save_every, decay=(0.98, 0.02))
    return out


def load_taesd(path):
    """A float32 TAESD module with the weights of ``vae.safetensors`` (its latent channels read from them, as
    core's VAE class reads them)."""
    from safetensors.torch import load_file
    sd = load_file(str(path))
    m = new_taesd(0, latent_channels=sd["taesd_decoder.1.weight"].shape[1])
    m.load_state_dict({k: v.float() for k, v in sd.items()})
    return m.eval()


# ----------------------------------------------------------------------------------------------- the UNet
def sd15_model_sampling():
    """ComfyUI's own SD15 model sampling (EPS, discrete scaled-linear 0.00085..0.012, 1000 steps)."""
    from ddiminv_dev.host import import_comfy
    import_comfy()
    import comfy.model_base
    import comfy.supported_models
    from ddiminv_dev.tiny_checkpoint import UNET_CONFIG
    cfg = comfy.supported_models.SD15(dict(UNET_CONFIG))
    return comfy.model_base.model_sampling(cfg, comfy.model_base.ModelType.EPS)


def caption_contexts() -> torch.Tensor:
    """CLIP-L encodings [len(CAPTIONS) + 1, 77, 768] of every caption and (last) of the empty prompt "", made
    by ComfyUI's CLIP object loaded from a checkpoint carrying the seeded CLIP-L of
    :mod:`ddiminv_dev.tiny_checkpoint` (the learned checkpoint carries the same tensors), exactly as
    ``CLIPTextEncode`` computes them. Cached on disk (git-ignored) per CLIP version."""
    from ddiminv_dev import tiny_checkpoint
    from ddiminv_dev.paths import CACHE
    path = CACHE / "learned" / f"contexts-clip{tiny_checkpoint.VERSION}-seed{tiny_checkpoint.SEED}.pt"
    texts = list(data.CAPTIONS) + [""]
    from ddiminv_dev.cache import file_lock, torch_save_atomic
    with file_lock(path):  # parallel test workers: one encodes, the other waits and reads
        return _caption_contexts(path, texts, tiny_checkpoint.tiny_checkpoint_path, torch_save_atomic)


def _caption_contexts(path, texts, checkpoint, save) -> torch.Tensor:
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("texts") == texts:
            return saved["cond"]
    from ddiminv_dev.host import import_comfy
    import_comfy()
    import comfy.sd
    clip = comfy.sd.load_checkpoint_guess_config(str(checkpoint()), output_vae=False, output_clip=True,
                                                 output_model=False)[1]
    conds = []
    with torch.no_grad():
        for t in texts:
            cond, _pooled = clip.encode_from_tokens(clip.tokenize(t), return_pooled=True)
            conds.append(cond[0].float().cpu())
    cond = torch.stack(conds)
    save({"texts": texts, "cond": cond}, path)
    return cond


@torch.no_grad()
def latent_pool(vae_path, n_per_class: int = 320, seed: int = 11, batch: int = 64):
    """Model-space latents (raw ComfyUI TAESD latent * 0.18215) of random training crops (with flips).

    Returns (latents [N, 4, 8, 8], labels [N])."""
    m = load_taesd(vae_path)
    x, labels = data.train_crops(n_per_class, seed)
    z = torch.cat([m.encode(x[i:i + batch] * 2 - 1) for i in range(0, len(x), batch)])
    return z * SD15_LATENT_SCALE, labels


def unet_state_dict(unet) -> dict:
    return {k: v.detach().to(torch.float16).contiguous() for k, v in unet.state_dict().items()}


def draw_batch(g: torch.Generator, pool, index, empty: int, batch: int, drop: float, sigmas):
    """One eps-training batch drawn from ``g`` in a fixed order, on the CPU (the same stream on any device):
    latents, caption indices (``empty`` with probability ``drop``), sigmas, noise."""
    idx = torch.randint(0, len(pool), (batch,), generator=g)
    x0, cls = pool[idx], index[idx].clone()
    cls[torch.rand(batch, generator=g) < drop] = empty
    sigma = sigmas[torch.randint(0, len(sigmas), (batch,), generator=g)]
    eps = torch.randn(x0.shape, generator=g)
    return x0, cls, sigma, eps


def eps_step(unet, opt, params, ms, contexts, drawn, device: str = "cpu") -> float:
    """One optimiser step of the eps-prediction MSE on ``drawn`` (:func:`draw_batch`), gradients clipped to norm
    1; returns the loss."""
    x0, cls, sigma, eps = drawn
    xc = ms.calculate_input(sigma, x0 + eps * sigma.view(-1, 1, 1, 1))
    pred = unet(xc.to(device), ms.timestep(sigma).float().to(device), context=contexts[cls.to(device)].float())
    loss = F.mse_loss(pred, eps.to(device))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return float(loss.detach())


def flow_step(net, opt, params, ms, contexts, pooled, drawn, device: str = "cpu") -> float:
    """One optimiser step of the rectified-flow (velocity) MSE on ``drawn`` (:func:`draw_batch`; its ``eps`` is
    the noise), for a CONST (flow) model sampling ``ms`` such as SD3's: the input is ComfyUI's own
    ``noise_scaling`` (``sigma * noise + (1 - sigma) * x0``), the target the velocity ``noise - x0`` (what
    ComfyUI's CONST ``calculate_denoised`` inverts: ``x0 = x - sigma * v``); conditioned on ``contexts[cls]``
    (cross tokens) and ``pooled[cls]`` (the ``y`` vector); gradients clipped to norm 1; returns the loss."""
    x0, cls, sigma, eps = drawn
    xt = ms.noise_scaling(sigma, eps, x0)
    cls = cls.to(device)
    pred = net(ms.calculate_input(sigma, xt).to(device), ms.timestep(sigma).float().to(device),
               context=contexts[cls].float(), y=pooled[cls].float())
    loss = F.mse_loss(pred, (eps - x0).to(device))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return float(loss.detach())


def ema_update(avg: dict, model, ema: float, it: int) -> None:
    """``avg`` <- the EMA of ``model``'s floating-point state (decay warmed up: min(ema, (1+it)/(10+it)))."""
    with torch.no_grad():
        d = min(ema, (1 + it) / (10 + it))
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                avg[k].mul_(d).add_(v.detach(), alpha=1 - d)


def train_unet(out_dir, vae_path, iterations: int = UNET_ITERS, seed: int = UNET_SEED, batch: int = 64,
               lr: float = 1e-3, rank: int | None = None, drop: float = 0.1, ema: float = 0.999,
               n_per_class: int = 320, save_every: int = 500, log=None) -> Path:
    """Train the low-rank UNet (eps-prediction, MSE); writes ``out_dir/unet_lowrank.safetensors`` (fp16 EMA
    weights of the factors and the small full layers)."""
    from ddiminv_dev.tiny_checkpoint import UNET_CONFIG

    from . import lowrank
    rank = lowrank.RANK if rank is None else rank
    out = Path(out_dir) / "unet_lowrank.safetensors"
    t0 = time.perf_counter()
    ms = sd15_model_sampling()
    contexts = caption_contexts()
    pool, labels = latent_pool(vae_path, n_per_class=n_per_class)
    _log(log, f"unet: pool {tuple(pool.shape)} std {float(pool.std()):.3f} mean {float(pool.mean()):.3f} "
              f"({time.perf_counter() - t0:.0f}s)")
    r = training.Resumable(lowrank.build_lowrank_unet(UNET_CONFIG, rank=rank, seed=seed), out, None, lr=lr,
                           seed=seed, name="unet", log=log)
    r.resume(weights=False)  # always a fresh run (the cosine schedule spans ``iterations``)
    sigmas = ms.sigmas.float()
    empty = len(data.CAPTIONS)
    r.train(lambda g: eps_step(r.net, r.opt, r.params, ms, contexts,
                               draw_batch(g, pool, labels, empty, batch, drop, sigmas)),
            iterations, lr_at=_cosine(iterations, lr, warmup=200), ema=ema, t0=t0, log_every=100,
            save_every=save_every,
            meta=lambda it, run: {"iterations": it, "of": iterations, "seed": seed, "rank": rank,
                                  "wall_s": round(time.perf_counter() - t0, 1)})
    return out
