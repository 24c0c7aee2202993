#!/usr/bin/env python3
"""Train the scenes flow DiT's weights (SD3 format; CPU, seeded, resumable, one thread): 16-channel TAESD, then
the DiT.

    nice -n 19 .venv/bin/python tools/train_scenes_dit.py --threads 1 --log out/train_scenes_dit.log  # continue
    .venv/bin/python tools/train_scenes_dit.py --out out/d --vae-iters 2 --dit-iters 2 --n2 2 --n3 1  # smoke
    nice -n 10 .venv/bin/python tools/train_scenes_dit.py --bench 10   # seconds per DiT iteration (writes nothing)

The first line trains (or continues) the weights in ``ddiminv_dev/scenes/weights_dit/``. The VAE is trained first
(to ``--vae-iters``, from the SD1.5 scenes model's VAE widened to 16 channels), then frozen: once DiT weights
exist the tool refuses to train the VAE further (that would invalidate the DiT). ``--vae-iters``/``--dit-iters``
are totals: a run whose ``--out`` already holds weights trained for k iterations continues from k (from the full
state ``dit_state.pt`` when present, else from the fp16 weights). Weights are saved every ``--save-minutes`` and
at the end, so stopping the process at any time loses only minutes; ``--minutes`` ends a run after that much DiT
training (saved). See ``ddiminv_dev/scenes/dit.py`` and ``docs/scenes_dit.md``; the checkpoint is assembled by
``ddiminv_dev.scenes.build_dit``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    from ddiminv_dev.scenes import dit, train
    from ddiminv_dev.scenes.build_dit import WEIGHTS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae-iters", type=int, default=dit.VAE_ITERS)
    ap.add_argument("--dit-iters", type=int, default=20000)
    ap.add_argument("--out", type=Path, default=WEIGHTS)
    ap.add_argument("--n2", type=int, default=train.N2, help="two-object training captions")
    ap.add_argument("--n3", type=int, default=train.N3, help="three-object training captions")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rank", type=int, default=dit.RANK, help="rank of the DiT's low-rank linears (fresh runs)")
    ap.add_argument("--save-minutes", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log", default=None, help="also append the progress lines to this file")
    ap.add_argument("--minutes", type=float, default=None,
                    help="stop the DiT after this many minutes of training (saved; the next run resumes)")
    ap.add_argument("--device", default="cpu",
                    help="torch device of the DiT training (e.g. cuda); the VAE trains on the CPU")
    ap.add_argument("--bench", type=int, default=0, metavar="N",
                    help="only time N DiT iterations at --batch/--rank on a stand-in pool of the real shapes "
                         "(16x16x16 latents, 77x768 tokens) and print the seconds per iteration; writes nothing")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    if args.bench:
        return bench(args.bench, args.batch, args.rank, args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dit_file, vae_file = args.out / dit.DIT_FILE, args.out / dit.VAE_FILE
    if dit_file.exists() and vae_file.exists():
        done = int(train._meta(vae_file).get("iterations", 0))
        if args.vae_iters > done:
            ap.error(f"the DiT in {args.out} was trained on the latents of the VAE at {done} iterations; training "
                     f"the VAE further would invalidate it: pass --vae-iters {done} (or move {dit_file.name} away to "
                     "retrain the DiT from its seeded start)")
    vae = dit.train_vae(args.out, iterations=args.vae_iters, save_minutes=args.save_minutes, log=args.log)
    print(f"VAE: {args.vae_iters} iterations ({time.perf_counter() - t0:.0f}s) -> {vae}")
    if args.dit_iters > 0:
        caps = train.training_captions(n2=args.n2, n3=args.n3)
        out = dit.train_dit(args.out, vae, iterations=args.dit_iters, batch=args.batch, rank=args.rank,
                            captions=caps, save_minutes=args.save_minutes, log=args.log, device=args.device,
                            minutes=args.minutes)
        print(f"DiT: {train._meta(out).get('iterations')} of {args.dit_iters} iterations -> {out}")
    print(f"total {time.perf_counter() - t0:.0f}s")
    return 0


def bench(n: int, batch: int, rank: int, device: str) -> int:
    import statistics

    import torch

    from ddiminv_dev.learned import train as LT
    from ddiminv_dev.scenes import dit
    g = torch.Generator().manual_seed(0)
    pool, index = torch.randn(64, 16, 16, 16, generator=g), torch.arange(64) % 8
    ctx, pooled = torch.randn(9, 77, 768, generator=g).to(device), torch.randn(9, 768, generator=g).to(device)
    ms = dit.sd3_model_sampling()
    net = dit.build_dit(rank=rank).to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4)
    times = []
    for _ in range(n + 1):   # the first iteration (allocation, warm-up) is not counted
        t = time.perf_counter()
        LT.flow_step(net, opt, params, ms, ctx, pooled, LT.draw_batch(g, pool, index, 8, batch, 0.1,
                                                                      ms.sigmas.float()), device)
        times.append(time.perf_counter() - t)
    times = times[1:]
    print(f"DiT rank {rank} ({sum(p.numel() for p in params) / 1e6:.2f}M parameters), batch {batch}, "
          f"{torch.get_num_threads()} thread(s), {device}: {statistics.median(times):.2f} s/iteration "
          f"(median of {n}; {min(times):.2f}-{max(times):.2f})")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    raise SystemExit(main())
