"""Stored trajectory bytes per frame and step for a video, measured on a real inversion, and what that makes of a
5-second clip (no timing, no assertion).

    .venv/bin/python bench/video_memory.py               # tiny Wan 2.1 clip (9 frames, 64x64), 6 steps, ddim + exact
    .venv/bin/python bench/video_memory.py --steps 10

A 9-frame 64x64 clip of random pixels goes through the tiny Wan 2.1 VAE (``ddiminv_dev/tiny_video_vaes.py``,
through ``comfy.sd.VAE``) and DDIM Invert on the tiny Wan 2.1 model (``ddiminv_dev/tiny_families.py``); every
tensor the returned DDIM_TRAJECTORY holds (states, x0 estimates, the exact method's replay pair, sigmas) is
counted. Prints bytes per clip frame and step, the same per latent frame, the formula
``inversion.imaging.trajectory_bytes`` (float32 states [N+1] + x0 estimates [N]) for comparison, and the
extrapolation to a 5-second Wan 2.1 clip (81 frames at 832x480 -> latent [1,16,21,60,104]) at 50 steps, with what
Trajectory Preview's strips cost at keep=8. Writes ``bench/out/video_memory.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench import _common as B  # noqa: E402

CLIP_FRAMES, SIZE = 9, 64
FIVE_S = {"frames": 81, "latent": (1, 16, 21, 60, 104), "pixels": (480, 832), "steps": 50, "keep": 8}


def tensor_bytes(obj) -> int:
    import torch
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(tensor_bytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    B.add_threads_arg(ap)
    args = ap.parse_args()
    B.boot()
    B.set_threads(args.threads)
    import torch
    from ddiminv_dev import tiny_families as tf
    from ddiminv_dev.tiny_video_vaes import tiny_video_vae
    imaging = B.pack("inversion.imaging")
    enc = B.pack("nodes.encode").DDIMInvVAEEncode
    inv = B.pack("nodes.invert").DDIMInvert

    frames = torch.rand(CLIP_FRAMES, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0))
    latent = B.first(enc.execute(frames, tiny_video_vae("wan21")))
    model = tf.tiny_model("WAN21_T2V")
    pos, neg = tf.conditioning("WAN21_T2V", 1), tf.conditioning("WAN21_T2V", 2)
    rows = {}
    for method in ("ddim", "exact"):
        traj = B.first(inv.execute(model, pos, neg, latent, steps=args.steps, cfg=1.0, scheduler="simple",
                                   method=method), 2)
        total = tensor_bytes(traj)
        lat_t = int(traj.states.shape[3])
        formula = imaging.trajectory_bytes(traj.states.shape[1:], traj.steps)
        rows[method] = {"bytes": total, "formula_bytes": formula, "latent": list(traj.states.shape[1:]),
                        "per_frame_step": total / (CLIP_FRAMES * traj.steps),
                        "per_latent_frame_step": total / (lat_t * traj.steps)}
        print(f"{method:5s}: trajectory {total:,} B for latent {tuple(traj.states.shape[1:])}, {traj.steps} steps: "
              f"{total / (CLIP_FRAMES * traj.steps):,.0f} B per clip frame and step "
              f"({total / (lat_t * traj.steps):,.0f} per latent frame and step); states + x0 formula {formula:,} B "
              f"({total / formula:.3f}x)")
    # the 5-second clip: states + x0 estimates at its size, plus what exact holds beyond them (its replay pair and
    # the sigmas), counted in states of the tiny latent and scaled to states of the real one
    small_state = imaging.trajectory_bytes(rows["exact"]["latent"], 0)
    extra_states = (rows["exact"]["bytes"] - rows["exact"]["formula_bytes"]) / small_state
    per_state = imaging.trajectory_bytes(FIVE_S["latent"], 0)
    big = imaging.trajectory_bytes(FIVE_S["latent"], FIVE_S["steps"]) + extra_states * per_state
    print(f"exact holds {extra_states:.2f} states beyond states + x0 estimates (its replay tensors)")
    h, w = FIVE_S["pixels"]
    strip = FIVE_S["keep"] * h * w * 3 * 4
    print(f"5-second Wan 2.1 clip ({FIVE_S['frames']} frames, {w}x{h}, latent {FIVE_S['latent']}), "
          f"{FIVE_S['steps']} steps, exact: {big / 2**20:,.0f} MiB trajectory = {per_state / 2**20:.1f} MiB per "
          f"stored state, {big / (FIVE_S['frames'] * FIVE_S['steps']) / 2**10:.0f} KiB per frame and step; "
          f"Trajectory Preview decode=vae, keep={FIVE_S['keep']}: {strip / 2**20:.1f} MiB per kept state's strip "
          f"(fast: {FIVE_S['keep'] * 60 * 104 * 3 * 4 / 2**10:.0f} KiB)")
    out = B.write_json("video_memory.json", {"clip": [CLIP_FRAMES, SIZE, SIZE], "steps": args.steps, "rows": rows,
                                             "five_second_clip": {**FIVE_S, "trajectory_bytes": big,
                                                                  "state_bytes": per_state, "strip_bytes": strip},
                                             "machine": B.machine()})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
