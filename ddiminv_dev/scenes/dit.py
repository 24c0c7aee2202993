"""The scenes world on a flow DiT: an SD3-format MMDiT (ComfyUI ``supported_models.SD3``: rectified flow, shift 3)
conditioned through CLIP-L alone, with a 16-channel TAESD (development tooling, not the pack; issue 32).

* DiT: ComfyUI's own ``OpenAISignatureMMDITWrapper`` (the class ``model_base.SD3`` runs), depth :data:`DEPTH`
  (hidden 64 x depth, depth heads of 64, depth joint blocks: what ``model_detection`` reads back from
  ``x_embedder``), patch 2, a fixed 2-D sin-cos position table :data:`POS_MAX` x :data:`POS_MAX` (latents up to
  32x32, 256 px). Its big linears are low-rank (:func:`ddiminv_dev.learned.lowrank.make_lowrank_`, rank
  :data:`RANK`), merged when the checkpoint is assembled. It is trained with 768-wide context and pooled
  embedders (CLIP-L's widths); the shipped file has SD3's 4096 / 2048 (clip_l + clip_g + T5 widths) with the
  extra input columns zero, which is exact: ComfyUI's ``SD3ClipModel`` with ``clip_l`` only pads the tokens with
  zeros to 4096 and the pooled vector with 1280 zeros (``comfy/text_encoders/sd3_clip.py``).
* Text: the seeded random CLIP-L of :mod:`ddiminv_dev.tiny_checkpoint` (the SD1.5 scenes model's), but run as
  SD3 runs it: penultimate hidden layer, no final norm, pooled without projection. Encodings come from ComfyUI's
  own SD3 text encoder (``load_text_encoder_state_dicts(..., CLIPType.SD3)``, what ``CLIPLoader`` type ``sd3``
  does), so training sees exactly what ``CLIPTextEncode`` gives the loaded checkpoint.
* VAE: ComfyUI's TAESD with 16 latent channels (core's ``VAE`` reads the channels from
  ``taesd_decoder.1.weight``), started from the SD1.5 scenes model's 4-channel TAESD (each channel repeated
  four times in the encoder, averaged in the decoder, so the start decodes what that VAE decodes) and fine-tuned
  on scene crops, calibrated to SD3's latent format (``(raw - 0.0609) * 1.5305`` has std 1, mean 0).

Loss: rectified flow (:func:`ddiminv_dev.learned.train.flow_step`, velocity ``noise - x0``) at sigmas drawn from
SD3's own shifted schedule (``ModelSamplingDiscreteFlow`` shift 3), captions dropped 10 % of the time.
The checkpoint is assembled by :mod:`.build_dit`; the trainer CLI is ``tools/train_scenes_dit.py``.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import training
from ..learned import lowrank
from ..learned import train as LT
from . import train as ST

DEPTH = 4
RANK = 32
PATCH = 2
POS_MAX = 16
CLIP_WIDTH = 768
SD3_CONTEXT, SD3_POOLED = 4096, 2048
SD3_LATENT = (1.5305, 0.0609)   # comfy.latent_formats.SD3 scale_factor, shift_factor
VAE_SEED = 3201
DIT_SEED = 3202
VAE_ITERS = 200
VAE_FILE = "vae16.safetensors"
DIT_FILE = "dit_lowrank.safetensors"
STATE_FILE = "dit_state.pt"


def config(context: int = CLIP_WIDTH, pooled: int = CLIP_WIDTH, depth: int = DEPTH) -> dict:
    """``MMDiT`` keyword arguments: the training module's (768-wide embedders) or, with ``context=4096,
    pooled=2048``, exactly what ``model_detection`` reads back from the shipped state dict."""
    hidden = 64 * depth
    return {"in_channels": 16, "out_channels": 16, "patch_size": PATCH, "depth": depth, "input_size": None,
            "adm_in_channels": pooled,
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": context, "out_features": hidden}},
            "num_patches": POS_MAX * POS_MAX, "pos_embed_max_size": POS_MAX, "pos_embed_scaling_factor": None,
            "x_block_self_attn_layers": []}


def pos_embed(hidden: int, size: int = POS_MAX) -> torch.Tensor:
    """SD3's fixed 2-D sin-cos position table [1, size*size, hidden] (ComfyUI's own generator)."""
    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed
    return torch.from_numpy(get_2d_sincos_pos_embed(hidden, size)).float().unsqueeze(0)


def _zero_layers(net) -> set:
    """adaLN-Zero: every modulation output and the final linear start at zero (each block starts as identity)."""
    return {n for n, _ in net.named_modules() if n.endswith("adaLN_modulation.1") or n == "final_layer.linear"}


def build_dit(rank: int = RANK, seed: int = DIT_SEED, depth: int = DEPTH, zero_init: bool = True):
    """The training DiT (float32, CPU): ComfyUI's SD3 MMDiT class with 768-wide embedders, big linears low-rank.
    ``zero_init=False`` leaves the adaLN-Zero layers random too (a network that is not the identity from the
    start, for tests of what it computes)."""
    from ddiminv_dev.host import import_comfy
    import_comfy()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper
    net = OpenAISignatureMMDITWrapper(**config(depth=depth), dtype=torch.float32, device=torch.device("cpu"),
                                      operations=comfy.ops.disable_weight_init)
    lowrank.make_lowrank_(net, rank, seed, _zero_layers(net) if zero_init else set())
    net.pos_embed.copy_(pos_embed(64 * depth))
    return net


def load_dit(sd: dict):
    """A training DiT (float32, eval) with the low-rank weights ``sd`` (rank and depth read from them)."""
    rank = next(v.shape[0] for k, v in sd.items() if k.endswith(".A.weight"))
    net = build_dit(rank=rank, seed=0, depth=sd["x_embedder.proj.weight"].shape[0] // 64)
    net.load_state_dict({k: v.float() for k, v in sd.items()})
    return net.eval()


def shipped_state_dict(sd: dict) -> dict:
    """The SD3 diffusion-model state dict (float32) of low-rank DiT weights ``sd``: factors merged
    (:func:`~ddiminv_dev.learned.lowrank.merge_state_dict`), the context and pooled embedders widened to SD3's
    4096 / 2048 inputs with zero columns (inputs SD3ClipModel zero-pads when only clip_l is loaded)."""
    out = lowrank.merge_state_dict(sd)
    for key, width in (("context_embedder.weight", SD3_CONTEXT), ("y_embedder.mlp.0.weight", SD3_POOLED)):
        w = out[key]
        out[key] = torch.cat([w, torch.zeros(w.shape[0], width - w.shape[1])], dim=1)
    return out


# ------------------------------------------------------------------------------------------------ text
def clip_l_state_dict() -> dict:
    """The seeded CLIP-L (``text_model.*``) of the SD1.5 tiny checkpoint, as a stand-alone clip_l file holds it,
    with an identity ``text_projection`` (SD3 pools without it; present so the loaders do not warn it missing)."""
    from ..learned import build as LB
    pre = "cond_stage_model.transformer."
    sd = {k[len(pre):]: v for k, v in LB.clip_state_dict().items() if k.startswith(pre)}
    sd["text_projection.weight"] = torch.eye(CLIP_WIDTH, dtype=sd["text_model.final_layer_norm.weight"].dtype)
    return sd


def load_sd3_clip():
    """ComfyUI's SD3 text encoder with clip_l only (what CLIPLoader type ``sd3`` builds from a clip_l file)."""
    from ddiminv_dev.host import import_comfy
    import_comfy()
    import comfy.sd
    return comfy.sd.load_text_encoder_state_dicts([clip_l_state_dict()], clip_type=comfy.sd.CLIPType.SD3)


def encode_texts(texts, log=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [N, 77, 768], pooled [N, 768]) float16: the clip_l part of what ``CLIPTextEncode`` gives SD3 with
    clip_l only (the rest is zeros), cached per text on disk."""
    from ddiminv_dev import tiny_checkpoint
    path = ST.cache_dir() / f"contexts-sd3l-clip{tiny_checkpoint.VERSION}-seed{tiny_checkpoint.SEED}.pt"

    def pick(cond, pooled):
        if cond.shape[-1] != SD3_CONTEXT or cond[..., CLIP_WIDTH:].any() or pooled[..., CLIP_WIDTH:].any():
            raise RuntimeError("SD3's clip_l-only text encoder no longer zero-pads clip_l to 4096 / 2048")
        # [78, 768]: the 77 tokens, then the pooled vector
        return torch.cat([cond[0, :, :CLIP_WIDTH], pooled[0, :CLIP_WIDTH].unsqueeze(0)])

    both = torch.stack(ST.encode_cached(texts, path, load_sd3_clip, pick, log))
    return both[:, :-1], both[:, -1]


# ------------------------------------------------------------------------------------------------ VAE
def vae16_from_scenes(noise: float = 1e-3, seed: int = VAE_SEED):
    """A 16-channel TAESD that starts as the SD1.5 scenes model's committed 4-channel one: the encoder's last conv
    repeated four times (plus ``noise`` to break the symmetry), the decoder's first conv repeated and divided by
    four (so four equal copies decode as the original)."""
    from .build import WEIGHTS
    src = LT.load_taesd(WEIGHTS / ST.VAE_FILE)
    m = LT.new_taesd(seed, latent_channels=16)
    sd = src.state_dict()
    g = torch.Generator().manual_seed(int(seed))
    last = f"taesd_encoder.{len(src.taesd_encoder) - 1}"
    for k in (f"{last}.weight", f"{last}.bias"):
        v = sd[k].repeat((4,) + (1,) * (sd[k].ndim - 1))
        sd[k] = v + noise * v.abs().mean() * torch.randn(v.shape, generator=g)
    sd["taesd_decoder.1.weight"] = sd["taesd_decoder.1.weight"].repeat(1, 4, 1, 1) / 4
    m.load_state_dict(sd)
    return m


def train_vae(out_dir, iterations: int = VAE_ITERS, log=None, **kw) -> Path:
    """The scenes TAESD trainer (:func:`ddiminv_dev.scenes.train.train_vae`) on the 16-channel start, calibrated to
    SD3's latent format; writes ``out_dir/vae16.safetensors``."""
    return ST.train_vae(out_dir, iterations, seed=kw.pop("seed", VAE_SEED), log=log, init=vae16_from_scenes,
                        file=VAE_FILE, latent_format=SD3_LATENT, init_name="scenes VAE x4 channels", **kw)


# ------------------------------------------------------------------------------------------------ DiT
def sd3_model_sampling():
    """ComfyUI's own SD3 model sampling (CONST, discrete flow, shift 3, multiplier 1000)."""
    from ddiminv_dev.host import import_comfy
    import_comfy()
    import comfy.model_base
    import comfy.supported_models
    cfg = comfy.supported_models.SD3(config(SD3_CONTEXT, SD3_POOLED))
    return comfy.model_base.model_sampling(cfg, comfy.model_base.ModelType.FLOW)


def train_dit(out_dir, vae_path, iterations: int, seed: int = DIT_SEED, batch: int = 32, lr: float = 5e-4,
              rank: int = RANK, drop: float = 0.1, ema: float = 0.999, captions=None, save_minutes: float = 4.0,
              log=None, device: str = "cpu", minutes: float | None = None) -> Path:
    """Train the scenes DiT up to ``iterations`` in all (flow loss, caption dropout ``drop``, EMA ``ema``), on
    ``device``, or until ``minutes`` of training have passed; saving every ``save_minutes`` and at the end:
    ``out_dir/dit_lowrank.safetensors`` (fp16 EMA factors, what ships, the iteration count in its metadata) and
    ``out_dir/dit_state.pt`` (model, EMA, optimiser and RNG, to resume exactly). Resumes from the full state when
    there is one, else from the fp16 weights, else starts from :func:`build_dit`'s seeded init. The batch stream
    is :func:`ddiminv_dev.learned.train.draw_batch`'s, so a run split anywhere trains like one run."""
    out = Path(out_dir) / DIT_FILE
    captions = ST.training_captions() if captions is None else captions
    texts = [ST.R.caption_of([tuple(p) for p in ps], b) for ps, b in captions] + [""]
    t0 = time.perf_counter()
    ms = sd3_model_sampling()
    contexts, pooled = (t.to(device) for t in encode_texts(texts, log=log))
    pool, index = ST.latent_pool(vae_path, captions, log=log, latent_format=SD3_LATENT)
    empty = len(texts) - 1
    r = training.Resumable(build_dit(rank=rank, seed=seed).to(device), out, Path(out_dir) / STATE_FILE, lr=lr,
                           seed=seed, name="dit", log=log, device=device)
    r.resume()
    n = sum(p.numel() for p in r.params) / 1e6
    training.log_line(log, f"dit: pool {tuple(pool.shape)}, {len(texts) - 1} captions, {n:.2f}M parameters "
                           f"({time.perf_counter() - t0:.0f}s)")
    sigmas = ms.sigmas.float()
    r.train(lambda g: LT.flow_step(r.net, r.opt, r.params, ms, contexts, pooled,
                                   LT.draw_batch(g, pool, index, empty, batch, drop, sigmas), device),
            iterations, lr_at=training.warmup(lr, 100), ema=ema, t0=t0, save_minutes=save_minutes, minutes=minutes,
            meta=lambda it, run: {"iterations": it, "seed": seed, "rank": rank, "depth": DEPTH,
                                  "captions": len(texts) - 1, "loss": f"{run:.4f}"})
    return out


# ------------------------------------------------------------------------------------------------ stand-in
def untrained_weights(out_dir=None, seed: int = DIT_SEED, n_scenes: int = 16) -> Path:
    """A folder of seeded, untrained weights in the committed layout (default ``.cache/scenes/dit-untrained-<seed>``;
    written once): the 16-channel TAESD as training starts it (:func:`vae16_from_scenes` without noise, so it
    decodes what the SD1.5 scenes VAE decodes), calibrated to SD3's latent format on ``n_scenes`` training scenes,
    and the DiT at its seeded init with the adaLN-Zero layers random too (``zero_init=False``: it predicts
    velocities of the size of its input, not zero). For plumbing before the DiT is trained (``bench/edit.py``'s
    DiT rows, their smoke test): the DiT's numbers mean nothing."""
    from ..cache import file_lock
    d = Path(out_dir) if out_dir is not None else ST.cache_dir() / f"dit-untrained-{seed}"
    if (d / VAE_FILE).exists() and (d / DIT_FILE).exists():
        return d
    with file_lock(d):  # parallel test workers: one writes the folder, another waits and finds it
        if not ((d / VAE_FILE).exists() and (d / DIT_FILE).exists()):
            _write_untrained(d, seed, n_scenes)
    return d


def _write_untrained(d: Path, seed: int, n_scenes: int) -> None:
    import numpy as np

    from ..training import fp16, save_weights
    rng = np.random.default_rng(int(seed))
    images = np.stack([ST.R.render(ST.R.sample_scene(rng, "train")).image for _ in range(n_scenes)])
    with torch.no_grad():
        vae = vae16_from_scenes(noise=0.0, seed=VAE_SEED)
        ST.calibrate(vae, images, *SD3_LATENT)
    save_weights(LT.vae_state_dict(vae), d / VAE_FILE, {"iterations": 0, "seed": VAE_SEED, "init": "untrained"})
    net = build_dit(seed=seed, zero_init=False)
    save_weights(fp16(net.state_dict()), d / DIT_FILE, {"iterations": 0, "seed": seed, "rank": RANK, "depth": DEPTH})
