#!/usr/bin/env python3
"""Train the scenes SD1.5-format model's weights (CPU, seeded, resumable): TAESD fine-tune, then the UNet.

    nice -n 19 .venv/bin/python tools/train_scenes.py --threads 1 --log out/train_scenes.log   # continue
    .venv/bin/python tools/train_scenes.py --out out/w --vae-iters 2 --unet-iters 2 --n2 2 --n3 1  # smoke

The first line continues the committed weights in ``ddiminv_dev/scenes/weights/``. The VAE is trained first (to
``--vae-iters``), then frozen: once UNet weights exist the tool refuses to train the VAE further (that would
invalidate the UNet). ``--vae-iters``/``--unet-iters`` are totals: a run whose ``--out`` already holds weights
trained for k iterations continues from k (from the full state ``unet_state.pt`` when present, else from the
fp16 weights). Weights are saved every ``--save-minutes`` and at the end, so stopping the process at any time
loses only minutes. See ``ddiminv_dev/scenes/train.py``; the checkpoint is assembled by
``ddiminv_dev.scenes.build``.
"""
from __future__ import annotations

import sys
from pathlib import Path


def main(argv=None) -> int:
    from ddiminv_dev import training
    from ddiminv_dev.scenes import train
    from ddiminv_dev.scenes.build import WEIGHTS
    ap = training.tool_parser(__doc__, out=WEIGHTS, vae_iters=train.VAE_ITERS, threads=2)
    training.add_scenes_args(ap, "UNet", "--unet-iters")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    return training.vae_then_model(
        ap, args, model="UNet", model_file=args.out / train.UNET_FILE, vae_file=args.out / train.VAE_FILE,
        fresh="the learned model's factors", train_vae=train.train_vae, iters=args.unet_iters,
        train_model=lambda vae, caps: train.train_unet(
            args.out, vae, iterations=args.unet_iters, batch=args.batch, captions=caps,
            save_minutes=args.save_minutes, log=args.log, device=args.device, minutes=args.minutes))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ddiminv_dev.training import run_tool
    run_tool(main)
