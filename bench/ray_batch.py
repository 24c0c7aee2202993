"""Throughput of tools/ray_batch.py with 1 and 2 actors, and Ray's overhead per item against the plain
one-server client (tools/runner.py), on the same two ComfyUI servers (CPU, the tiny random checkpoint, one torch
thread each), in one process, interleaved rounds.

    .venv/bin/python bench/ray_batch.py                 # 8 images 64x64, invert_and_reconstruct at 10 steps, 2 rounds
    .venv/bin/python bench/ray_batch.py --images 4 --rounds 1 --steps 4   # smoke

Per round: ``plain`` (runner.py on server 1), ``ray1`` (the Ray job, one actor on server 1), ``ray2`` (two
actors, servers 1 and 2); every variant gets a fresh output folder, so nothing is skipped. The servers are started
once and warmed up (checkpoint loaded) before timing; the local Ray is started once, its start timed apart.
Wall times include the actors' start and the results writing. Prints images/min, the 2-vs-1 ratio and the
overhead per item; writes bench/out/ray_batch.json. Timings only, no assertions.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the servers inherit it: one torch thread each on 2 cores
ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "tools")):
    if p not in sys.path:
        sys.path.insert(0, p)
import ray_batch  # noqa: E402
import runner  # noqa: E402
from PIL import Image  # noqa: E402

from ddiminv_dev import tiny_checkpoint  # noqa: E402
from ddiminv_dev.server import start_server  # noqa: E402

WORKFLOW = ROOT / "example_workflows" / "api" / "invert_and_reconstruct.api.json"
OUT = ROOT / "bench" / "out"


def make_images(folder: Path, n: int, size: int = 64) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (size, size), (25 * i % 256, 200 - 10 * i, 90))
        for x in range(0, size, 8):
            for y in range(size):
                im.putpixel((x, y), (255, 255 - 20 * i, 30 * i % 256))
        im.save(folder / f"img{i:03d}.png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    work = OUT / "ray_batch_work"
    shutil.rmtree(work, ignore_errors=True)
    make_images(work / "images", args.images)
    make_images(work / "warm", 1)
    sets = ["--set", f"CheckpointLoaderSimple.ckpt_name={tiny_checkpoint.CKPT_NAME}",
            "--set", f"DDIMInvert.steps={args.steps}"]
    load0 = os.getloadavg()
    t = time.monotonic()
    with ThreadPoolExecutor(2) as ex:
        servers = list(ex.map(lambda _: start_server(), range(2)))
    print(f"two servers up in {time.monotonic() - t:.1f}s", flush=True)
    import ray
    try:
        for i, s in enumerate(servers):  # the checkpoint loads on the first prompt: not timed
            rc = runner.main(["--workflow", str(WORKFLOW), "--images", str(work / "warm"), "--out",
                              str(work / f"warm{i}"), "--server", s.url, *sets])
            assert rc == 0, f"warm-up on {s.url} failed"  # noqa: S101  (a bench that cannot run says so)
        t = time.monotonic()
        ray_batch.init_local(ray, num_cpus=2)
        ray_init = time.monotonic() - t
        common = ["--workflow", str(WORKFLOW), "--images", str(work / "images"), *sets]
        variants = {
            "plain": lambda out: runner.main(common + ["--out", out, "--server", servers[0].url]),
            "ray1": lambda out: ray_batch.main(common + ["--out", out, "--server", servers[0].url]),
            "ray2": lambda out: ray_batch.main(common + ["--out", out, "--server", servers[0].url,
                                                        "--server", servers[1].url]),
        }
        times: dict = {k: [] for k in variants}
        for r in range(args.rounds):
            for name, fn in variants.items():
                t = time.monotonic()
                rc = fn(str(work / f"{name}_{r}"))
                times[name].append(time.monotonic() - t)
                assert rc == 0, f"{name} round {r} failed"  # noqa: S101
                print(f"round {r} {name}: {times[name][-1]:.1f}s", flush=True)
    finally:
        ray.shutdown()
        for s in servers:
            s.stop()
    load1 = os.getloadavg()
    n = args.images
    med = {k: statistics.median(v) for k, v in times.items()}
    per_min = {k: 60 * n / v for k, v in med.items()}
    result = {
        "images": n, "steps": args.steps, "size": 64, "rounds": args.rounds, "cpus": os.cpu_count(),
        "seconds": times, "median_seconds": med, "images_per_minute": per_min,
        "ratio_2_vs_1_actor": per_min["ray2"] / per_min["ray1"],
        "ratio_ray1_vs_plain": per_min["ray1"] / per_min["plain"],
        "ray_overhead_s_per_item": (med["ray1"] - med["plain"]) / n, "ray_init_s": ray_init,
        "loadavg_before": load0, "loadavg_after": load1,
        "command": "bench/ray_batch.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "ray_batch.json").write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(f"\n{n} images, {args.steps} steps, 64x64, medians of {args.rounds} round(s); "
          f"load average before {load0[0]:.1f}, after {load1[0]:.1f} (shared machine)")
    for k in variants:
        print(f"  {k:6s} {med[k]:6.1f}s  {per_min[k]:6.1f} images/min")
    print(f"  2 actors vs 1: x{result['ratio_2_vs_1_actor']:.2f}   Ray 1 actor vs plain client: "
          f"x{result['ratio_ray1_vs_plain']:.2f}   Ray overhead {result['ray_overhead_s_per_item']:+.2f} s/item "
          f"(actor start included; Ray's own start {ray_init:.1f}s, once)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
