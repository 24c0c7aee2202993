#!/usr/bin/env python3
"""Train the learned tiny SD1.5 model's weights (CPU, seeded): TAESD autoencoder, then the low-rank UNet.

    .venv/bin/python tools/train_learned.py                     # reproduces ddiminv_dev/learned/weights/
    .venv/bin/python tools/train_learned.py --out out/weights --vae-iters 3 --unet-iters 3

Writes ``vae.safetensors`` and ``unet_lowrank.safetensors`` (fp16) into ``--out`` (saved as training goes, so an
interrupted run leaves usable weights). ``--vae-iters 0`` keeps the VAE already in ``--out`` and trains only
the UNet; ``--unet-iters 0`` trains only the VAE. Then ``ddiminv_dev.learned.build.checkpoint_path()`` assembles
the checkpoint from the committed weights (copy new ones into ``ddiminv_dev/learned/weights/``).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    from ddiminv_dev import training
    from ddiminv_dev.learned import train
    from ddiminv_dev.learned.build import WEIGHTS
    ap = training.tool_parser(__doc__, out=WEIGHTS, vae_iters=train.VAE_ITERS, threads=2)
    ap.add_argument("--unet-iters", type=int, default=train.UNET_ITERS)
    ap.add_argument("--seed", type=int, default=train.VAE_SEED, help="VAE seed; the UNet uses seed + 1")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    vae = args.out / "vae.safetensors"
    if args.vae_iters > 0:
        t = time.perf_counter()
        vae = train.train_vae(args.out, iterations=args.vae_iters, seed=args.seed, log=args.log)
        print(f"VAE: {args.vae_iters} iterations in {time.perf_counter() - t:.0f}s -> {vae}")
    elif not vae.exists():
        ap.error(f"--vae-iters 0 needs an existing {vae}")
    if args.unet_iters > 0:
        t = time.perf_counter()
        unet = train.train_unet(args.out, vae, iterations=args.unet_iters, seed=args.seed + 1, log=args.log)
        print(f"UNet: {args.unet_iters} iterations in {time.perf_counter() - t:.0f}s -> {unet}")
    print(f"total {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ddiminv_dev.training import run_tool
    run_tool(main)
