"""Decoder inversion (VAE Encode (Inversion) ``refine``) on the learned model: the pixel ceiling and the end-to-end
reconstruction, in-process on the real host (CPU).

1. **Ceiling**: held-out 64x64 crops (``ddiminv_dev.learned.data.heldout_crops``, never trained on) through the
   learned checkpoint's TAESD: PSNR of decode(latent) against the crop for refine iterations 0 and each of
   ``--iters``, for each learning rate / anchor of the grid. Crops are split at the median of their gradient
   energy (RMS of horizontal + vertical pixel differences) into *textured* and *smooth*.
2. **End to end** (``--e2e``): one held-out crop per photograph (``data.demo_image``), latent from the node with
   refine K, inverted with its caption at cfg 1 (ddim, implicit, exact) and regenerated: pixel PSNR of the
   result against the crop, next to the ceiling of the latent that was inverted.

    nice -n 10 .venv/bin/python bench/refine.py --iters 25 100 300 --lrs 0.02 0.05 0.1 --anchors 0 --per-class 4
    nice -n 10 .venv/bin/python bench/refine.py --iters 25 100 300 --e2e --anchors 0 0.01 --steps 25
    .venv/bin/python bench/refine.py --quick      # 2 crops per class of 3 photos, 10 iterations: a smoke run

Writes bench/out/refine[_quick].json and prints markdown tables. No assertion on timings.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import _common as B  # noqa: E402

CROP_SEED = 303   # ddiminv_dev.learned.evaluate.VAE_SEED: the crops the learned model's VAE ceiling is reported on
SCHED = "ddim_uniform"
E2E_METHODS = (("ddim", dict(method="ddim")), ("implicit", dict(method="implicit", tolerance=1e-6, max_iters=12,
                                                                 restarts=2)), ("exact", dict(method="exact")))


def psnr_per_image(a, b):
    import torch
    mse = (a.float() - b.float()).square().flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1.0 / mse)).tolist()


def texture(img):
    """Gradient energy per image [N,H,W,3]: RMS of the horizontal and vertical pixel differences."""
    dx = (img[:, :, 1:] - img[:, :, :-1]).square().flatten(1).mean(1)
    dy = (img[:, 1:] - img[:, :-1]).square().flatten(1).mean(1)
    return (0.5 * (dx + dy)).sqrt().tolist()


def quantiles(v):
    v = sorted(v)
    q = statistics.quantiles(v, n=4) if len(v) >= 2 else [v[0]] * 3
    return dict(min=v[0], q1=q[0], median=q[1], q3=q[2], max=v[-1], mean=statistics.fmean(v))


def load():
    from ddiminv_dev.learned import build
    B.boot(cpu=True)
    build.register_model_dir()
    model, clip, vae = B.call("CheckpointLoaderSimple", build.CKPT_NAME)[:3]
    return model, clip, vae


def ceiling_part(vae, imgs, labels, iters, lrs, anchors, log, losses=("clamped",)) -> list:
    import torch
    VG = B.pack("nodes._comfy_vae_grad")
    with torch.inference_mode():
        mean = vae.encode(imgs)
        base = psnr_per_image(vae.decode(mean), imgs)
    tex = texture(imgs)
    cut = statistics.median(tex)
    rows = []
    for loss, lr, anchor, k in [(s, lr, a, k) for s in losses for lr in lrs for a in anchors for k in iters]:
        t = time.perf_counter()
        with torch.inference_mode():
            res = VG.refine(vae, mean, imgs, steps=k, lr=lr, anchor=anchor, valid_hw=imgs.shape[1:3],
                            loss=loss)
            after = psnr_per_image(vae.decode(res.latent), imgs)
        secs = time.perf_counter() - t
        with torch.no_grad():
            drift = ((res.latent.float() - mean.float()).flatten(1).norm(dim=1)
                     / mean.float().flatten(1).norm(dim=1)).tolist()
        gain = [a - b for a, b in zip(after, base, strict=True)]
        g_tex = [g for g, x in zip(gain, tex, strict=True) if x >= cut]
        g_smooth = [g for g, x in zip(gain, tex, strict=True) if x < cut]
        row = dict(part="ceiling", loss=loss, lr=lr, anchor=anchor, iters=k, used=res.iterations, stopped=res.stopped,
                   seconds=secs, n=len(gain), base=quantiles(base), after=quantiles(after),
                   gain=quantiles(gain), gain_textured=quantiles(g_tex), gain_smooth=quantiles(g_smooth),
                   drift=quantiles(drift), worse=sum(g < 0 for g in gain),
                   per_crop=dict(base=base, after=after, label=labels, texture=tex))
        rows.append(row)
        log(f"loss {loss} lr {lr:g} anchor {anchor:g} iters {k} ({res.iterations} used, {res.stopped}): gain median "
            f"{row['gain']['median']:+.2f} dB [textured {row['gain_textured']['median']:+.2f}, smooth "
            f"{row['gain_smooth']['median']:+.2f}], drift {row['drift']['median']:.3f}, {secs:.1f} s")
    return rows


def e2e_part(model, clip, vae, iters, lrs, anchors, steps, captions, log) -> list:
    import torch
    from ddiminv_dev.learned import data
    enc = B.pack("nodes.encode").DDIMInvVAEEncode
    inv = B.pack("nodes.invert").DDIMInvert
    smp = B.pack("nodes.sampler").DDIMInvSampler
    pixels = torch.cat([data.demo_image(c) for c in captions])
    conds = [B.first(B.call("CLIPTextEncode", clip, c))[0] for c in captions]
    pos = [[torch.cat([c[0] for c in conds]), {"pooled_output": torch.cat([c[1]["pooled_output"] for c in conds])}
            if "pooled_output" in conds[0][1] else {}]]
    e = B.first(B.call("CLIPTextEncode", clip, ""))[0]
    neg = [[e[0].expand(len(captions), -1, -1).contiguous(), dict(e[1])]]
    rows = []
    grid = [(0, lrs[0], 0.0)] + [(k, lr, a) for lr in lrs for a in anchors for k in iters if k > 0]
    for k, lr, anchor in grid:
        out = enc.execute(pixels, vae, refine=k, refine_lr=lr, refine_anchor=anchor)
        lat = B.first(out, 0)
        with torch.inference_mode():
            ceil = psnr_per_image(vae.decode(lat["samples"]), pixels)
        row = dict(part="e2e", iters=k, lr=lr, anchor=anchor, steps=steps, ceiling=ceil)
        for name, kw in E2E_METHODS:
            t = time.perf_counter()
            traj = B.first(inv.execute(model, pos, neg, lat, steps, 1.0, SCHED, **kw), 2)
            extra = {"exact_replay": "bdia"} if kw["method"] == "exact" else {}
            rec = B.first(smp.execute(model, pos, neg, traj, 1.0, **extra))["samples"]
            with torch.inference_mode():
                row[name] = psnr_per_image(vae.decode(rec), pixels)
            row[name + "_s"] = time.perf_counter() - t
        rows.append(row)
        log(f"refine {k} lr {lr:g} anchor {anchor:g}: ceiling {statistics.fmean(ceil):.2f} dB; " + ", ".join(
            f"{n} {statistics.fmean(row[n]):.2f} dB" for n, _ in E2E_METHODS))
    return rows


def ceiling_table(rows) -> str:
    out = ["| loss | lr | anchor | iters (used) | ceiling at 0, median | after, median "
           "| gain min / q1 / median / q3 / max | textured median (min) | smooth median | latent drift median "
           "| worse | s |", "|" + "---|" * 12]
    for r in rows:
        g, gt = r["gain"], r["gain_textured"]
        out.append(f"| {r.get('loss', 'clamped')} | {r['lr']:g} | {r['anchor']:g} | {r['iters']} ({r['used']}) | "
                   f"{r['base']['median']:.2f} | "
                   f"{r['after']['median']:.2f} | {g['min']:+.2f} / {g['q1']:+.2f} / {g['median']:+.2f} / "
                   f"{g['q3']:+.2f} / {g['max']:+.2f} | {gt['median']:+.2f} ({gt['min']:+.2f}) | "
                   f"{r['gain_smooth']['median']:+.2f} | {r['drift']['median']:.3f} | {r['worse']} | "
                   f"{r['seconds']:.0f} |")
    return "\n".join(out)


def e2e_table(rows) -> str:
    out = ["| refine | lr | anchor | ceiling | ddim | implicit | exact | exact - ceiling |", "|" + "---|" * 8]
    for r in rows:
        m = {k: statistics.fmean(r[k]) for k in ("ceiling", "ddim", "implicit", "exact")}
        out.append(f"| {r['iters']} | {r['lr']:g} | {r['anchor']:g} | {m['ceiling']:.2f} | {m['ddim']:.2f} | "
                   f"{m['implicit']:.2f} | {m['exact']:.2f} | {m['exact'] - m['ceiling']:+.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, nargs="+", default=[25, 100, 300])
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.05])
    ap.add_argument("--anchors", type=float, nargs="+", default=[0.0])
    ap.add_argument("--losses", nargs="+", default=["clamped"], choices=["clamped", "unclamped", "straight"],
                    help="what the gradient sees (inversion.refine.LOSSES); the ceiling is always the clamped one")
    ap.add_argument("--per-class", type=int, default=4, help="held-out crops per photograph (15 photographs)")
    ap.add_argument("--e2e", action="store_true", help="also the end-to-end reconstruction (one crop per photo)")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the ceiling part")
    ap.add_argument("--steps", type=int, default=25, help="inversion steps of the end-to-end part")
    ap.add_argument("--photos", nargs="+", default=None,
                    help="only these photographs (names of ddiminv_dev.learned.data.NAMES) in both parts")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tag", default="")
    a = ap.parse_args(argv)
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    from ddiminv_dev.learned import data
    if a.quick:
        a.iters, a.per_class = [10], 2
    model, clip, vae = load()
    x, lab = data.heldout_crops(a.per_class, CROP_SEED)
    photos = [data.NAMES.index(p) for p in a.photos] if a.photos else list(range(3) if a.quick else
                                                                            range(len(data.NAMES)))
    keep = torch.tensor([int(v) in photos for v in lab])
    x, lab = x[keep], lab[keep]
    imgs = x.permute(0, 2, 3, 1).contiguous()
    t0 = time.perf_counter()
    res = {"command": " ".join(sys.argv), "machine": B.machine(), "crop_seed": CROP_SEED}
    if not a.no_ceiling:
        res["ceiling"] = ceiling_part(vae, imgs, lab.tolist(), a.iters, a.lrs, a.anchors, print, a.losses)
        print("\n" + ceiling_table(res["ceiling"]))
    if a.e2e:
        caps = [data.CAPTIONS[i] for i in photos]
        res["e2e"] = e2e_part(model, clip, vae, a.iters, a.lrs, a.anchors, a.steps, caps, print)
        print(f"\nEnd to end, {len(caps)} held-out crops, {a.steps} steps, cfg 1 (mean PSNR dB):\n" +
              e2e_table(res["e2e"]))
    res["seconds"] = time.perf_counter() - t0
    name = "refine_quick.json" if a.quick else f"refine{('_' + a.tag) if a.tag else ''}.json"
    print(f"wrote {B.write_json(name, res)}  ({res['seconds']:.0f} s)")
    return 0 if not any(math.isnan(v) for r in res.get("ceiling", []) for v in r["per_crop"]["after"]) else 1


if __name__ == "__main__":
    sys.exit(main())
