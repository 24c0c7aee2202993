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

import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    from ddiminv_dev import training
    from ddiminv_dev.scenes import dit
    from ddiminv_dev.scenes.build_dit import WEIGHTS
    ap = training.tool_parser(__doc__, out=WEIGHTS, vae_iters=dit.VAE_ITERS, threads=1)
    training.add_scenes_args(ap, "DiT", "--dit-iters")
    ap.add_argument("--rank", type=int, default=dit.RANK, help="rank of the DiT's low-rank linears (fresh runs)")
    ap.add_argument("--bench", type=int, default=0, metavar="N",
                    help="only time N DiT iterations at --batch/--rank on a stand-in pool of the real shapes "
                         "(16x16x16 latents, 77x768 tokens) and print the seconds per iteration; writes nothing")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    if args.bench:
        return bench(args.bench, args.batch, args.rank, args.device)
    return training.vae_then_model(
        ap, args, model="DiT", model_file=args.out / dit.DIT_FILE, vae_file=args.out / dit.VAE_FILE,
        fresh="its seeded start", train_vae=dit.train_vae, iters=args.dit_iters,
        train_model=lambda vae, caps: dit.train_dit(
            args.out, vae, iterations=args.dit_iters, batch=args.batch, rank=args.rank, captions=caps,
            save_minutes=args.save_minutes, log=args.log, device=args.device, minutes=args.minutes))


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
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ddiminv_dev.training import run_tool
    run_tool(main)
