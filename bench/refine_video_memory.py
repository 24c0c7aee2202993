"""Peak memory of VAE Encode (Inversion)'s ``refine`` on a clip, per frame, measured (no timing, no assertion).

    .venv/bin/python bench/refine_video_memory.py            # tiny Wan 2.1 VAE, 64x64 clips of 5, 9, 17 frames
    .venv/bin/python bench/refine_video_memory.py --size 96 --steps 3

Each configuration runs in its own process (so memory freed by an earlier one cannot hide the next one's): boot,
build the tiny Wan 2.1 VAE (``ddiminv_dev/tiny_video_vaes.py``, through ``comfy.sd.VAE``), encode a clip of random
frames, then measure the peak resident memory above the level just before the measured call (``/proc/self/statm``
sampled every 2 ms by a thread: ``bench/vae_encode.py``'s PeakRSS) for

* ``decode``: core ``vae.decode`` of the clip latent (no gradient), the reference;
* ``refine``: the pack's decoder inversion of the whole clip latent (``nodes._comfy_vae_grad.refine``, what the node
  runs: one forward + backward of the decoder over all frames per iteration), decoded whole;
* ``refine windows``: the same in h/w windows (``inversion.refine.windows_for`` with a 4-latent-pixel core and
  2 of margin, so a 64x64 clip gets 4 windows: each still decodes the whole clip in time).

Prints the peak per configuration, per clip frame, and the slope between the shortest and the longest clip (the
bytes one more frame costs), and writes ``bench/out/refine_video_memory.json``. RSS includes what the allocator
keeps; the slope cancels the fixed part.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench import _common as B  # noqa: E402

FRAMES = (5, 9, 17)          # Wan: 1 + 4k frames -> 2, 3, 5 latent frames
CONFIGS = [("decode", 5), ("decode", 17)] + [("refine", f) for f in FRAMES] + [("refine windows", 17)]


def child(mode: str, frames: int, size: int, steps: int) -> dict:
    B.boot()
    B.set_threads(1)
    import torch
    from bench.vae_encode import PeakRSS
    from ddiminv_dev.tiny_video_vaes import tiny_video_vae
    VG, R = B.pack("nodes._comfy_vae_grad"), B.pack("inversion.refine")
    vae = tiny_video_vae("wan21", 0)
    img = torch.rand(frames, size, size, 3, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        z = vae.encode(img)
    windows = None
    if mode == "refine windows":
        windows = R.windows_for(int(z.shape[-2]), int(z.shape[-1]), 4, 2)
    if mode == "decode":
        with torch.inference_mode(), PeakRSS() as p:
            vae.decode(z)
    else:
        with torch.inference_mode(), PeakRSS() as p:
            VG.refine(vae, z, img.unsqueeze(0), steps=steps, lr=R.DEFAULT_LR, anchor=R.DEFAULT_ANCHOR,
                      valid_hw=(size, size), windows=windows)
    return {"mode": mode, "frames": frames, "latent": list(z.shape), "windows": len(windows) if windows else 0,
            "peak_above_bytes": int(p.above)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64, help="frame height and width in pixels (default 64)")
    ap.add_argument("--steps", type=int, default=2, help="refine iterations (memory is per iteration; default 2)")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "FRAMES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], int(args.child[1]), args.size, args.steps)))
        return
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for mode, frames in CONFIGS:
        cmd = [sys.executable, __file__, "--size", str(args.size), "--steps", str(args.steps), "--child", mode,
               str(frames)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)  # noqa: S603
        row = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))[7:])
        rows.append(row)
        win = f", {row['windows']} windows" if row["windows"] else ""
        print(f"{mode:15s} {frames:3d} frames of {args.size}x{args.size} (latent {tuple(row['latent'])}{win}): "
              f"peak {row['peak_above_bytes'] / 2**20:7.2f} MiB above the start = "
              f"{row['peak_above_bytes'] / frames / 2**10:8.1f} KiB per frame", flush=True)
    by = {(r["mode"], r["frames"]): r["peak_above_bytes"] for r in rows}
    lo, hi = FRAMES[0], FRAMES[-1]
    slope = {m: (by[(m, hi)] - by[(m, lo)]) / (hi - lo) for m in ("decode", "refine")}
    px = args.size * args.size
    print(f"one more frame ({lo} -> {hi} frames): refine {slope['refine'] / 2**10:.1f} KiB "
          f"({slope['refine'] / px:.0f} B per pixel), decode {slope['decode'] / 2**10:.1f} KiB "
          f"({slope['decode'] / px:.0f} B per pixel): refine / decode {slope['refine'] / slope['decode']:.2f}x; "
          f"windows at {hi} frames: {by[('refine windows', hi)] / by[('refine', hi)]:.2f}x the whole decode's peak")
    out = B.write_json("refine_video_memory.json", {"size": args.size, "steps": args.steps, "rows": rows,
                                                    "slope_bytes_per_frame": slope, "machine": B.machine()})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
