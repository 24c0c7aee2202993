"""Trainer of the scenes SD1.5-format model (CPU-first, seeded, resumable): reuses the learned model's pipeline.

* VAE: ComfyUI's TAESD (:func:`ddiminv_dev.learned.train.new_taesd`), *initialised from the learned model's
  committed VAE* and fine-tuned on 32x32 crops of rendered training scenes (L1 + MSE), then calibrated to
  SD1.5's latent scale (:func:`ddiminv_dev.learned.train.calibrate_vae` logic, on scenes).
* UNet: the learned model's low-rank SD1.x UNet (:mod:`ddiminv_dev.learned.lowrank`, one level, 320 channels,
  cross-attention to 768-d CLIP-L tokens), *initialised from the learned model's committed factors* (rank
  extended from 14 to :data:`RANK` with zero ``B`` columns, so the start is exactly that model), trained by
  denoising score matching (eps, MSE) on ComfyUI's SD15 schedule, conditioned on the per-token CLIP-L
  encodings (the seeded random CLIP-L of :mod:`ddiminv_dev.tiny_checkpoint`) of the scene captions, 10 % empty.

Data: a fixed seeded set of training captions (:func:`training_captions`: every one-object caption, plus
``N2`` two-object and ``N3`` three-object ones, never a held-out colour x shape pair), each rendered in several
random layouts; the pool of latents and the caption encodings are computed once and cached (git-ignored,
``.cache/scenes/``). Encoding a caption with the 123M-parameter CLIP-L costs ~1 s on a busy 2-core CPU, which is
why the caption set is fixed and small; a later run can grow it (a new ``captions_seed``/``N2``/``N3``).

Resumable: the fp16 EMA weights are written every ``save_minutes`` (and at the end) with the iteration count in
their metadata, with a git-ignored full state (raw weights, EMA, optimiser, RNG) next to them; a new run with
the same ``out_dir`` continues from the full state if present, else from the fp16 weights. Learning rates are
constant after a warm-up, so a run split over sessions trains like one run.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from .. import training
from ..learned import train as LT
from . import render as R

VAE_SEED = 2001
UNET_SEED = 2002
CAPTIONS_SEED = 2003
RANK = 20
N2, N3 = 60, 20  # small because each new caption costs ~1-7 s of CLIP-L on the shared CPU
VAE_ITERS = 200
LAYOUTS = (8, 6, 5)  # layouts per one-, two-, three-object caption
VAE_FILE = "vae.safetensors"
UNET_FILE = "unet_lowrank.safetensors"
CACHE_VERSION = "1"


_log = training.log_line
_meta = training.meta


def cache_dir() -> Path:
    from ddiminv_dev.paths import CACHE
    d = CACHE / "scenes"
    d.mkdir(parents=True, exist_ok=True)
    return d


# ------------------------------------------------------------------------------------------------ data
def training_captions(seed: int = CAPTIONS_SEED, n2: int = N2, n3: int = N3) -> list[list]:
    """[[pairs, background], ...]: all one-object captions, then n2 two- and n3 three-object ones (seeded,
    distinct, never a held-out pair)."""
    rng = np.random.default_rng(int(seed))
    pairs = R.allowed_pairs("train")
    out = [[[p], b] for p in pairs for b in R.BACKGROUNDS]
    for n, count in ((2, n2), (3, n3)):
        seen = set()
        while len(seen) < count:
            ps = tuple(pairs[int(i)] for i in rng.integers(0, len(pairs), n))
            b = R.BACKGROUNDS[int(rng.integers(0, len(R.BACKGROUNDS)))]
            if (ps, b) not in seen:
                seen.add((ps, b))
                out.append([list(ps), b])
    return out


def render_pool(captions, layouts=LAYOUTS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, SIZE, SIZE, 3], caption index [N]): ``layouts[k-1]`` random training layouts per caption."""
    rng = np.random.default_rng(int(seed))
    ims, idx = [], []
    for i, (pairs, b) in enumerate(captions):
        for _ in range(layouts[len(pairs) - 1]):
            ims.append(R.render(R.layout(rng, [tuple(p) for p in pairs], b, "train")).image)
            idx.append(i)
    return np.stack(ims), np.asarray(idx, np.int64)


def load_clip():
    """ComfyUI's CLIP object of the tiny checkpoint (the seeded random CLIP-L every SD1.5 model here carries)."""
    from ddiminv_dev import tiny_checkpoint
    from ddiminv_dev.host import import_comfy
    import_comfy()
    import comfy.sd
    return comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint.tiny_checkpoint_path()), output_vae=False,
                                                 output_clip=True, output_model=False)[1]


def encode_texts(texts, log=None) -> torch.Tensor:
    """CLIP-L encodings [len(texts), 77, 768] (float16) exactly as ``CLIPTextEncode`` computes them, cached per
    text on disk (so growing the caption set costs only the new captions)."""
    from ddiminv_dev import tiny_checkpoint
    path = cache_dir() / f"contexts-clip{tiny_checkpoint.VERSION}-seed{tiny_checkpoint.SEED}.pt"
    return torch.stack(encode_cached(texts, path, load_clip, lambda cond, pooled: cond[0], log))


def encode_cached(texts, path: Path, load, pick, log=None) -> list:
    """``[pick(cond, pooled) for each text]`` (float16, CPU) of the CLIP object ``load()`` exactly as
    ``CLIPTextEncode`` computes ``cond, pooled``, cached per text in ``path`` (the CLIP is loaded only when a text
    is missing)."""
    from ddiminv_dev.cache import file_lock, torch_save_atomic

    def read():
        return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else {}

    store = read()
    if any(t not in store for t in texts):
        with file_lock(path):  # another process may be encoding the same texts: take turns, then read again
            store = read()
            missing = [t for t in dict.fromkeys(texts) if t not in store]
            if missing:
                clip = load()
                t0 = time.perf_counter()
                with torch.no_grad():
                    for j, t in enumerate(missing):
                        cond, pooled = clip.encode_from_tokens(clip.tokenize(t), return_pooled=True)
                        store[t] = pick(cond, pooled).to(torch.float16).cpu()
                        if (j + 1) % 50 == 0 or j + 1 == len(missing):
                            torch_save_atomic(store, path)
                            _log(log, f"clip: {j + 1}/{len(missing)} captions encoded "
                                      f"({time.perf_counter() - t0:.0f}s)")
    return [store[t] for t in texts]


# ------------------------------------------------------------------------------------------------ VAE
def learned_vae_path() -> Path:
    from ddiminv_dev.learned.build import VAE_FILE as LV, WEIGHTS
    return WEIGHTS / LV


@torch.no_grad()
def calibrate(m, images: np.ndarray, scale_factor: float = LT.SD15_LATENT_SCALE, shift_factor: float = 0.0) -> None:
    """Set ``vae_scale``/``vae_shift`` so that the raw latents of ``images`` have what the model's latent format
    maps to std 1, mean 0: ``(raw - shift_factor) * scale_factor`` (SD1.5: 0.18215, 0; SD3: 1.5305, 0.0609)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    z = torch.cat([m.taesd_encoder(x[i:i + 64]) for i in range(0, len(x), 64)])
    scale = float(z.std()) * scale_factor
    m.vae_scale.fill_(scale)
    m.vae_shift.fill_(shift_factor - float(z.mean()) / scale)


def train_vae(out_dir, iterations: int, seed: int = VAE_SEED, batch: int = 16, size: int = 32, lr: float = 3e-4,
              n_scenes: int = 600, save_minutes: float = 4.0, log=None, init=None, file: str = VAE_FILE,
              latent_format=(LT.SD15_LATENT_SCALE, 0.0), init_name: str = "learned VAE") -> Path:
    """Fine-tune the TAESD on scene crops, up to ``iterations`` in all (resumes from ``out_dir/<file>`` when it
    exists; else starts from ``init()`` (a TAESD module), by default the learned model's VAE), calibrated to
    ``latent_format`` (:func:`calibrate`'s scale and shift factors)."""
    out = Path(out_dir) / file
    start = 0
    if out.exists():
        start = int(_meta(out).get("iterations", 0))
        m = LT.load_taesd(out).train()
    else:
        m = (LT.load_taesd(learned_vae_path()) if init is None else init()).train()
    if start >= iterations:
        return out
    rng = np.random.default_rng(int(seed) + start)
    images = np.stack([R.render(R.sample_scene(rng, "train")).image for _ in range(n_scenes)])
    xs = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    params = list(m.taesd_encoder.parameters()) + list(m.taesd_decoder.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(int(seed) + start)

    def step(it):
        i = torch.randint(0, len(xs), (batch,), generator=g)
        oy, ox = torch.randint(0, xs.shape[-1] - size + 1, (2,), generator=g).tolist()
        return LT.taesd_step(m, opt, xs[i][:, :, oy:oy + size, ox:ox + size])

    def save(it, run):
        with torch.no_grad():
            calibrate(m, images[:256], *latent_format)
        LT.save(LT.vae_state_dict(m), out, {"iterations": it, "seed": seed, "init": init_name})

    training.loop(step, start, iterations, opt=opt, lr_at=training.warmup(lr, 50, start), name="vae", log=log,
                  t0=time.perf_counter(), save=save, log_every=50, save_minutes=save_minutes, decay=(0.98, 0.02))
    return out


# ------------------------------------------------------------------------------------------------ UNet
def extend_rank(sd: dict, rank: int, seed: int) -> dict:
    """Low-rank factors padded to ``rank``: new ``A`` rows random (N(0, 1/fan_in)), new ``B`` columns zero,
    so ``B @ A`` (the model) is unchanged."""
    g = torch.Generator().manual_seed(int(seed))
    out = {}
    for k, v in sd.items():
        v = v.float()
        if k.endswith("A.weight") and v.shape[0] < rank:
            extra = torch.randn((rank - v.shape[0],) + tuple(v.shape[1:]), generator=g) / float(np.sqrt(v[0].numel()))
            v = torch.cat([v, extra])
        elif k.endswith("B.weight") and v.shape[1] < rank:
            v = torch.cat([v, torch.zeros((v.shape[0], rank - v.shape[1]) + tuple(v.shape[2:]))], dim=1)
        out[k] = v
    return out


def _pool_key(vae_path: Path, captions, latent_format=None) -> str:
    h = hashlib.sha256(Path(vae_path).read_bytes())
    h.update(json.dumps([captions, list(LAYOUTS), CACHE_VERSION, R.VERSION]).encode())
    if latent_format is not None:
        h.update(json.dumps(list(latent_format)).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def latent_pool(vae_path, captions, log=None, latent_format=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(model-space latents [N, C, SIZE/8, SIZE/8], caption index [N]) of the rendered pool; cached per VAE,
    captions and latent format: model space is ``raw * 0.18215`` (SD1.5, the default) or, with
    ``latent_format=(scale_factor, shift_factor)``, ``(raw - shift_factor) * scale_factor`` (SD3's)."""
    from ddiminv_dev.cache import file_lock, torch_save_atomic
    path = cache_dir() / f"pool-{_pool_key(vae_path, captions, latent_format)}.pt"
    if not path.exists():
        with file_lock(path):  # one process encodes the pool; another asking meanwhile waits and reads it
            if not path.exists():
                torch_save_atomic(_encode_pool(vae_path, captions, log, latent_format), path)
    d = torch.load(path, map_location="cpu", weights_only=True)
    return d["latents"], d["index"]


def _encode_pool(vae_path, captions, log, latent_format) -> dict:
    t0 = time.perf_counter()
    images, index = render_pool(captions)
    _log(log, f"pool: {len(images)} scenes rendered ({time.perf_counter() - t0:.0f}s)")
    m = LT.load_taesd(vae_path)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    z = torch.cat([m.encode(x[i:i + 64] * 2 - 1) for i in range(0, len(x), 64)])
    z = z * LT.SD15_LATENT_SCALE if latent_format is None else (z - latent_format[1]) * latent_format[0]
    _log(log, f"pool: encoded, std {float(z.std()):.3f} mean {float(z.mean()):.3f} ({time.perf_counter() - t0:.0f}s)")
    return {"latents": z, "index": torch.from_numpy(index)}


def train_unet(out_dir, vae_path, iterations: int, seed: int = UNET_SEED, batch: int = 32, lr: float = 5e-4,
               rank: int = RANK, drop: float = 0.1, ema: float = 0.999, captions=None, save_minutes: float = 4.0,
               log=None, device: str = "cpu", minutes: float | None = None) -> Path:
    """Train the scenes' low-rank UNet up to ``iterations`` in all (eps loss, caption dropout ``drop``, EMA
    ``ema``), on ``device``, or until ``minutes`` of training have passed; saving every ``save_minutes`` and at the
    end: ``out_dir/unet_lowrank.safetensors`` (the fp16 EMA factors, what ships) and ``out_dir/unet_state.pt``
    (model, EMA, optimiser and RNG, to resume exactly; the .gitignore keeps ``ddiminv_dev/scenes/weights/*.pt`` out
    of git). It resumes from the full state when there is one, else from the fp16 weights, else starts from the
    learned model's factors widened to ``rank``."""
    from ddiminv_dev.learned import lowrank
    from ddiminv_dev.learned.build import UNET_FILE as LU, WEIGHTS
    from ddiminv_dev.tiny_checkpoint import UNET_CONFIG
    from safetensors.torch import load_file
    out = Path(out_dir) / UNET_FILE
    captions = training_captions() if captions is None else captions
    texts = [R.caption_of([tuple(p) for p in ps], b) for ps, b in captions] + [""]
    t0 = time.perf_counter()
    ms = LT.sd15_model_sampling()
    contexts = encode_texts(texts, log=log).to(device)
    pool, index = latent_pool(vae_path, captions, log=log)
    empty = len(texts) - 1
    r = training.Resumable(lowrank.build_lowrank_unet(UNET_CONFIG, rank=rank, seed=seed).to(device), out,
                           Path(out_dir) / "unet_state.pt", lr=lr, seed=seed, name="unet", log=log, device=device)

    def init():
        _log(log, "unet: starting from the learned model's factors")
        return extend_rank(load_file(str(WEIGHTS / LU)), rank, seed)

    r.resume(init)
    _log(log, f"unet: pool {tuple(pool.shape)}, {len(texts) - 1} captions ({time.perf_counter() - t0:.0f}s)")
    sigmas = ms.sigmas.float()
    r.train(lambda g: LT.eps_step(r.net, r.opt, r.params, ms, contexts,
                                  LT.draw_batch(g, pool, index, empty, batch, drop, sigmas), device),
            iterations, lr_at=training.warmup(lr, 100), ema=ema, t0=t0, save_minutes=save_minutes, minutes=minutes,
            meta=lambda it, run: {"iterations": it, "seed": seed, "rank": rank, "captions": len(texts) - 1,
                                  "init": "learned model factors", "loss": f"{run:.4f}"})
    return out
