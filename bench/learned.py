"""Fidelity and editing on the learned tiny model (a network that has learned to denoise), in-process (CPU).

The model: ``ddiminv_dev/learned`` (an SD1.5-format checkpoint this project trains on crops of 15
scikit-image photographs; ``CheckpointLoaderSimple`` loads it unmodified). The images: held-out crops (never
seen in training) of a few photographs, inverted with their own caption. Everything goes through the pack's
nodes and core ComfyUI nodes, called in-process on the real host (``bench/_common.py``).

1. **Round trip** (invert at cfg w, regenerate at cfg w) for steps {10, 25, 50} x cfg {1, 3.5, 7.5}: ddim
   (predicted, destination, current), implicit, exact (BDIA), core FlipSigmas + SamplerCustom(euler). Latent
   round-trip error ||x_rec - x0|| / ||x0|| (model space), pixel PSNR of the decoded result against the
   source image, the VAE ceiling (PSNR of decode(encode(x))), evaluations per inversion step.
2. **Guided reconstruction**: the cfg-1 ddim inversion regenerated at cfg 3.5 / 7.5 with the plain negative,
   null-text (10 iterations/step), negative-prompt inversion and source_drift.
3. **Edits**: the source caption swapped for another photograph's caption at cfg 3.5 / 7.5: plain, source_drift,
   null-text, negative-prompt; *edit success* = the learned classifier (trained on held-out crops) assigns the
   result to the target photograph; *preservation* = PSNR and SSIM of the result against the source.

    .venv/bin/python bench/learned.py            # the whole grid (several minutes on 2 cores)
    .venv/bin/python bench/learned.py --quick    # steps {6}, cfg {1, 7.5}, two images (implicit: max_iters 6)

Writes bench/out/learned.json (learned_quick.json with --quick) and prints the tables (markdown).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import _common as B  # noqa: E402
from ddiminv_dev.counting import Counter  # noqa: E402

SCHED = "ddim_uniform"
SOURCES = ("a cat", "a cup of coffee", "an astronaut", "a rocket")  # held-out crops of these photographs
EDITS = (
    ("a cat", "a cup of coffee"),
    ("a cup of coffee", "a cat"),
    ("an astronaut", "a rocket"),
    ("a rocket", "an astronaut"),
)
OURS = [
    ("ddim/predicted", dict(method="ddim", eval_sigma="predicted")),
    ("ddim/destination", dict(method="ddim", eval_sigma="destination")),
    ("ddim/current", dict(method="ddim", eval_sigma="current")),
    ("implicit", dict(method="implicit", tolerance=1e-6, max_iters=12, restarts=2)),
    ("exact", dict(method="exact")),
]
# --quick: the implicit solver with half the per-step budget (its row runs, restarts included; at cfg 7.5 it does
# not converge and spent ~31 evaluations a step, 29% of the smoke run's time, on a row the smoke test reads nothing
# from; its convergence is tested in tests/unit/test_implicit.py)
QUICK_IMPLICIT = dict(max_iters=6)
CORE = "core FlipSigmas+euler"
NULLTEXT = dict(iterations=10, learning_rate=0.01, early_stop=1e-5)


class Setup:
    def __init__(self, sources):
        import torch
        from ddiminv_dev.learned import build, data

        B.boot(cpu=True)
        build.register_model_dir()
        self.data = data
        self.model, self.clip, self.vae = B.call("CheckpointLoaderSimple", build.CKPT_NAME)[:3]
        self.counter = Counter(self.model)
        self.m = self.counter.model
        self.fmt = self.model.model.latent_format
        self.pixels = torch.cat([data.demo_image(c) for c in sources])  # [K, 64, 64, 3]
        enc = B.pack("nodes.encode").DDIMInvVAEEncode.execute(self.pixels, self.vae)
        self.latent, self.ceiling = B.first(enc, 0), float(B.first(enc, 1))
        self.x0 = self.fmt.process_in(self.latent["samples"].double())
        self.empty = self.encode([""] * len(sources))
        self.prompts = {}
        # the source-side work of guided(): the cfg-1 pivot and the optimised negatives depend on the sources,
        # steps and cfg only, not on the target captions, so the edit part reuses what the reconstruction part
        # computed (same inputs, same result) and charges its evaluations and seconds again
        self.source_side = {}

    def encode(self, texts):
        """One CONDITIONING with a batch entry per text (what the nodes take for a batch of latents)."""
        import torch

        conds = [B.first(B.call("CLIPTextEncode", self.clip, t))[0] for t in texts]
        extras = (
            {"pooled_output": torch.cat([c[1]["pooled_output"] for c in conds])}
            if "pooled_output" in conds[0][1]
            else {}
        )
        return [[torch.cat([c[0] for c in conds]), extras]]

    def cond(self, texts):
        key = tuple(texts)
        if key not in self.prompts:
            self.prompts[key] = self.encode(list(texts))
        return self.prompts[key]

    def decode(self, samples):
        return B.first(B.call("VAEDecode", self.vae, {"samples": samples}))

    def scores(self, samples, target=None) -> dict:
        """Latent error vs the source, PSNR / SSIM of the decoded image, classifier verdicts."""
        import numpy as np
        import torch
        from skimage.metrics import structural_similarity
        from ddiminv_dev.learned import classifier

        x = self.fmt.process_in(samples.double())
        err = float((x - self.x0).norm() / self.x0.norm()) if torch.isfinite(x).all() else float("nan")
        img = self.decode(samples).float().clamp(0, 1)
        mse = float(((img - self.pixels.float()) ** 2).mean())
        ssim = float(
            np.mean(
                [
                    structural_similarity(a, b, channel_axis=2, data_range=1.0)
                    for a, b in zip(img.numpy(), self.pixels.float().numpy(), strict=True)
                ]
            )
        )
        out = {"latent_rel_error": err, "psnr_db": 100.0 if mse <= 1e-10 else -10 * math.log10(mse), "ssim": ssim}
        pred = classifier.predict(img.movedim(-1, 1))
        if target is not None:
            want = np.array([self.data.caption_index(t) for t in target])
            out["edit_success"] = float((pred == want).mean())
        return out


def invert(S, pos, neg, steps, cfg, **kw):
    S.counter.take()
    out = B.pack("nodes.invert").DDIMInvert.execute(S.m, pos, neg, S.latent, steps, cfg, SCHED, **kw)
    return B.first(out, 0), B.first(out, 2), S.counter.take()


def sample(S, pos, neg, traj, cfg, **kw):
    return B.first(B.pack("nodes.sampler").DDIMInvSampler.execute(S.m, pos, neg, traj, cfg, **kw))["samples"]


def round_trip(S, sources, steps_list, cfgs, log, methods=OURS) -> list:
    rows = []
    pos, neg = S.cond(sources), S.empty

    def row(method, steps, cfg, n, t, rec):
        return dict(part="round_trip", method=method, steps=steps, cfg=cfg, evals_per_step=n / steps,
                    seconds=time.perf_counter() - t, vae_ceiling_db=S.ceiling, **S.scores(rec))

    euler = B.first(B.core("KSamplerSelect").execute("euler"))
    sc = B.core("SamplerCustom")
    for steps in steps_list:
        sig = B.first(B.core("BasicScheduler").execute(S.m, SCHED, steps, 1.0))
        flipped = B.first(B.core("FlipSigmas").execute(sig))
        for cfg in cfgs:
            for label, kw in methods:
                t = time.perf_counter()
                _, traj, n = invert(S, pos, neg, steps, cfg, **kw)
                # the evaluation counter wraps the model, which the guidance fingerprint cannot hash: auto
                # would replay ddim, so the exact rows ask for the BDIA replay outright
                rec = sample(S, pos, neg, traj, cfg, **({"exact_replay": "bdia"} if kw["method"] == "exact" else {}))
                rows.append(row(label, steps, cfg, n, t, rec))
            t = time.perf_counter()
            S.counter.take()
            inv_lat = B.first(sc.execute(S.m, False, 0, cfg, pos, neg, euler, flipped, S.latent))
            n = S.counter.take()
            rec = B.first(sc.execute(S.m, False, 0, cfg, pos, neg, euler, sig, inv_lat))["samples"]
            rows.append(row(CORE, steps, cfg, n, t, rec))
            log(
                "  ".join(
                    f"{r['method']} {r['latent_rel_error']:.2e}/{r['psnr_db']:.1f}dB" for r in rows[-len(methods) - 1 :]
                )
                + f"   [steps {steps}, cfg {cfg:g}]"
            )
    return rows


def source_side(S, key, fn):
    """``fn()`` once per ``key`` on this Setup: (its value, the evaluations it made, its seconds, whether it ran
    now); a repeat returns the stored value and cost, so a row that reuses it still reports what it costs."""
    fresh = key not in S.source_side
    if fresh:
        t = time.perf_counter()
        S.counter.take()
        value = fn()
        S.source_side[key] = (value, S.counter.take(), time.perf_counter() - t)
    return (*S.source_side[key], fresh)


def guided(S, sources, targets, steps, cfgs, log, part) -> list:
    """Regenerate the cfg-1 pivot at each cfg with ``targets`` (== sources: reconstruction; else an edit)."""
    rows = []
    src, tgt, neg = S.cond(sources), S.cond(targets), S.empty
    nt = B.pack("nodes.nulltext").DDIMInvNullText
    (pivot, n_inv), _, _, _ = source_side(S, ("pivot", tuple(sources), steps),     # invert() counts for itself
                                          lambda: invert(S, src, neg, steps, 1.0, method="ddim")[1:])
    edit = tuple(targets) != tuple(sources)
    for cfg in cfgs:
        variants = {
            "plain": lambda cfg=cfg: sample(S, tgt, neg, pivot, cfg),
            "source_drift": lambda cfg=cfg: sample(
                S, tgt, neg, pivot, cfg, correction="source_drift", source_positive=src, source_negative=neg
            ),
        }
        for mode in ("null_text", "negative_prompt"):

            def run(mode=mode, cfg=cfg):
                annotated, n, sec, fresh = source_side(
                    S, (mode, tuple(sources), steps, cfg),
                    lambda: B.first(nt.execute(S.m, src, neg, pivot, cfg, mode=mode, **NULLTEXT), 1))
                # a fresh optimisation is already inside this row's timing; a reused one is charged its seconds
                return sample(S, tgt, neg, annotated, cfg), annotated.optimized_negative, n, 0.0 if fresh else sec

            variants[mode] = run
        for label, fn in variants.items():
            t = time.perf_counter()
            S.counter.take()
            out = fn()
            rec, info, n_opt, sec_reused = out if isinstance(out, tuple) else (out, None, 0, 0.0)
            sampled = S.counter.take()
            row = dict(
                part=part,
                method=label,
                steps=steps,
                cfg=cfg,
                evaluations=sampled + n_opt + n_inv,
                backward=(info or {}).get("backward", 0),
                seconds=time.perf_counter() - t + sec_reused,
                vae_ceiling_db=S.ceiling,
                **S.scores(rec, list(targets) if edit else None),
            )
            rows.append(row)
        log(
            "  ".join(
                f"{r['method']} {r['latent_rel_error']:.2e}/{r['psnr_db']:.1f}dB"
                + (f"/{r['edit_success']:.0%}" if edit else "")
                for r in rows[-4:]
            )
            + f"   [{part}, steps {steps}, cfg {cfg:g}]"
        )
    return rows


def table(rows, part, cols) -> str:
    sel = [r for r in rows if r["part"] == part]
    head = "| " + " | ".join(c for c, _ in cols) + " |\n|" + "---|" * len(cols)
    return head + "\n" + "\n".join("| " + " | ".join(f(r) for _, f in cols) + " |" for r in sel)


PLOT_COLORS = {
    "ddim/predicted": (227, 119, 194), "ddim/destination": (23, 190, 207), "ddim/current": (31, 119, 180),
    "implicit": (214, 39, 40), "exact": (44, 160, 44), CORE: (90, 90, 90),
    "edit: plain": (0, 0, 0), "edit: source_drift": (148, 103, 189), "edit: null_text": (140, 86, 75),
    "edit: negative_prompt": (255, 127, 14),
}


def plot(rows, path: Path, ceiling: float) -> None:
    """Two panels, PIL only. Left: round-trip latent error vs inversion evaluations/step (log-log; colour =
    method, marker = cfg: circle 1, square 3.5, triangle 7.5; size grows with steps). Right: the edits,
    classifier success vs pixel PSNR to the source (colour = method, marker = cfg)."""
    from PIL import Image, ImageDraw

    W, H, top, bottom, left = 1400, 560, 50, 70, 70
    pw = (W - left - 40) // 2
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 10), "Learned tiny SD1.5-format model (held-out photograph crops).  o CFG 1   [] CFG 3.5   "
           "^ CFG 7.5;  bigger = more steps (10, 25, 50)", fill="black")

    def marker(x, y, cfg, size, col):
        r = size
        if cfg <= 1.0:
            d.ellipse([x - r, y - r, x + r, y + r], outline=col, width=2)
        elif cfg < 5:
            d.rectangle([x - r, y - r, x + r, y + r], outline=col, width=2)
        else:
            d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], outline=col, width=2)

    def panel(ix, title, xs, ys, xlog, ylog, xlabel, ylabel):
        x0p, x1p, y0p, y1p = left + ix * (pw + 20), left + ix * (pw + 20) + pw - 20, top, H - bottom
        d.rectangle([x0p, y0p, x1p, y1p], outline="black")
        d.text((x0p + 5, y0p + 5), title, fill="black")
        d.text((x0p + pw // 2 - 80, y1p + 22), xlabel, fill="black")
        d.text((x0p + 5, y1p + 40), ylabel, fill="black")

        def tr(v, lo, hi, log):
            v = min(max(v, lo), hi)
            return (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) if log else (v - lo) / (hi - lo)

        def X(v):
            return x0p + 10 + (x1p - x0p - 20) * tr(v, *xs, xlog)

        def Y(v):
            return y1p - 10 - (y1p - y0p - 30) * tr(v, *ys, ylog)

        ticks_x = [0.5, 1, 2, 5, 10, 20] if xlog else [xs[0] + k * (xs[1] - xs[0]) / 5 for k in range(6)]
        ticks_y = [10.0 ** e for e in range(int(math.log10(ys[0])), 1)] if ylog else [k / 5 for k in range(6)]
        for v in ticks_x:
            d.line([X(v), y0p, X(v), y1p], fill=(235, 235, 235))
            d.text((X(v) - 8, y1p + 4), f"{v:g}" if xlog else f"{v:.0f}", fill="black")
        for v in ticks_y:
            d.line([x0p, Y(v), x1p, Y(v)], fill=(230, 230, 230))
            d.text((x0p - 40, Y(v) - 6), f"{v:.0e}" if ylog else f"{v:.0%}", fill="black")
        return X, Y

    X, Y = panel(0, "round trip: latent error vs evaluations / inversion step", (0.5, 20.0), (1e-8, 1.0),
                 True, True, "evaluations / step (log)", "")
    for r in (r for r in rows if r["part"] == "round_trip"):
        err = r["latent_rel_error"]
        if math.isfinite(err):
            marker(X(r["evals_per_step"]), Y(max(err, 1e-8)), r["cfg"], 3 + r["steps"] // 10,
                   PLOT_COLORS.get(r["method"], (0, 0, 0)))
    X, Y = panel(1, f"edits: classifier success vs PSNR to the source (VAE ceiling {ceiling:.1f} dB)",
                 (5.0, 35.0), (0.0, 1.0), False, False, "PSNR dB to the source (higher = more preserved)", "")
    d.line([X(ceiling), top, X(ceiling), H - bottom], fill=(180, 180, 180))
    for r in (r for r in rows if r["part"] == "edit"):
        marker(X(r["psnr_db"]), Y(r["edit_success"]), r["cfg"], 7, PLOT_COLORS.get("edit: " + r["method"], (0, 0, 0)))
    y = top + 25
    for name, col in PLOT_COLORS.items():
        d.rectangle([W - 230, y, W - 220, y + 10], fill=col)
        d.text((W - 214, y - 1), name, fill="black")
        y += 16
    img.save(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="steps {6}, cfg {1, 7.5}, two images, implicit at max_iters 6: smoke run")
    ap.add_argument("--steps", default="10,25,50", help="round-trip step counts")
    ap.add_argument("--cfgs", default="1,3.5,7.5", help="round-trip cfgs")
    ap.add_argument("--guided-cfgs", default="3.5,7.5", help="cfgs of the guided reconstruction and the edits")
    ap.add_argument("--sources", type=int, default=len(SOURCES), help=f"how many of {SOURCES} (and their edits)")
    ap.add_argument("--tag", default="", help="write bench/out/learned_<tag>.json and no plot (extra cells)")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    # outside ComfyUI's executor: no autograd graph through the model (null-text enables grad for itself)
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    floats = lambda v: tuple(float(x) for x in v.split(","))  # noqa: E731
    sources = SOURCES[:2] if a.quick else SOURCES[: a.sources]
    steps_list = (6,) if a.quick else tuple(int(x) for x in a.steps.split(","))
    cfgs = (1.0, 7.5) if a.quick else floats(a.cfgs)
    guided_cfgs = (7.5,) if a.quick else floats(a.guided_cfgs)
    S = Setup(sources)
    print(f"learned model, {len(sources)} held-out crops {sources}, VAE ceiling {S.ceiling:.2f} dB")
    methods = [(label, dict(kw, **QUICK_IMPLICIT) if a.quick and label == "implicit" else kw) for label, kw in OURS]
    rows = round_trip(S, sources, steps_list, cfgs, print, methods)
    gsteps = steps_list[-1] if a.quick else 25
    rows += guided(S, sources, sources, gsteps, guided_cfgs, print, "guided_reconstruction")
    edits = EDITS[: len(sources)]
    S_edit = Setup([s for s, _ in edits]) if [s for s, _ in edits] != list(sources) else S
    rows += guided(S_edit, [s for s, _ in edits], [t for _, t in edits], gsteps, guided_cfgs, print, "edit")
    f3 = "{:.3g}".format
    print(
        "\n"
        + table(
            rows,
            "round_trip",
            [
                ("method", lambda r: r["method"]),
                ("steps", lambda r: str(r["steps"])),
                ("cfg", lambda r: f"{r['cfg']:g}"),
                ("evals/step", lambda r: f"{r['evals_per_step']:.1f}"),
                ("latent error", lambda r: f3(r["latent_rel_error"])),
                ("PSNR dB", lambda r: f"{r['psnr_db']:.2f}"),
                ("SSIM", lambda r: f"{r['ssim']:.3f}"),
            ],
        )
    )
    for part in ("guided_reconstruction", "edit"):
        print(
            "\n"
            + table(
                rows,
                part,
                [
                    ("method", lambda r: r["method"]),
                    ("cfg", lambda r: f"{r['cfg']:g}"),
                    ("latent error", lambda r: f3(r["latent_rel_error"])),
                    ("PSNR dB", lambda r: f"{r['psnr_db']:.2f}"),
                    ("SSIM", lambda r: f"{r['ssim']:.3f}"),
                    ("edit success", lambda r: f"{r.get('edit_success', float('nan')):.0%}"),
                    ("evaluations", lambda r: str(r["evaluations"])),
                    ("backward", lambda r: str(r["backward"])),
                ],
            )
        )
    data = {
        "bench": "learned",
        "command": " ".join(["bench/learned.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": B.machine(),
        "sources": list(sources),
        "edits": [list(e) for e in edits],
        "vae_ceiling_db": S.ceiling,
        "seconds": time.perf_counter() - t0,
        "rows": rows,
    }
    p = B.write_json("learned_quick.json" if a.quick else f"learned_{a.tag}.json" if a.tag else "learned.json", data)
    if not a.quick and not a.tag:
        plot(rows, Path(__file__).resolve().parent / "learned.png", S.ceiling)
    print(f"\nwrote {p} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
