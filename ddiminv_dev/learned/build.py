"""Assemble the learned tiny SD1.5-format checkpoint ``ddiminv-learned-sd15.safetensors`` from the committed
weights (``weights/vae.safetensors``, ``weights/unet_lowrank.safetensors``).

Layout (original single-file SD1.5 layout; ComfyUI's ``CheckpointLoaderSimple`` detects ``SD15`` and returns
MODEL, CLIP and VAE, nothing patched):

* ``model.diffusion_model.*``: the plain ``UNetModel`` (``tiny_checkpoint.UNET_CONFIG``), the low-rank factors
  merged (:func:`.lowrank.merge_state_dict`), fp16;
* ``cond_stage_model.transformer.*``: the seeded random CLIP-L of :mod:`ddiminv_dev.tiny_checkpoint`, copied
  tensor for tensor from that (cached) checkpoint (CLIP weights are never committed);
* ``first_stage_model.taesd_encoder.*``, ``first_stage_model.taesd_decoder.*``, ``first_stage_model.vae_scale``,
  ``first_stage_model.vae_shift``: the trained TAESD.

Built once (process-safe) into ``.cache/models/checkpoints`` (:mod:`ddiminv_dev.cache`); the version is a hash of
the committed weights, the builder version and the tiny CLIP's version, so new weights rebuild it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .. import tiny_checkpoint
from ..cache import cached_build, is_current

CKPT_NAME = "ddiminv-learned-sd15.safetensors"
MODEL_DIR = tiny_checkpoint.MODEL_DIR
WEIGHTS = Path(__file__).resolve().parent / "weights"
VAE_FILE = "vae.safetensors"
UNET_FILE = "unet_lowrank.safetensors"
BUILDER_VERSION = "1"


def weight_paths(weights_dir=None) -> tuple[Path, Path]:
    d = Path(weights_dir) if weights_dir is not None else WEIGHTS
    return d / VAE_FILE, d / UNET_FILE


def version(weights_dir=None) -> str:
    h = hashlib.sha256()
    for p in weight_paths(weights_dir):
        h.update(p.read_bytes())
    return f"b{BUILDER_VERSION}-clip{tiny_checkpoint.VERSION}-{h.hexdigest()[:16]}"


def clip_state_dict() -> dict:
    """The tiny checkpoint's CLIP-L tensors (``cond_stage_model.*``), generating that checkpoint if needed."""
    from safetensors import safe_open
    if not tiny_checkpoint.is_built():  # generating it needs ComfyUI's modules
        from ..host import import_comfy
        import_comfy()
    out = {}
    with safe_open(str(tiny_checkpoint.tiny_checkpoint_path()), framework="pt") as f:
        for k in f.keys():
            if k.startswith("cond_stage_model."):
                out[k] = f.get_tensor(k)
    return out


def build_state_dict(weights_dir=None) -> dict:
    from safetensors.torch import load_file

    from .lowrank import merge_state_dict
    vae_path, unet_path = weight_paths(weights_dir)
    sd = {"model.diffusion_model." + k: v.to(torch.float16).contiguous()
          for k, v in merge_state_dict(load_file(str(unet_path))).items()}
    sd.update(clip_state_dict())
    sd.update({"first_stage_model." + k: v.to(torch.float16).contiguous() for k, v in load_file(str(vae_path)).items()})
    return sd


class Checkpoint:
    """One assembled checkpoint in :data:`MODEL_DIR` (the learned model's, the scenes models'): file ``name``, built
    by ``build(weights_dir)`` from the weights in ``weights_dir`` (default ``weights``), current while
    ``version(weights_dir)`` is what it was built with; ``what`` says what it is in the build log."""

    def __init__(self, name: str, weights: Path, version, build, what: str):
        self.name, self.weights, self.version, self.build, self.what = name, Path(weights), version, build, what

    def checkpoint_path(self, weights_dir=None, path=None) -> Path:
        """Path of the assembled checkpoint (built first if missing or stale). ``weights_dir``/``path`` let tests
        assemble freshly trained weights elsewhere."""
        wd = Path(weights_dir) if weights_dir is not None else self.weights
        path = Path(path) if path is not None else MODEL_DIR / self.name
        return cached_build(path, self.version(wd), lambda: self.build(wd), self.what, seed=0)

    def is_built(self) -> bool:
        return is_current(MODEL_DIR / self.name, self.version(self.weights))

    def register_model_dir(self, weights_dir=None, tag: str = "other") -> Path:
        """Build the checkpoint if needed and add its folder to ComfyUI's "checkpoints" search path (in-process).
        With ``weights_dir`` (e.g. a training run's folder) it is built from those weights, as
        ``<name>-<tag>.safetensors`` (a weights folder used again and again gets its own tag, so that other
        folders do not rebuild over it)."""
        import folder_paths
        path = self.checkpoint_path() if weights_dir is None else self.checkpoint_path(
            weights_dir, MODEL_DIR / self.name.replace(".safetensors", f"-{tag}.safetensors"))
        if str(MODEL_DIR) not in folder_paths.get_folder_paths("checkpoints"):
            folder_paths.add_model_folder_path("checkpoints", str(MODEL_DIR))
        return path


CHECKPOINT = Checkpoint(CKPT_NAME, WEIGHTS, version, build_state_dict,
                        "learned tiny SD1.5-format checkpoint (trained on 15 skimage photos)")
checkpoint_path, is_built = CHECKPOINT.checkpoint_path, CHECKPOINT.is_built
register_model_dir = CHECKPOINT.register_model_dir
