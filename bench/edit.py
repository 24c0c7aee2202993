"""Editing benchmark with ground truth, on the scenes models (in-process ComfyUI, CPU).

Every item is a held-out scene (``ddiminv_dev.scenes``: test split, so unseen texture columns and held-out
colour x shape pairs can occur) and one edit of it (colour, shape or background swap); rendering the edited scene
gives the exact answer. Each method turns the source picture and the target caption into a result, through the
pack's nodes and core ComfyUI nodes; the result is scored against the source and the ground truth:

* ``accuracy``: the edited attribute is right: colour = the palette colour nearest the median of the result's
  pixels inside the ground-truth object (``coverage >= 0.5``); shape = the shape template that best fits the
  pixels of that colour near the object; background = the nearest background statistics outside the objects
  (``ddiminv_dev/scenes/measure.py``, direct pixel measures, 100 % on ground truth);
* ``iou``: the object segmented from the result (pixels near its target colour, in a window around it) against the
  ground-truth mask (scikit-learn ``jaccard_score``); for a background edit, the mean over all objects;
* ``bg_psnr`` / ``bg_ssim``: PSNR / SSIM (scikit-image) of the result against the source outside the edited object's
  mask (union of source and target masks, dilated by 2 px): PIE-Bench's background preservation. For a
  background edit the kept region is the objects instead (their ground-truth pixels, eroded by 1 px);
* ``gt_psnr``: the whole result against the ground-truth edit, next to ``gt_ceiling``: decode(encode(ground truth))
  against the ground truth, the best a latent model can score.

Means count every item: a perfect result (infinite PSNR) counts as :data:`PSNR_CAP` dB (more than any imperfect
uint8 picture scores; the run prints this and edit.json records it). ``seconds`` charges a row for everything it
uses, the encoding, prompt conditioning and inversion it shares with other rows included (each computed once, then
charged to every row that uses it); ``shared_seconds`` is that part and ``charged`` names it. Every row samples
with the one scheduler :data:`SCHED`, SDEdit included. Background edits take their target texture crop or noise
seed from the held-out ranges (``render.background_offsets(..., "test")``), as the source scenes do.

The row ``exact from refined latent`` starts from VAE Encode (Inversion) with ``refine`` = ``--refine``
(:data:`REFINE`) iterations of decoder inversion instead of the posterior mean, then exact inversion and ddim
replay with the target prompt, as ``exact, ddim replay``; its seconds include the refine. Each batch records the
node's vae_ceiling of the source for the mean and the refined latent (``source_ceilings_db``).

The row ``flowedit`` is FlowEdit (Kulikov et al. 2024; inversion-free, the flow peers' choice): the math core's
``inversion/flowedit.py`` run as two guided passes (source prompt at its CFG, then target prompt at its own) with
the parameters of :data:`FLOWEDIT` (the paper's SD3 setting: n_max 33 of 50 steps, n_min 0, n_avg 1, CFG 3.5 /
13.5), noise seeded by ``--seed``.

Models (``--models``, :data:`MODELS`): ``scenes-sd15`` (the SD1.5-format UNet, EPS) and ``scenes-dit`` (the
SD3-format flow MMDiT, issue 32). Every row carries its model's name; a row runs on a model when
:func:`applies` says so (FlowEdit on flow models only; null-text and negative-prompt on VP models only, issue 32's
list of flow rows). All models see the same items. Until ``ddiminv_dev/scenes/weights_dit`` holds trained
weights, ``scenes-dit`` runs a seeded untrained stand-in (``dit.untrained_weights``; printed and recorded as
``stand_in``): its rows test the plumbing, their numbers mean nothing.

A method is one entry of :data:`METHODS` (a function of the batch). Writes ``DIR/edit.json``,
``DIR/edit_grid.png`` (a row per item; columns: source, ground truth, then one per model and method) and
``DIR/edit_plot.png`` (accuracy against background PSNR).

    .venv/bin/python bench/edit.py --seed 0 --scenes 4 --out bench/out/edit
    .venv/bin/python bench/edit.py --scenes 4 --refine 25 --out bench/out/edit_refine25
    .venv/bin/python bench/edit.py --scenes 1 --steps 2 --refine 2 --nulltext-iterations 1 --out /tmp/edit  # smoke
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import _common as B  # noqa: E402
from ddiminv_dev.scenes import edits as E  # noqa: E402
from ddiminv_dev.scenes import measure as M  # noqa: E402
from ddiminv_dev.scenes import render as R  # noqa: E402

SCHED = "ddim_uniform"
REFINE = 100  # decoder-inversion iterations of the refined row (bench/RESULTS.md, refine: ~100 is a good trade)
PSNR_CAP = 100.0  # dB a perfect item counts as in the means (one uint8 level off at one pixel of 128x128 is 95 dB)
_clock = time.perf_counter
NULLTEXT = dict(iterations=10, learning_rate=0.01, early_stop=1e-5)
# FlowEdit's parameters: the paper's SD3 setting (n_max 33 of T = 50 steps, n_min 0, n_avg 1, source CFG 3.5,
# target CFG 13.5), n_max as that fraction of --steps (at least 1)
FLOWEDIT = dict(n_max_fraction=33 / 50, n_min=0, n_avg=1, source_cfg=3.5, target_cfg=13.5)
MODELS = ("scenes-sd15", "scenes-dit")


@dataclass
class Batch:
    """One edit kind's items, with everything the methods share (computed once, lazily)."""
    kind: str
    edits: list
    src: list = field(default_factory=list)  # Rendered
    gt: list = field(default_factory=list)
    cache: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)  # key -> seconds of building it, without what it used from the cache
    deps: dict = field(default_factory=dict)  # key -> the cache keys its building used
    used: set = field(default_factory=set)  # cache keys used by the method now running
    building: list = field(default_factory=list)  # seconds spent in nested builds, per open build
    ceilings: dict = field(default_factory=dict)  # latent key -> VAE Encode (Inversion)'s vae_ceiling of the source


def cached(b: Batch, key: str, build):
    """``b.cache[key]``, built once by ``build()``; the cost is recorded so that every row using it is charged."""
    if key not in b.cache:
        outer, b.used = b.used, set()
        b.building.append(0.0)
        t = _clock()
        try:
            b.cache[key] = build()
        finally:
            total, inner = _clock() - t, b.building.pop()
            b.cost[key], b.deps[key], b.used = total - inner, b.used, outer
            if b.building:
                b.building[-1] += total
    b.used.add(key)
    return b.cache[key]


def timed(b: Batch, fn) -> tuple:
    """(fn(), seconds charged, shared seconds, the cache keys charged): the call's own time plus the full cost of
    every cached value it used (and what those used), whether built during this call or before."""
    b.used = set()
    b.building.append(0.0)
    t = _clock()
    value = fn()
    elapsed, built = _clock() - t, b.building.pop()
    todo, seen = list(b.used), set()
    while todo:
        k = todo.pop()
        if k not in seen:
            seen.add(k)
            todo += b.deps.get(k, ())
    shared = sum(b.cost[k] for k in seen)
    return value, elapsed - built + shared, shared, sorted(seen)


class Setup:
    """One model of :data:`MODELS` loaded through core CheckpointLoaderSimple, with the run's settings.
    ``weights``: a folder of that model's weights (default: the committed ones; for ``scenes-dit`` without
    committed weights, or with ``weights="untrained"``, the seeded untrained stand-in, ``self.stand_in``)."""

    def __init__(self, model_name: str, steps: int, cfg: float, seed: int, weights=None, refine: int = REFINE,
                 nulltext_iterations: int = NULLTEXT["iterations"]):
        import torch
        B.boot(cpu=True)
        from ddiminv_dev.scenes import build, build_dit, dit
        if model_name not in MODELS:
            raise ValueError(f"unknown model {model_name!r}; known: {list(MODELS)}")
        builder = build if model_name == "scenes-sd15" else build_dit
        self.stand_in = False
        if model_name == "scenes-dit" and (weights == "untrained" or weights is None and not build_dit.has_weights()):
            weights, self.stand_in = dit.untrained_weights(), True
        path = builder.register_model_dir(weights, "untrained" if self.stand_in else "other")
        self.name, self.steps, self.cfg, self.seed, self.refine = model_name, steps, cfg, seed, refine
        self.nulltext = dict(NULLTEXT, iterations=nulltext_iterations)
        self.weights, self.checkpoint = builder.version(weights), path.name
        self.model, self.clip, self.vae = B.call("CheckpointLoaderSimple", path.name)[:3]
        self.family = B.pack("nodes._comfy").family_of(self.model)   # 'vp' or 'flow'
        self.torch = torch

    def cond(self, texts):
        """One CONDITIONING with a batch entry per text (what the nodes take for a batch of latents); each distinct
        text is encoded once per call. Not memoised here: a batch caches it (:func:`cached`), so that every row
        using it is charged for it."""
        torch = self.torch
        enc = {t: B.first(B.call("CLIPTextEncode", self.clip, t))[0] for t in dict.fromkeys(texts)}
        conds = [enc[t] for t in texts]
        extras = ({"pooled_output": torch.cat([c[1]["pooled_output"] for c in conds])}
                  if "pooled_output" in conds[0][1] else {})
        return [[torch.cat([c[0] for c in conds]), extras]]

    def pixels(self, images) -> object:
        return self.torch.from_numpy(np.stack(images).astype(np.float32) / 255.0)

    def encode(self, images, refine: int = 0) -> tuple[dict, float]:
        """(LATENT, vae_ceiling dB) from VAE Encode (Inversion), with ``refine`` iterations of decoder inversion."""
        out = B.pack("nodes.encode").DDIMInvVAEEncode.execute(self.pixels(images), self.vae, refine=refine)
        return B.first(out, 0), float(B.first(out, 1))

    def decode(self, samples) -> np.ndarray:
        img = B.first(B.call("VAEDecode", self.vae, {"samples": samples})).float().clamp(0, 1)
        return np.round(img.numpy() * 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ methods
def _src(S, b):
    return cached(b, "cond-source", lambda: S.cond([e.source_caption for e in b.edits]))


def _tgt(S, b):
    return cached(b, "cond-target", lambda: S.cond([e.target_caption for e in b.edits]))


def _neg(S, b):
    return cached(b, "cond-negative", lambda: S.cond([""] * len(b.edits)))


def _latent(S, b, refined: bool = False):
    """The source latent: VAE Encode (Inversion)'s posterior mean, or (``refined``) its latent refined by
    ``S.refine`` iterations of decoder inversion; the node's vae_ceiling of each is kept in ``b.ceilings``."""
    key = "latent-refined" if refined else "latent"

    def build():
        latent, db = S.encode([r.image for r in b.src], S.refine if refined else 0)
        b.ceilings[key] = db
        return latent
    return cached(b, key, build)


def _invert(S, b, method="ddim", refined: bool = False):
    def build():
        out = B.pack("nodes.invert").DDIMInvert.execute(S.model, _src(S, b), _neg(S, b), _latent(S, b, refined),
                                                        S.steps, 1.0, SCHED, method)
        return B.first(out, 2)
    return cached(b, "traj-" + method + ("-refined" if refined else ""), build)


def _sample(S, b, traj, **kw):
    out = B.pack("nodes.sampler").DDIMInvSampler.execute(S.model, _tgt(S, b), _neg(S, b), traj, S.cfg, **kw)
    return B.first(out)["samples"]


def sdedit(denoise: float):
    def run(S, b):
        out = B.call("KSampler", S.model, S.seed, S.steps, S.cfg, "euler", SCHED, _tgt(S, b), _neg(S, b),
                     _latent(S, b), denoise)
        return B.first(out)["samples"]
    return run


def core_flip(S, b):
    """Core FlipSigmas + SamplerCustom(euler): invert with the source prompt (cfg 1), regenerate with the target."""
    euler = B.first(B.core("KSamplerSelect").execute("euler"))
    sig = B.first(B.core("BasicScheduler").execute(S.model, SCHED, S.steps, 1.0))
    flipped = B.first(B.core("FlipSigmas").execute(sig))
    sc = B.core("SamplerCustom")
    inv = B.first(sc.execute(S.model, False, 0, 1.0, _src(S, b), _neg(S, b), euler, flipped, _latent(S, b)))
    return B.first(sc.execute(S.model, False, 0, S.cfg, _tgt(S, b), _neg(S, b), euler, sig, inv))["samples"]


def nulltext(mode: str):
    def run(S, b):
        nt = B.pack("nodes.nulltext").DDIMInvNullText
        out = nt.execute(S.model, _src(S, b), _neg(S, b), _invert(S, b), S.cfg, mode=mode, **S.nulltext)
        annotated = B.first(out, 1)
        return _sample(S, b, annotated)
    return run


def flowedit_params(steps: int, seed: int):
    """FlowEdit's :class:`inversion.flowedit.Params` at ``steps`` steps (n_max: :data:`FLOWEDIT`'s fraction of
    them, at least 1) as plain numbers: (n_max, n_min, n_avg, seed)."""
    n_max = min(steps, max(1, round(FLOWEDIT["n_max_fraction"] * steps)))
    return n_max, FLOWEDIT["n_min"], FLOWEDIT["n_avg"], int(seed)


def flowedit(S, b):
    """FlowEdit from the source latent (no inversion): the source pass (source prompt, CFG
    ``FLOWEDIT['source_cfg']``) records the source velocities, the target pass (target prompt, its CFG) edits;
    ``inversion.flowedit`` refuses a VP model."""
    C, FE = B.pack("nodes._comfy"), B.pack("inversion.flowedit")
    FE.check_family(S.family)
    x = C.to_model_space(S.model, _latent(S, b)["samples"])
    sig = C.sampling_sigmas(S.model, SCHED, S.steps)
    n_max, n_min, n_avg, seed = flowedit_params(S.steps, S.seed)
    p = FE.Params(n_max=n_max, n_min=n_min, n_avg=n_avg, seed=seed)
    shape = tuple(x.shape)

    def source(fn, device, progress):
        return FE.source_velocities(fn, x.to(device), sig, p, family=S.family, progress=progress)
    v = C.run_guided(S.model, _src(S, b), _neg(S, b), FLOWEDIT["source_cfg"], shape, sig, source, n_max - n_min,
                     "FlowEdit (source)")

    def target(fn, device, progress):
        return FE.edit(fn, x.to(device), sig, p, v, family=S.family, progress=progress)
    out = C.run_guided(S.model, _tgt(S, b), _neg(S, b), FLOWEDIT["target_cfg"], shape, sig, target, n_max,
                       "FlowEdit")
    return C.to_vae_space(S.model, out)


# name -> function(Setup, Batch) -> result latent (VAE space, [n, c, h, w]); add a method with one line
METHODS = {
    "sdedit 0.6 (core KSampler)": sdedit(0.6),
    "sdedit 0.8 (core KSampler)": sdedit(0.8),
    "core FlipSigmas+SamplerCustom": core_flip,
    "ddim (plain)": lambda S, b: _sample(S, b, _invert(S, b)),
    "exact, ddim replay": lambda S, b: _sample(S, b, _invert(S, b, "exact"), exact_replay="ddim"),
    "exact from refined latent": lambda S, b: _sample(S, b, _invert(S, b, "exact", refined=True),
                                                      exact_replay="ddim"),
    "ddim + source_drift": lambda S, b: _sample(S, b, _invert(S, b), correction="source_drift",
                                                source_positive=_src(S, b), source_negative=_neg(S, b)),
    "null-text": nulltext("null_text"),
    "negative-prompt": nulltext("negative_prompt"),
    "flowedit": flowedit,
}
# the families a method runs on ('vp': EPS / V, 'flow': CONST), when not both
ONLY = {"flowedit": ("flow",), "null-text": ("vp",), "negative-prompt": ("vp",)}
FAMILIES = ("vp", "flow")


def applies(method: str, family: str) -> bool:
    """Whether the row ``method`` runs on a model of ``family`` ('vp' or 'flow'): FlowEdit needs a flow model;
    null-text and negative-prompt stay on VP models (issue 32 lists the flow rows without them); the rest run
    on both."""
    if family not in FAMILIES:
        raise ValueError(f"family {family!r} is not one of {FAMILIES}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {list(METHODS)}")
    return family in ONLY.get(method, FAMILIES)


# ------------------------------------------------------------------------------------------------ scoring
def items(seed: int, n: int, kinds=E.KINDS) -> list[Batch]:
    rng = np.random.default_rng(int(seed))
    out = []
    for kind in kinds:
        b = Batch(kind, [E.random_edit(rng, R.sample_scene(rng, "test"), kind) for _ in range(n)])
        b.src = [R.render(e.source) for e in b.edits]
        b.gt = [R.render(e.target) for e in b.edits]
        out.append(b)
    return out


def held_out(edit: E.Edit) -> bool:
    """Whether the edit's target shows a colour x shape pair the model never saw in training."""
    return any((o.colour, o.shape) in R.HELD_OUT for o in edit.target.objects)


def score(edit: E.Edit, src: R.Rendered, gt: R.Rendered, result: np.ndarray) -> dict:
    """The measures of one result (uint8 [H, W, 3]) of ``edit``."""
    solid = gt.coverage >= 0.5
    if edit.kind == "background":
        acc = M.read_background(result, gt.masks.any(0)) == edit.target.background
        ious = [M.iou(M.segment(result, o.colour, M.dilate(m, 3)), s)
                for o, m, s in zip(edit.target.objects, gt.masks, solid, strict=True)]
        keep = np.stack([M._erode(s) for s in solid]).any(0)
        iou = float(np.mean(ious))
    else:
        i = edit.index
        o = edit.target.objects[i]
        window = M.dilate(src.masks[i] | gt.masks[i], 3)
        seg = M.segment(result, o.colour, window)
        acc = (M.read_colour(result, solid[i]) == o.colour if edit.kind == "colour"
               else M.read_shape(seg) == o.shape)
        iou = M.iou(seg, solid[i])
        keep = ~M.dilate(src.masks[i] | gt.masks[i], 2)
    return {"accuracy": float(acc), "iou": iou, "bg_psnr": M.bg_psnr(result, src.image, keep),
            "bg_ssim": M.bg_ssim(result, src.image, keep), "gt_psnr": M.psnr(result, gt.image)}


def mean(v):
    """Mean over the items that have the measure (None: not measurable); +inf (a perfect PSNR) counts as PSNR_CAP."""
    v = [PSNR_CAP if x == math.inf else x for x in v if x is not None]
    if any(not math.isfinite(x) for x in v):
        raise ValueError(f"mean: a non-finite measure {v}; a measure is a number, +inf (perfect PSNR) or None")
    return float(np.mean(v)) if v else None


def run(S, batches, methods, log=print) -> tuple[list, dict]:
    """The rows of ``methods`` that apply to ``S``'s model (:func:`applies`) on ``batches``: (rows, pictures
    {(kind, method): uint8 results})."""
    rows, pictures = [], {}
    left = [m for m in methods if not applies(m, S.family)]
    methods = [m for m in methods if applies(m, S.family)]
    if left:
        log(f"{S.name} ({S.family}): left out (do not apply): {', '.join(left)}")
    log(f"means over the items; a perfect item (infinite PSNR) counts as {PSNR_CAP:g} dB (PSNR_CAP); seconds charge "
        "each row for the encoding, conditioning and inversion it uses, shared or not")
    for b in batches:
        gt_dec = S.decode(B.first(B.call("VAEEncode", S.vae, S.pixels([r.image for r in b.gt])))["samples"])
        ceiling = [M.psnr(d, r.image) for d, r in zip(gt_dec, b.gt, strict=True)]
        for name in methods:
            latent, seconds, shared, charged = timed(b, lambda: METHODS[name](S, b))  # noqa: B023 (called at once)
            result = S.decode(latent)
            per = [score(e, s, g, r) for e, s, g, r in zip(b.edits, b.src, b.gt, result, strict=True)]
            row = {"model": S.name, "method": name, "edit": b.kind, "n": len(per),
                   **{k: mean([p[k] for p in per]) for k in ("accuracy", "iou", "bg_psnr", "bg_ssim", "gt_psnr")},
                   "gt_ceiling": mean(ceiling), "seconds": seconds, "shared_seconds": shared, "charged": charged,
                   "per_item": per}
            rows.append(row)
            pictures[(b.kind, name)] = result
            log(f"{b.kind:10s} {name:32s} acc {row['accuracy']:.2f} iou {row['iou']:.2f} "
                f"bg {row['bg_psnr']:.1f} dB/{row['bg_ssim']:.2f} gt {row['gt_psnr']:.1f} dB "
                f"(ceiling {row['gt_ceiling']:.1f}) {seconds:.1f}s ({shared:.1f}s shared)")
        if b.ceilings:
            log(f"{b.kind:10s} source VAE ceiling: " + ", ".join(f"{k} {v:.2f} dB" for k, v in b.ceilings.items()))
    return rows, pictures


def grid(batches, pictures, methods, path: Path, scale: int = 1) -> None:
    """A row per item (its edit and target caption on the left); columns: source, ground truth, each method."""
    from PIL import Image, ImageDraw
    label_w, side, head = 230, batches[0].src[0].image.shape[0] * scale, 28
    cols = ["source", "ground truth", *methods]
    n_rows = sum(len(b.edits) for b in batches)
    img = Image.new("RGB", (label_w + side * len(cols), head + side * n_rows), "white")
    d = ImageDraw.Draw(img)
    for j, c in enumerate(cols):
        x = label_w + j * side + 2
        d.text((x, 2), c[:21], fill="black")
        d.text((x, 14), c[21:42], fill="black")
    y = head
    for b in batches:
        for i, e in enumerate(b.edits):
            words = f"{b.kind}: {e.target_caption}".split(" ")
            lines, line = [], ""
            for w in words:
                if len(line) + len(w) > 36:
                    lines.append(line)
                    line = ""
                line += w + " "
            for k, t in enumerate([*lines, line]):
                d.text((4, y + 6 + 12 * k), t, fill="black")
            ims = [b.src[i].image, b.gt[i].image, *(pictures[(b.kind, m)][i] for m in methods)]
            for j, im in enumerate(ims):
                img.paste(Image.fromarray(im).resize((side, side), Image.NEAREST), (label_w + j * side, y))
            y += side
    img.save(path)


def plot(rows, path: Path, label=lambda r: r["method"]) -> None:
    """Accuracy against background PSNR, one marker per (method, edit): circle colour, square shape, triangle
    background; a colour per ``label(row)`` (the method; with several models, model and method) (PIL only)."""
    from PIL import Image, ImageDraw
    W, H, L, T, Bm = 900, 520, 60, 40, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    x0, x1, y0, y1 = L, W - 260, T, H - Bm
    d.rectangle([x0, y0, x1, y1], outline="black")
    d.text((L, 10), "edits on held-out scenes: accuracy vs background PSNR (o colour, [] shape, ^ background)",
           fill="black")
    lo, hi = 5.0, 45.0
    X = lambda v: x0 + (x1 - x0) * (min(max(v, lo), hi) - lo) / (hi - lo)  # noqa: E731
    Y = lambda v: y1 - (y1 - y0) * v  # noqa: E731
    for v in range(10, 45, 5):
        d.line([X(v), y0, X(v), y1], fill=(230, 230, 230))
        d.text((X(v) - 6, y1 + 4), str(v), fill="black")
    for k in range(6):
        d.text((x0 - 34, Y(k / 5) - 6), f"{k * 20}%", fill="black")
    d.text(((x0 + x1) // 2 - 90, y1 + 24), "background PSNR to the source, dB", fill="black")
    names = list(dict.fromkeys(label(r) for r in rows))
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (90, 90, 90), (188, 189, 34), (23, 190, 207)]
    for r in rows:
        if r["bg_psnr"] is None or r["accuracy"] is None:
            continue
        col = palette[names.index(label(r)) % len(palette)]
        x, y, s = X(r["bg_psnr"]), Y(r["accuracy"]), 6
        if r["edit"] == "colour":
            d.ellipse([x - s, y - s, x + s, y + s], outline=col, width=2)
        elif r["edit"] == "shape":
            d.rectangle([x - s, y - s, x + s, y + s], outline=col, width=2)
        else:
            d.polygon([(x, y - s), (x - s, y + s), (x + s, y + s)], outline=col, width=2)
    for i, n in enumerate(names):
        d.rectangle([x1 + 12, T + 16 * i, x1 + 22, T + 16 * i + 10], fill=palette[i % len(palette)])
        d.text((x1 + 28, T + 16 * i - 1), n, fill="black")
    img.save(path)


def parse_methods(text: str) -> list[str]:
    """``--methods``: ``all`` or comma-separated METHODS names; a name may itself hold a comma ("exact, ddim
    replay"), so pieces are joined until they name a method. ValueError names what is unknown."""
    if text.strip() == "all":
        return list(METHODS)
    out, piece = [], None
    for part in text.split(","):
        piece = part if piece is None else piece + "," + part
        if piece.strip() in METHODS:
            out.append(piece.strip())
            piece = None
    if piece is not None:
        raise ValueError(f"unknown methods {piece.strip()!r}; known: {list(METHODS)}")
    return out


def parse_models(text: str) -> list[str]:
    """``--models``: ``all`` (:data:`MODELS`) or comma-separated names; ValueError names what is unknown."""
    names = list(MODELS) if text.strip() == "all" else [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise ValueError(f"unknown models {unknown or text!r}; known: {list(MODELS)} or all")
    return list(dict.fromkeys(names))


def column(model: str, method: str, several: bool) -> str:
    """A grid / plot label: the method, prefixed with the model's short name when a run covers several."""
    return f"{model.removeprefix('scenes-')}: {method}" if several else method


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scenes", type=int, default=4, help="items per edit kind")
    ap.add_argument("--out", type=Path, default=B.OUT / "edit")
    ap.add_argument("--models", default="all",
                    help=f"comma-separated models of {', '.join(MODELS)}, or all (each row carries its model's name)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--refine", type=int, default=REFINE,
                    help="decoder-inversion iterations of the 'exact from refined latent' row (VAE Encode (Inversion) "
                         "refine; its seconds include them)")
    ap.add_argument("--weights", type=Path, default=None,
                    help="a folder of the SD1.5 scenes weights (default: the committed ddiminv_dev/scenes/weights)")
    ap.add_argument("--dit-weights", default=None,
                    help="a folder of the scenes DiT's weights (default: the committed ddiminv_dev/scenes/weights_dit, "
                         "else the seeded untrained stand-in), or 'untrained' (the stand-in: plumbing only)")
    ap.add_argument("--methods", default="all", help="comma-separated names of METHODS, or all")
    ap.add_argument("--kinds", default=",".join(E.KINDS))
    ap.add_argument("--nulltext-iterations", type=int, default=NULLTEXT["iterations"],
                    help="null-text optimisation iterations per step (the smoke run uses 1)")
    B.add_threads_arg(ap)
    a = ap.parse_args(argv)
    try:
        methods, models = parse_methods(a.methods), parse_models(a.models)
    except ValueError as e:
        ap.error(str(e))
    B.set_threads(a.threads)
    import torch
    torch.set_grad_enabled(False)  # null-text enables grad for itself
    t0 = time.perf_counter()
    several = len(models) > 1
    rows, pictures, columns, info = [], {}, [], {}
    for name in models:
        weights = a.weights if name == "scenes-sd15" else a.dit_weights
        S = Setup(name, a.steps, a.cfg, a.seed, weights, a.refine, a.nulltext_iterations)
        print(f"== {name}: {S.checkpoint} ({S.family}), weights {S.weights}"
              + (" -- an UNTRAINED stand-in: its numbers mean nothing" if S.stand_in else ""))
        batches = items(a.seed, a.scenes, tuple(a.kinds.split(",")))   # the same items for every model
        got, pics = run(S, batches, methods)
        rows += got
        for (kind, m), img in pics.items():
            pictures[(kind, column(name, m, several))] = img
        columns += [column(name, m, several) for m in methods if applies(m, S.family)]
        info[name] = {"checkpoint": S.checkpoint, "weights": S.weights, "family": S.family, "stand_in": S.stand_in,
                      "source_ceilings_db": {b.kind: b.ceilings for b in batches}}
    a.out.mkdir(parents=True, exist_ok=True)
    data = {"models": info, "seed": a.seed,
            "scenes": a.scenes, "steps": a.steps, "cfg": a.cfg, "scheduler": SCHED, "psnr_cap_db": PSNR_CAP,
            "refine": a.refine, "nulltext": S.nulltext,
            "flowedit": {**FLOWEDIT, "n_max": flowedit_params(a.steps, a.seed)[0], "seed": a.seed},
            "command": " ".join(["bench/edit.py", *(sys.argv[1:] if argv is None else argv)]),
            "items": {b.kind: [{"source": e.source_caption, "target": e.target_caption, "held_out_target": held_out(e)}
                               for e in b.edits] for b in batches},
            "machine": B.machine(), "seconds": time.perf_counter() - t0, "rows": rows}
    (a.out / "edit.json").write_text(json.dumps(B.clean(data), indent=1))
    grid(batches, pictures, columns, a.out / "edit_grid.png")
    plot(rows, a.out / "edit_plot.png", lambda r: column(r["model"], r["method"], several))
    print(f"wrote {a.out / 'edit.json'} in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
