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

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    from ddiminv_dev.scenes import train
    from ddiminv_dev.scenes.build import WEIGHTS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae-iters", type=int, default=train.VAE_ITERS)
    ap.add_argument("--unet-iters", type=int, default=20000)
    ap.add_argument("--out", type=Path, default=WEIGHTS)
    ap.add_argument("--n2", type=int, default=train.N2, help="two-object training captions")
    ap.add_argument("--n3", type=int, default=train.N3, help="three-object training captions")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--save-minutes", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log", default=None, help="also append the progress lines to this file")
    ap.add_argument("--minutes", type=float, default=None,
                    help="stop the UNet after this many minutes of training (saved; the next run resumes)")
    ap.add_argument("--device", default="cpu",
                    help="torch device of the UNet training (e.g. cuda); the VAE trains on the CPU")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    unet_file, vae_file = args.out / train.UNET_FILE, args.out / train.VAE_FILE
    if unet_file.exists() and vae_file.exists():
        done = int(train._meta(vae_file).get("iterations", 0))
        if args.vae_iters > done:
            ap.error(f"the UNet in {args.out} was trained on the latents of the VAE at {done} iterations; training "
                     f"the VAE further would invalidate it: pass --vae-iters {done} (or move {unet_file.name} away to "
                     "retrain the UNet from the learned model's factors)")
    vae = train.train_vae(args.out, iterations=args.vae_iters, save_minutes=args.save_minutes, log=args.log)
    print(f"VAE: {args.vae_iters} iterations ({time.perf_counter() - t0:.0f}s) -> {vae}")
    if args.unet_iters > 0:
        caps = train.training_captions(n2=args.n2, n3=args.n3)
        unet = train.train_unet(args.out, vae, iterations=args.unet_iters, batch=args.batch, captions=caps,
                                save_minutes=args.save_minutes, log=args.log, device=args.device,
                                minutes=args.minutes)
        print(f"UNet: {args.unet_iters} iterations -> {unet}")
    print(f"total {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    raise SystemExit(main())
