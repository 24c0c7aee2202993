"""Round-trip fidelity on the analytic Gaussian-mixture oracle, as a real ComfyUI MODEL (CPU, minutes).

For EPS, V-prediction and flow, steps {5,10,25,50}, CFG {1,3.5,7.5}: invert the clean source latent, then
regenerate it, and report ||x_rec - x0|| / ||x0|| in model space together with the *measured* guided
evaluations per inversion step (a counting wrapper on the model), for

* ours: DDIM Invert + Inverted-Latent Sampler (the pack's nodes, called in-process on the real host):
  ddim/current, ddim/destination, implicit (tol 1e-4, 1e-6, 1e-8), exact (BDIA, gamma 1);
* core: SamplerCustom(euler, add_noise off) on FlipSigmas(BasicScheduler(...)) to invert, then
  SamplerCustom(euler, add_noise off) on the normal sigmas to regenerate -- the same MODEL.

Also the inverted noise's statistics (mean and std relative to the schedule's sigma_max, excess kurtosis).
Schedules: EPS/V ``ddim_uniform`` (SD1.5 discrete sigmas), flow ``simple`` (discrete flow, shift 3).

    .venv/bin/python bench/fidelity.py            # full grid, GMM seeds 4 (tests' oracle) and 5
    .venv/bin/python bench/fidelity.py --quick    # steps {5,10}, CFG {1,7.5}, one seed (smoke)

Writes bench/out/fidelity.json and bench/fidelity.png (error vs evaluations per step, log-log).
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

FAMILIES = ("eps", "v", "flow")
SCHEDULER = {"eps": "ddim_uniform", "v": "ddim_uniform", "flow": "simple"}
OURS = [  # (label, DDIMInvert keyword arguments)
    ("ddim/predicted", dict(method="ddim", eval_sigma="predicted")),
    ("ddim/current", dict(method="ddim", eval_sigma="current")),
    ("ddim/destination", dict(method="ddim", eval_sigma="destination")),
    ("implicit 1e-4", dict(method="implicit", tolerance=1e-4)),
    ("implicit 1e-6", dict(method="implicit", tolerance=1e-6)),
    ("implicit 1e-8", dict(method="implicit", tolerance=1e-8)),
    ("exact", dict(method="exact")),
]
CORE = "core FlipSigmas+euler"
COMPS = [0, 1, 2]
COND, UNCOND = [0, 1, 2], [0, 1, 2, 3]


def rel_err(x, x0) -> float:
    import torch

    if not torch.isfinite(x).all():
        return float("nan")
    return float((x.double() - x0.double()).norm() / x0.double().norm())


def noise_stats(xn, sigma_max: float) -> dict:
    import torch

    v = xn.double().flatten()
    if not torch.isfinite(v).all():
        return {"finite": False, "mean_rel": float("nan"), "std_rel": float("nan"), "excess_kurtosis": float("nan")}
    m, s = float(v.mean()), float(v.std())
    k = float(((v - m) / s).pow(4).mean() - 3.0)
    return {"finite": True, "mean_rel": m / sigma_max, "std_rel": s / sigma_max, "excess_kurtosis": k}


def run_grid(seed: int, sample_seed: int, steps_list, cfgs, log=print, families=FAMILIES, methods=None) -> list:
    """``methods``: labels to run (None = all; 'core' selects the core FlipSigmas path)."""
    import comfy.latent_formats
    from ddiminv_dev.fixtures import gmm_nodes as NG

    inv = B.pack("nodes.invert").DDIMInvert
    smp = B.pack("nodes.sampler").DDIMInvSampler
    fmt = comfy.latent_formats.SD15()
    rows = []
    pos, neg = NG.gmm_cond(COND), NG.gmm_cond(UNCOND)
    ours = [(label, kw) for label, kw in OURS if methods is None or label in methods]
    do_core = methods is None or "core" in methods or CORE in methods
    for fam in families:
        counter = Counter(NG.gmm_model(fam, seed))
        m = counter.model
        lat, x0 = NG.gmm_latent(COMPS, seed, sample_seed)
        latent = {"samples": lat}
        sched = SCHEDULER[fam]
        euler = B.first(B.core("KSamplerSelect").execute("euler"))
        for steps in steps_list:
            sig = B.first(B.core("BasicScheduler").execute(m, sched, steps, 1.0))
            sigma_max = float(sig[0])
            flipped = B.first(B.core("FlipSigmas").execute(sig))
            for cfg in cfgs:
                base = dict(
                    family=fam,
                    seed=seed,
                    sample_seed=sample_seed,
                    steps=steps,
                    cfg=cfg,
                    scheduler=sched,
                    sigma_max=sigma_max,
                )
                for label, kw in ours:
                    t = time.perf_counter()
                    counter.take()
                    out = inv.execute(m, pos, neg, latent, steps, cfg, sched, **kw)
                    n_inv = counter.take()
                    traj = B.first(out, 2)
                    rec = B.first(smp.execute(m, pos, neg, traj, cfg))
                    n_reg = counter.take()
                    x_rec = fmt.process_in(rec["samples"].clone())
                    row = dict(
                        base,
                        method=label,
                        error=rel_err(x_rec, x0),
                        evals_per_step=n_inv / steps,
                        regen_evals_per_step=n_reg / steps,
                        traj_nfe_per_step=traj.nfe / steps,
                        max_residual=traj.options.get("max_residual"),
                        noise=noise_stats(traj.noise, sigma_max),
                        seconds=time.perf_counter() - t,
                    )
                    rows.append(row)
                # core: FlipSigmas + SamplerCustom(euler), add_noise off, then regenerate on normal sigmas
                if not do_core:
                    log(
                        f"[seed {seed}] {fam:4s} steps={steps:2d} cfg={cfg:3.1f}  "
                        + "  ".join(
                            f"{r['method']}={r['error']:.2e}({r['evals_per_step']:.1f})" for r in rows[-len(ours) :]
                        )
                    )
                    continue
                t = time.perf_counter()
                counter.take()
                sc = B.core("SamplerCustom")
                inv_lat = B.first(sc.execute(m, False, 0, cfg, pos, neg, euler, flipped, latent))
                n_inv = counter.take()
                rec = B.first(sc.execute(m, False, 0, cfg, pos, neg, euler, sig, inv_lat))
                n_reg = counter.take()
                x_rec = fmt.process_in(rec["samples"].clone())
                xn = fmt.process_in(inv_lat["samples"].clone())
                rows.append(
                    dict(
                        base,
                        method=CORE,
                        error=rel_err(x_rec, x0),
                        evals_per_step=n_inv / steps,
                        regen_evals_per_step=n_reg / steps,
                        noise=noise_stats(xn, sigma_max),
                        seconds=time.perf_counter() - t,
                    )
                )
                errs = "  ".join(
                    f"{r['method']}={r['error']:.2e}({r['evals_per_step']:.1f})" for r in rows[-len(ours) - 1 :]
                )
                log(f"[seed {seed}] {fam:4s} steps={steps:2d} cfg={cfg:3.1f}  {errs}")
    return rows


# ---------------------------------------------------------------------------------------------- plot
COLORS = {
    "ddim/predicted": (227, 119, 194),
    "ddim/current": (31, 119, 180),
    "ddim/destination": (23, 190, 207),
    "implicit 1e-4": (255, 127, 14),
    "implicit 1e-6": (214, 39, 40),
    "implicit 1e-8": (148, 103, 189),
    "exact": (44, 160, 44),
    CORE: (90, 90, 90),
}


def plot(rows, path: Path, seed: int) -> None:
    """Error vs inversion evaluations/step, log-log, one panel per family, PIL only (no matplotlib).
    Colour = method, marker = CFG (circle 1, square 3.5, triangle 7.5), marker size grows with steps.
    Errors below 1e-9 are drawn on the floor; non-finite results as an X on the top edge."""
    from PIL import Image, ImageDraw

    rows = [r for r in rows if r["seed"] == seed]
    W, H, top, bottom, left, right = 1500, 560, 50, 70, 70, 20
    pw = (W - left - right) // 3
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    xmin, xmax = 0.5, 40.0
    ymin, ymax = 1e-9, 10.0

    def X(ix, v):
        v = min(max(v, xmin), xmax)
        return (
            left + ix * pw + 10 + (pw - 40) * (math.log10(v) - math.log10(xmin)) / (math.log10(xmax) - math.log10(xmin))
        )

    def Y(v):
        v = min(max(v, ymin), ymax)
        return top + (H - top - bottom) * (math.log10(ymax) - math.log10(v)) / (math.log10(ymax) - math.log10(ymin))

    d.text(
        (left, 10),
        f"Round trip ||x_rec - x0|| / ||x0|| (model space) vs guided evaluations per inversion step - "
        f"GMM oracle seed {seed} as a real ComfyUI MODEL.  o CFG 1   [] CFG 3.5   ^ CFG 7.5;  "
        "bigger = more steps (5,10,25,50)",
        fill="black",
    )
    for ix, fam in enumerate(FAMILIES):
        x0p, x1p = left + ix * pw + 10, left + ix * pw + pw - 30
        d.text((x0p + 5, top + 5), {"eps": "EPS", "v": "V-prediction", "flow": "FLOW (shift 3)"}[fam], fill="black")
        for e in range(-9, 2):
            y = Y(10.0**e)
            d.line([x0p, y, x1p, y], fill=(230, 230, 230))
            if ix == 0 or True:
                d.text((x0p - 38 if ix == 0 else x0p + 2, y - 6), f"1e{e}", fill="black")
        for v in (0.5, 1, 2, 5, 10, 20, 40):
            x = X(ix, v)
            d.line([x, top, x, H - bottom], fill=(235, 235, 235))
            d.text((x - 6, H - bottom + 4), f"{v:g}", fill="black")
        d.text((x0p + pw // 2 - 90, H - bottom + 20), "evaluations / step (log)", fill="black")
        d.rectangle([x0p, top, x1p, H - bottom], outline="black")
        steps_all = sorted({r["steps"] for r in rows})
        for r in rows:
            if r["family"] != fam:
                continue
            c = COLORS[r["method"]]
            rad = 3 + 2 * steps_all.index(r["steps"])
            x = X(ix, r["evals_per_step"])
            err = r["error"]
            if err is None or not math.isfinite(err):
                y = top + 8
                d.line([x - rad, y - rad, x + rad, y + rad], fill=c, width=2)
                d.line([x - rad, y + rad, x + rad, y - rad], fill=c, width=2)
                continue
            y = Y(err)
            if r["cfg"] == 1.0:
                d.ellipse([x - rad, y - rad, x + rad, y + rad], outline=c, width=2)
            elif r["cfg"] < 5:
                d.rectangle([x - rad, y - rad, x + rad, y + rad], outline=c, width=2)
            else:
                d.polygon([(x, y - rad), (x - rad, y + rad), (x + rad, y + rad)], outline=c)
    # legend
    lx = left + 10
    for i, (name, c) in enumerate(COLORS.items()):
        x = lx + i * 175
        d.rectangle([x, H - 22, x + 12, H - 10], fill=c)
        d.text((x + 16, H - 22), name, fill="black")
    d.text((W - 330, 30), "X on top edge = non-finite;  floor = error < 1e-9", fill="black")
    img = img.convert("P", palette=Image.ADAPTIVE, colors=64)
    img.save(path, optimize=True)


def summary(rows, seed: int) -> str:
    """A markdown table: error (evals/step) per method at steps 10 and 50, CFG 1 and 7.5."""
    rows = [r for r in rows if r["seed"] == seed]
    keys = sorted({(r["steps"], r["cfg"]) for r in rows}, key=lambda k: (k[1], k[0]))
    keys = [k for k in keys if k[0] in (10, 50) and k[1] in (1.0, 7.5)] or keys
    methods = [m for m, _ in OURS] + [CORE]
    lines = []
    for fam in FAMILIES:
        lines.append(f"\n{fam} (GMM seed {seed}): error (inversion evals/step)\n")
        lines.append("| method | " + " | ".join(f"{s} steps, CFG {c:g}" for s, c in keys) + " |")
        lines.append("|---" * (len(keys) + 1) + "|")
        for mth in methods:
            cells = []
            for s, c in keys:
                r = next(
                    (
                        r
                        for r in rows
                        if r["family"] == fam and r["method"] == mth and r["steps"] == s and r["cfg"] == c
                    ),
                    None,
                )
                if r is None:
                    cells.append("")
                else:
                    e = r["error"]
                    cells.append(
                        ("non-finite" if e is None or not math.isfinite(e) else f"{e:.2e}")
                        + f" ({r['evals_per_step']:.1f})"
                    )
            lines.append(f"| {mth} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="steps {5,10}, CFG {1,7.5}, seed 4 only")
    ap.add_argument("--seeds", default="4:1,5:2", help="GMM seed:sample seed pairs (default 4:1,5:2)")
    ap.add_argument("--steps", default="5,10,25,50", help="comma list of step counts")
    ap.add_argument("--cfgs", default="1,3.5,7.5", help="comma list of CFG scales")
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma list of eps,v,flow")
    ap.add_argument(
        "--methods",
        default=None,
        help="comma list of method labels to run (default all), e.g. 'ddim/current,exact,core'",
    )
    ap.add_argument(
        "--part",
        default=None,
        help="write bench/out/fidelity_part_<PART>.json only (run grids in parallel processes), "
        "then merge them with --merge",
    )
    ap.add_argument(
        "--merge",
        action="store_true",
        help="merge bench/out/fidelity_part_*.json into fidelity.json (+ plot, summary); runs nothing",
    )
    ap.add_argument("--no-plot", action="store_true")
    B.add_threads_arg(ap)
    a = ap.parse_args(argv)
    B.set_threads(a.threads)
    steps_list = [5, 10] if a.quick else [int(v) for v in a.steps.split(",")]
    cfgs = [1.0, 7.5] if a.quick else [float(v) for v in a.cfgs.split(",")]
    seeds = [tuple(int(v) for v in p.split(":")) for p in a.seeds.split(",")]
    if a.quick:
        seeds = seeds[:1]
    t0 = time.perf_counter()
    rows = []
    if a.merge:
        import json

        parts = sorted(B.OUT.glob("fidelity_part_*.json"))
        grids = []
        for f in parts:
            d = json.loads(f.read_text())
            rows += d["rows"]
            grids.append(d["config"]["grid"])
        seeds = sorted({tuple(sd) for g in grids for sd in g["seeds"]})
        steps_list = sorted({s for g in grids for s in g["steps"]})
        cfgs = sorted({c for g in grids for c in g["cfg"]})
        machine = d["machine"]
    else:
        B.boot(cpu=True)
        import torch

        torch.manual_seed(0)
        fams = [f for f in a.families.split(",") if f]
        want = None if not a.methods else [m.strip() for m in a.methods.split(",")]
        for seed, sseed in seeds:
            rows += run_grid(seed, sseed, steps_list, cfgs, families=fams, methods=want)
        machine = B.machine()
    data = {
        "bench": "fidelity",
        "machine": machine,
        "seconds": time.perf_counter() - t0,
        "config": {
            "gmm": {"k": 4, "shape": [4, 8, 8], "std": 0.3},
            "seeds": seeds,
            "source_components": COMPS,
            "cond": COND,
            "uncond": UNCOND,
            "steps": steps_list,
            "cfg": cfgs,
            "scheduler": SCHEDULER,
            "error": "||x_rec - x0|| / ||x0|| over the whole batch, model space",
            "evals_per_step": "measured diffusion-model calls during inversion / steps (cond+uncond batched = 1)",
            "grid": {"seeds": seeds, "steps": steps_list, "cfg": cfgs},
            "parts": [p.name for p in sorted(B.OUT.glob("fidelity_part_*.json"))] if a.merge else None,
        },
        "rows": rows,
    }
    p = B.write_json(f"fidelity_part_{a.part}.json" if a.part else "fidelity.json", data)
    if a.part:
        print(f"wrote {p} in {time.perf_counter() - t0:.0f} s")
        return
    for seed, _ in seeds:
        print(summary(rows, seed))
    if not a.no_plot:
        png = Path(__file__).resolve().parent / "fidelity.png"
        plot(rows, png, seeds[0][0])
        print(f"wrote {png} ({png.stat().st_size // 1024} KB)")
    print(f"wrote {p} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
