"""VAE Encode (Inversion) vs core VAE Encode: time and peak memory, interleaved in one process.

    .venv/bin/python bench/vae_encode.py                 # SD-architecture VAE (random weights), 512x512, CPU
    .venv/bin/python bench/vae_encode.py --size 1024     # the issue's size (slow on a small CPU)
    .venv/bin/python bench/vae_encode.py --full          # also ceiling=full (decodes everything, for reference)
    .venv/bin/python bench/vae_encode.py --quick         # tiny VAE at 128x128, one round: a smoke test (seconds)
    .venv/bin/python bench/vae_encode.py --size 256 --refine 10   # also refine=10 (decoder inversion)

The VAE is ``comfy.sd.VAE`` built from the SD1.x AutoencoderKL config (ch 128, ch_mult 1-2-4-4, 2 res blocks,
the state-dict layout of ``ddiminv_dev/tiny_checkpoint.py``) with seeded random weights: costs are those of the
real architecture, the pictures are meaningless. Variants, called round-robin ``--repeats`` times after a
warm-up: core ``VAEEncode.encode``, our node with the default ``ceiling=sampled`` (and ``ceiling=full`` with
``--full``). Time: wall clock per call. Memory: on CUDA the peak allocated during the call
(``torch.cuda.max_memory_allocated`` after a reset); on CPU the peak resident set size above the level before the
call, sampled every 2 ms by a thread. ``--refine N`` adds our node with ``refine=N`` (decoder inversion; the time of one
refine iteration relative to core VAE Encode is printed too; ``--quick`` runs refine=2).
Prints the medians and the ours/core ratios; writes
``bench/out/vae_encode[_quick].json``. No assertion on timings anywhere.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench import _common as B  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory above the starting level while the block runs (CPU)."""

    def __enter__(self):
        self.start = rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())
        self.above = self.peak - self.start


def sd_vae(quick: bool, seed: int = 0):
    import torch
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from ddiminv_dev.fixtures.preview_nodes import tiny_vae_config
    from ddiminv_dev.tiny_checkpoint import VAE_DDCONFIG
    from ddiminv_dev.tiny_models import seeded_init_
    if quick:
        config = tiny_vae_config()
        model = AutoencoderKL(**config["params"])
    else:
        config = {"params": {"embed_dim": 4, "ddconfig": dict(VAE_DDCONFIG)}}
        model = AutoencoderKL(ddconfig=dict(VAE_DDCONFIG), embed_dim=4)
    seeded_init_(model, seed)
    sd = {k: v.detach().to(torch.float32).clone() for k, v in model.state_dict().items()}
    del model
    return comfy.sd.VAE(sd=sd, config=config, dtype=torch.float32)


def measure(variants: dict, repeats: int, cuda: bool) -> tuple[dict, dict, dict]:
    """Each variant once to warm up, then ``repeats`` rounds: (seconds per round, peak memory above the start
    per round -- CUDA allocator or process RSS --, the last output) per variant."""
    import torch
    times = {k: [] for k in variants}
    mem = {k: [] for k in variants}
    last = {}
    with torch.inference_mode():
        for fn in variants.values():     # warm-up: model load, allocator
            fn()
        for r in range(repeats):
            for k, fn in variants.items():
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    t0 = time.perf_counter()
                    last[k] = fn()
                    torch.cuda.synchronize()
                    times[k].append(time.perf_counter() - t0)
                    mem[k].append(torch.cuda.max_memory_allocated() - base)
                else:
                    with PeakRSS() as p:
                        t0 = time.perf_counter()
                        last[k] = fn()
                        times[k].append(time.perf_counter() - t0)
                    mem[k].append(p.above)
                print(f"round {r + 1}: {k:9s} {times[k][-1]:8.2f} s  peak +{mem[k][-1] / 2**20:8.1f} MiB", flush=True)
    return times, mem, last


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: all)")
    ap.add_argument("--full", action="store_true", help="also measure ceiling=full")
    ap.add_argument("--quick", action="store_true", help="tiny VAE, 128x128, one round (a smoke test)")
    ap.add_argument("--gpu", action="store_true", help="boot ComfyUI on the GPU")
    ap.add_argument("--refine", type=int, default=0, help="also our node with refine=N (decoder inversion)")
    a = ap.parse_args(argv)
    if a.quick:
        a.size, a.repeats, a.refine = 128, 1, a.refine or 2
    nodes = B.boot(cpu=not a.gpu)
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    vae = sd_vae(a.quick)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, a.size, a.size, 3, generator=g)
    core = nodes.NODE_CLASS_MAPPINGS["VAEEncode"]()
    ours = B.pack("nodes.encode").DDIMInvVAEEncode
    cuda = torch.cuda.is_available() and a.gpu
    variants = {"core": lambda: core.encode(vae, pixels),
                "ours": lambda: ours.execute(pixels, vae)}
    if a.full:
        variants["ours_full"] = lambda: ours.execute(pixels, vae, ceiling="full")
    if a.refine:
        variants["ours_refine"] = lambda: ours.execute(pixels, vae, refine=a.refine)
    times, mem, last = measure(variants, a.repeats, cuda)
    med = {k: statistics.median(v) for k, v in times.items()}
    peak = {k: max(v) for k, v in mem.items()}
    lat_core = B.first(last["core"])["samples"]
    lat_ours = B.first(last["ours"])["samples"]
    same = bool(torch.equal(lat_core, lat_ours))
    res = {"size": a.size, "quick": a.quick, "repeats": a.repeats, "device": "cuda" if cuda else "cpu",
           "median_s": med, "peak_bytes": peak, "latent_equal_to_core": same,
           "ratios": {"time ours/core": med["ours"] / med["core"],
                      "memory ours/core": peak["ours"] / max(1, peak["core"])},
           "ceiling_sampled_db": B.first(last["ours"], 1), "machine": B.machine()}
    if a.full:
        res["ratios"]["time ours_full/core"] = med["ours_full"] / med["core"]
        res["ratios"]["memory ours_full/core"] = peak["ours_full"] / max(1, peak["core"])
        res["ceiling_full_db"] = B.first(last["ours_full"], 1)
    if a.refine:
        res["refine"] = a.refine
        res["ratios"]["time ours_refine/core"] = med["ours_refine"] / med["core"]
        res["ratios"]["memory ours_refine/core"] = peak["ours_refine"] / max(1, peak["core"])
        res["ceiling_refined_db"] = B.first(last["ours_refine"], 1)
        res["refine_text"] = last["ours_refine"].ui.as_dict()["text"][0]
    print(f"VAE encode {a.size}x{a.size} ({res['device']}): medians " +
          ", ".join(f"{k} {v:.2f} s" for k, v in med.items()))
    print("ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in res["ratios"].items()))
    print(f"latent identical to core VAE Encode: {same}; vae_ceiling sampled {res['ceiling_sampled_db']:.2f} dB" +
          (f", full {res['ceiling_full_db']:.2f} dB" if a.full else ""))
    if a.refine:
        print(f"refine={a.refine}: vae_ceiling {res['ceiling_refined_db']:.2f} dB; time per refine iteration / core "
              f"VAE Encode {(med['ours_refine'] - med['ours']) / a.refine / med['core']:.2f}x; "
              + res["refine_text"].split("\n")[-1])
    out = B.write_json("vae_encode_quick.json" if a.quick else f"vae_encode_{a.size}.json", res)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
