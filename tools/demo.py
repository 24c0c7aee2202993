#!/usr/bin/env python3
"""Demo: invert a real photograph, reconstruct it with every method and at the guidance people sample with
(null-text inversion), through ComfyUI's real executor; then edit a scene whose edit has a known answer.

    make demo                      # the built-in learned model (below) on a held-out photograph crop
    make demo CKPT=<name>          # your checkpoint (SD1.x/SDXL/...) from your ComfyUI's checkpoints folder
    python tools/demo.py [--model learned|random] [--ckpt NAME] [--image PATH] [--size N] [--steps N]
                         [--source TEXT] [--target TEXT] [--cfg W] [--methods ddim,implicit,exact] [--out DIR]
                         [--refine N] [--edit-steps N] [--write-readme]

The built-in model is a tiny SD1.5-format checkpoint that this project trains itself
(``ddiminv_dev/learned``): a low-rank 320-channel one-level UNet and a TAESD autoencoder, trained on crops of
15 photographs bundled with scikit-image, conditioned on a seeded random CLIP-L's encoding of one caption per
photograph ("a cat", "a cup of coffee", ...). Its pictures are 64x64, recognisable but crude; the demo's
image is a crop of the cat photograph that training never saw. ``--model random`` uses the random-weight
tiny checkpoint of the plumbing tests instead (its pictures are noise).

What it runs: the example workflows, unmodified but for the model, image, prompts, steps and the budgets
below (``example_workflows/api``):
1. ``invert_and_reconstruct`` once per method (cfg 1): latent round-trip error, pixel PSNR against the
   source and the VAE ceiling (no reconstruction can beat it), evaluations, seconds; then ``exact`` once
   more from a *refined* latent (VAE Encode (Inversion) ``refine``: decoder inversion, ``--refine`` iterations),
   which raises the ceiling itself (row kind ``refined``; its latent error and ceiling are the refined latent's);
2. ``nulltext_reconstruct`` at cfg ``--cfg``: the CFG-1 inversion regenerated at that guidance by core
   KSamplerAdvanced, with the plain negative (drifts), the null-text negative, and the source prompt as the
   negative (negative-prompt inversion);
   with the learned model a small classifier (trained on held-out crops) says which photograph each result
   looks like;
3. the edit. Learned model: on the scenes model (``ddiminv_dev/scenes``, the world of bench/edit.py), a
   held-out scene and a colour swap (:data:`SCENES_EDIT`), so the rendered edited scene is the ground truth:
   source | ground truth | plain edit (ddim inversion, regenerated with the target prompt) | ours (exact
   inversion, ddim replay with the target prompt), each scored by bench/edit.py (accuracy by the pixel readers,
   IoU of the edited object, PSNR outside the dilated edit mask, PSNR to the ground truth), ``--edit-steps``
   steps. ``--model random`` / ``--ckpt``: ``nulltext_edit``, the three negatives of 2. regenerating the photo
   with the ``--target`` prompt.

Writes to out/ (or --out): source.png, one PNG per result, demo.png (the photo's results side by side, enlarged),
scenes_edit.png and scenes_<column>.png (the edit row) and metrics.json (``scenes_edit``: the edit row's
columns); prints the tables. ``--write-readme`` also rewrites the README's demo table and
docs/demo_metrics.json from this run. Budgets are explicit (BUDGETS), so the default run stays within
3 minutes on 2 CPU cores whatever the model does.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python tools/demo.py`: make the development package importable
    sys.path.insert(0, str(ROOT))
from ddiminv_dev import host, paths  # noqa: E402

API = ROOT / "example_workflows" / "api"
README = ROOT / "README.md"
DEMO_METRICS = ROOT / "docs" / "demo_metrics.json"
TABLE_START, TABLE_END = "<!-- demo-table:start -->", "<!-- demo-table:end -->"
METHODS = ("ddim", "implicit", "exact")
# per-method budgets: the most model evaluations any method may spend, whatever the model does
BUDGETS = {"ddim": {}, "implicit": {"max_iters": 8, "restarts": 1}, "exact": {}}
NULLTEXT = {"iterations": 10, "learning_rate": 0.01, "early_stop": 1e-5}
REFINE = 100   # decoder-inversion iterations of the refined row (bench/RESULTS.md: ~all of the gain by 100)
# The edit row (learned model): a held-out scene of the scenes world (ddiminv_dev/scenes: test split) and a colour
# swap, bench/edit.py's first colour item of this seed, so its rendered edited scene is the exact answer.
SCENES_EDIT = {"seed": 0, "steps": 10, "cfg": 5.0}
# plain edit, then our best row for colour edits by background PSNR. bench/edit.py --kinds colour --scenes 2
# --steps 8 (committed weights, UNet iteration 3,290) gave background PSNR 18.6 dB for exact -> ddim replay against
# 18.3 dB for source_drift (plain ddim 19.4): exact inverts without error, so only the target prompt moves the
# picture. Two items at 8 steps: within noise, so rerun that smoke when the trained weights land.
SCENES_METHODS = ("ddim (plain)", "exact, ddim replay")
PRESETS = {  # model -> defaults
    "learned": {"steps": 20, "cfg": 5.0, "source": "a cat", "target": "a cup of coffee", "size": 64},
    "random": {"steps": 10, "cfg": 5.0, "source": "a red house under a yellow sun",
               "target": "a blue house under a yellow sun", "size": 64},
    "ckpt": {"steps": 50, "cfg": 7.5, "source": "a photograph of a cat", "target": "a photograph of a dog",
             "size": 512},
}
NOTES = {
    "learned": "built-in learned tiny model: trained by this project on crops of 15 scikit-image photographs; "
               "64x64 pictures, recognisable but crude",
    "random": "tiny random-weight checkpoint (plumbing tests): its pictures are noise; the latent errors, "
              "evaluations and the graph mechanics are real",
    "ckpt": "",
}


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


# ------------------------------------------------------------------ host
class _QuietAudio(logging.Filter):
    """ComfyUI 0.3.75 without torchaudio logs ~35 lines of import tracebacks for its audio nodes (which this
    pack never uses); drop them and say so once."""
    WORDS = ("torchaudio", "nodes_audio", "some comfy_extras/ nodes did not import",
             "missing dependencies added the last time", "Please do a: pip install -r requirements.txt")

    def __init__(self):
        super().__init__()
        self.dropped = 0

    def filter(self, record):
        msg = record.getMessage()
        if any(w in msg for w in self.WORDS) or (self.dropped and not msg.strip()):
            self.dropped += 1
            return False
        return True


def checkpoint_or_exit(name: str) -> None:
    """A missing checkpoint is the first thing said, before ComfyUI boots (one line, no traceback)."""
    cp = paths.put_comfy_on_path()
    import folder_paths
    extra = cp / "extra_model_paths.yaml"
    if extra.exists():
        import utils.extra_config
        utils.extra_config.load_extra_path_config(str(extra))
    have = folder_paths.get_filename_list("checkpoints")
    if name not in have:
        sys.exit(f"demo: checkpoint {name!r} is not in your checkpoints folders "
                 f"{folder_paths.get_folder_paths('checkpoints')} (found {len(have)}: {have[:8]}); "
                 "put it there or pass one of those names as CKPT=")


def pick_device(model: str, force_cpu: bool) -> bool:
    """True for the CPU. The built-in models run on the CPU; a checkpoint runs on the GPU when there is one."""
    if model != "ckpt" or force_cpu:
        return True
    import torch
    if torch.cuda.is_available():
        return False
    say("no NVIDIA GPU found: running your checkpoint on the CPU (minutes per method at 512x512; "
        "pass --size 256 or --steps 20 to shorten it)")
    return True


# ------------------------------------------------------------------ pictures and numbers
def psnr(a, b) -> float:
    h, w = min(a.shape[1], b.shape[1]), min(a.shape[2], b.shape[2])
    mse = float(((a[:, :h, :w].double() - b[:, :h, :w].double()) ** 2).mean())
    return 100.0 if mse <= 1e-10 else -10.0 * math.log10(mse)


def to_pil(images, index: int = 0):
    from PIL import Image
    arr = (images[index].float().clamp(0, 1).cpu().numpy() * 255.0).round().astype("uint8")
    return Image.fromarray(arr)


def sheet(tiles: list, path: Path, min_side: int = 192) -> None:
    """Labelled tiles (label, PIL image) side by side, nearest-enlarged to at least ``min_side`` px."""
    from PIL import Image, ImageDraw
    scale = max(1, math.ceil(min_side / max(t[1].height for t in tiles)))
    ims = [(label, im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)) for label, im in tiles]
    gap, text_h = 6, 30
    out = Image.new("RGB", (sum(i.width for _, i in ims) + gap * (len(ims) + 1), ims[0][1].height + text_h + 2 * gap),
                    (24, 24, 28))
    d = ImageDraw.Draw(out)
    x = gap
    for label, im in ims:
        out.paste(im, (x, gap))
        for k, line in enumerate(label.split("\n")[:2]):
            d.text((x, gap + im.height + 2 + 13 * k), line, fill=(230, 230, 230))
        x += im.width + gap
    out.save(path)


def source_image(model: str, a, size: int):
    """(PIL image, where it came from)."""
    from PIL import Image, ImageOps
    if a.image:
        img = ImageOps.exif_transpose(Image.open(a.image)).convert("RGB")
        return ImageOps.fit(img, (size, size), Image.Resampling.LANCZOS), a.image
    if model == "learned":
        from ddiminv_dev.learned import data
        name = data.NAMES[data.caption_index(a.source)]
        return to_pil(data.demo_image(a.source)), f"held-out crop of scikit-image '{name}'"
    import numpy as np
    import skimage.data
    img = Image.fromarray(np.asarray(skimage.data.chelsea()))
    return ImageOps.fit(img, (size, size), Image.Resampling.LANCZOS), "scikit-image 'chelsea'"


# ------------------------------------------------------------------ the runs
class Runner:
    """Runs API workflows on one executor (checkpoint, encode and inversions are cached between runs) and
    counts every diffusion-model call."""

    def __init__(self, ckpt: str, image_name: str, steps: int, source: str, target: str, cfg: float):
        self.ex = host.new_executor()
        self.ckpt, self.image, self.steps = ckpt, image_name, steps
        self.source, self.target, self.cfg = source, target, cfg
        self.counter = None

    def prompt(self, name: str) -> tuple[dict, dict]:
        p = json.loads((API / f"{name}.api.json").read_text())
        ids = {}
        for k, n in p.items():
            ids.setdefault(n["class_type"], k)
            title = n.get("_meta", {}).get("title", "")
            if n["class_type"] == "CLIPTextEncode":
                ids[title] = k
        p[ids["LoadImage"]]["inputs"]["image"] = self.image
        p[ids["CheckpointLoaderSimple"]]["inputs"]["ckpt_name"] = self.ckpt
        p[ids["Source prompt"]]["inputs"]["text"] = self.source
        if "Edit prompt" in ids:
            p[ids["Edit prompt"]]["inputs"]["text"] = self.target
        for ct in ("DDIMInvert", "KSamplerAdvanced"):
            if ct in ids:
                p[ids[ct]]["inputs"]["steps"] = self.steps
        return p, ids

    def run(self, p: dict, outputs=None):
        res = host.execute(self.ex, p, outputs, expect_success=False)
        if not res.success:
            sys.exit(f"demo: the workflow failed: {res.error_text()}")
        if self.counter is None:  # count on the cached MODEL from now on: every node that uses it is counted
            from ddiminv_dev.counting import Counter
            ck = next(k for k, n in p.items() if n["class_type"] == "CheckpointLoaderSimple")
            self.counter = Counter(res.outputs(ck)[0], in_place=True)
        return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("learned", "random"), default="learned",
                    help="built-in model when no --ckpt is given (default: learned)")
    ap.add_argument("--ckpt", help="a checkpoint in your ComfyUI's checkpoints folders (runs on the GPU if any)")
    ap.add_argument("--image", help="source image (default: a held-out photograph crop / scikit-image's cat)")
    ap.add_argument("--size", type=int, help="square size of the source image in pixels")
    ap.add_argument("--steps", type=int, help="inversion and sampling steps")
    ap.add_argument("--source", help="the prompt describing the source image")
    ap.add_argument("--target", help="the edit prompt")
    ap.add_argument("--cfg", type=float, help="guidance for the null-text part (reconstruct and edit)")
    ap.add_argument("--methods", default=",".join(METHODS), help="reconstruction methods: " + ",".join(METHODS))
    ap.add_argument("--out", default=str(ROOT / "out"), help="output folder (default: out/)")
    ap.add_argument("--cpu", action="store_true", help="force the CPU for --ckpt")
    ap.add_argument("--refine", type=int, default=REFINE,
                    help=f"decoder-inversion iterations of the refined exact row (default {REFINE}; 0: no such row)")
    ap.add_argument("--edit-steps", type=int, default=SCENES_EDIT["steps"],
                    help=f"steps of the scenes edit (learned model; default {SCENES_EDIT['steps']})")
    ap.add_argument("--write-readme", action="store_true", help="rewrite README's demo table from this run")
    a = ap.parse_args(argv)
    model = "ckpt" if a.ckpt else a.model
    pre = PRESETS[model]
    steps, cfg = a.steps or pre["steps"], a.cfg or pre["cfg"]
    a.source, a.target = a.source or pre["source"], a.target or pre["target"]
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    if set(methods) - set(METHODS):
        ap.error(f"unknown method(s) {sorted(set(methods) - set(METHODS))}; use {','.join(METHODS)}")
    if a.write_readme and model != "learned":
        ap.error("--write-readme records the built-in learned model's run only")
    t_start = time.perf_counter()
    a.load_average = os.getloadavg()[0]  # the machine may be shared: say how busy it was when the run began
    if a.ckpt:
        checkpoint_or_exit(a.ckpt)
    cpu = pick_device(model, a.cpu)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ddiminv-demo-"))
    quiet = _QuietAudio()
    logging.getLogger().addFilter(quiet)
    try:
        host.boot(cpu=cpu, workdir=work, user_model_paths=True, fixtures=False)
        if quiet.dropped:
            say("ComfyUI's audio nodes are not loaded (no torchaudio, which ComfyUI 0.3.75 does not need); "
                "their import errors were hidden: this pack does not use them")
        logging.getLogger().removeFilter(quiet)
        metrics = demo(model, a, steps, cfg, methods, out, work, cpu, t_start)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if a.write_readme:
        write_readme(metrics)
    return 0


def _checkpoint(model: str, a) -> str:
    """The checkpoint's name: the built-in models are assembled once into .cache/models/checkpoints."""
    if model == "learned":
        from ddiminv_dev.learned import build
        if not build.is_built():
            say("assembling the learned checkpoint (once; .cache/models/checkpoints) ...")
        build.register_model_dir()
        return build.CKPT_NAME
    if model == "random":
        from ddiminv_dev import tiny_checkpoint
        if not tiny_checkpoint.is_built():
            say("generating the tiny random checkpoint (once; .cache/models/checkpoints) ...")
        tiny_checkpoint.register_model_dir()
        return tiny_checkpoint.CKPT_NAME
    return a.ckpt


class _Rows:
    """The demo's rows, measured against the encoded source (a ``refined`` row: its own refined latent and
    ceiling), with one picture each and a tile for the sheet."""

    def __init__(self, model: str, runner: Runner, out: Path, img):
        self.model, self.R, self.out = model, runner, out
        self.rows, self.tiles = [], [("source", img)]
        self.src_pixels = self.x0 = self.ceiling = self.fmt = None

    def record(self, label, res, ids, latent_node, seconds, nfe_invert=None, kind="reconstruction") -> dict:
        if self.src_pixels is None:
            self.src_pixels = res.outputs(ids["LoadImage"])[0]
            self.fmt = res.outputs(ids["CheckpointLoaderSimple"])[0].model.latent_format
            self.x0 = self.fmt.process_in(res.outputs(ids["DDIMInvVAEEncode"])[0]["samples"].double())
            self.ceiling = float(res.outputs(ids["DDIMInvVAEEncode"])[1])
        x_src, ceil = self.x0, self.ceiling
        if kind == "refined":
            x_src = self.fmt.process_in(res.outputs(ids["DDIMInvVAEEncode"])[0]["samples"].double())
            ceil = float(res.outputs(ids["DDIMInvVAEEncode"])[1])
        rec = self.fmt.process_in(res.outputs(latent_node)[0]["samples"].double())
        pic = res.outputs(ids["VAEDecode"])[0]
        row = {"what": label, "kind": kind, "latent_rel_error": float((rec - x_src).norm() / x_src.norm()),
               "psnr_db": psnr(pic, self.src_pixels), "vae_ceiling_db": ceil, "evaluations": self.R.counter.take(),
               "nfe_invert": nfe_invert, "seconds": round(seconds, 2)}
        if self.model == "learned":
            from ddiminv_dev.learned import classifier
            row["looks_like"] = classifier.predict_captions(pic.movedim(-1, 1))[0]
        self.rows.append(row)
        fname = label.replace(" ", "_").replace("/", "-").replace(",", "")
        to_pil(pic).save(self.out / f"{fname}.png")
        self.tiles.append((label + ("\n" + row["looks_like"] if "looks_like" in row else ""), to_pil(pic)))
        say(f"{label}: latent error {row['latent_rel_error']:.3g}, {row['psnr_db']:.2f} dB (ceiling "
            f"{ceil:.2f}), {row['evaluations']} evaluations, {seconds:.1f} s"
            + (f", looks like '{row['looks_like']}'" if "looks_like" in row else ""))
        return row


def _reconstructions(R: Runner, rows: _Rows, methods, steps: int) -> None:
    """1. reconstruction at cfg 1, per method."""
    for m in methods:
        p, ids = R.prompt("invert_and_reconstruct")
        p[ids["DDIMInvert"]]["inputs"].update(method=m, **BUDGETS[m])
        if m == "exact":  # the demo's evaluation counter wraps the model, and the guidance fingerprint counts an
            # unhashable wrapper as "other guidance" (auto would replay ddim): ask for the BDIA replay outright
            p[ids["DDIMInvSampler"]]["inputs"]["exact_replay"] = "bdia"
        say(f"{m}: inverting and regenerating ({steps} steps, cfg 1"
            + (f", budget {BUDGETS[m]}" if BUDGETS[m] else "") + ") ...")
        if R.counter is None:  # load the checkpoint and encode the image once (setup, not counted)
            t0 = time.perf_counter()
            R.run(p, outputs=[ids["DDIMInvVAEEncode"]])
            say(f"setup: checkpoint loaded and image encoded in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        res = R.run(p)
        traj = res.outputs(ids["DDIMInvert"])[2]
        rows.record(m, res, ids, ids["DDIMInvSampler"], time.perf_counter() - t0, int(traj.nfe))


def _refined(R: Runner, rows: _Rows, refine: int, steps: int) -> None:
    """1b. exact from a refined latent (decoder inversion raises the ceiling the reconstruction is bounded by)."""
    label = f"exact, refine {refine}"
    p, ids = R.prompt("invert_and_reconstruct")
    p[ids["DDIMInvert"]]["inputs"].update(method="exact", **BUDGETS["exact"])
    p[ids["DDIMInvSampler"]]["inputs"]["exact_replay"] = "bdia"
    p[ids["DDIMInvVAEEncode"]]["inputs"]["refine"] = refine
    say(f"{label}: refining the latent ({refine} iterations of decoder inversion) ...")
    t0 = time.perf_counter()
    R.run(p, outputs=[ids["DDIMInvVAEEncode"]])
    refine_s = time.perf_counter() - t0
    say(f"{label}: refined in {refine_s:.1f} s; inverting and regenerating ({steps} steps, cfg 1) ...")
    t0 = time.perf_counter()
    res = R.run(p)
    row = rows.record(label, res, ids, ids["DDIMInvSampler"], time.perf_counter() - t0,
                      int(res.outputs(ids["DDIMInvert"])[2].nfe), kind="refined")
    row["refine_seconds"] = round(refine_s, 2)


def _guided(R: Runner, rows: _Rows, cfg: float, target: str, edit: bool = True) -> None:
    """2. reconstruction at cfg W (core KSamplerAdvanced) and (``edit``) 3. the edit of the photograph
    (Inverted-Latent Sampler), each with the plain negative, the null-text negative and the source prompt as
    negative (negative-prompt inversion)."""
    parts = (("nulltext_reconstruct", "KSamplerAdvanced", "", "reconstruction"),
             ("nulltext_edit", "DDIMInvSampler", "edit ", "edit"))
    for workflow, sampler, prefix, kind in parts[:2 if edit else 1]:
        for how, name in (("plain", "plain"), ("null_text", "null-text"), ("negative_prompt", "neg-prompt")):
            label = f"{prefix}{name} cfg {cfg:g}"
            p, ids = R.prompt(workflow)
            p[ids["DDIMInvNullText"]]["inputs"].update(cfg=cfg, mode="null_text" if how == "plain" else how,
                                                       **NULLTEXT)
            p[ids[sampler]]["inputs"]["cfg"] = cfg
            if how == "plain":  # bypass the null-text node: the pivot and the plain negative
                if sampler == "KSamplerAdvanced":
                    p[ids[sampler]]["inputs"]["negative"] = [ids["Negative prompt"], 0]
                else:
                    p[ids[sampler]]["inputs"]["trajectory"] = [ids["DDIMInvert"], 2]
                del p[ids["DDIMInvNullText"]]
            say(f"{label}: {sampler} at cfg {cfg:g}" + (f", '{target}'" if kind == "edit" else "") + " ...")
            t0 = time.perf_counter()
            res = R.run(p)
            rows.record(label, res, ids, ids[sampler], time.perf_counter() - t0, kind=kind)


def scene_columns(edit, src, gt, results: dict) -> list[dict]:
    """The scenes edit's columns: source, ground truth, then each method's result (uint8 [H, W, 3]), each scored
    by bench/edit.py's :func:`score` against the source and the ground truth; +inf PSNR (identical pixels) is
    recorded as its PSNR_CAP."""
    from bench import edit as EB
    out = []
    for what, img in [("source", src.image), ("ground truth", gt.image), *results.items()]:
        sc = EB.score(edit, src, gt, img)
        cap = {k: EB.PSNR_CAP if sc[k] == math.inf else sc[k] for k in ("bg_psnr", "gt_psnr")}
        out.append({"what": what, "accuracy": sc["accuracy"], "iou": sc["iou"], "bg_psnr_db": cap["bg_psnr"],
                    "gt_psnr_db": cap["gt_psnr"]})
    return out


def _scenes_edit(out: Path, steps: int) -> dict:
    """3. the edit: a held-out scene and a colour swap on the scenes model (bench/edit.py's Setup, items, methods,
    scoring and grid); writes scenes_edit.png (source | ground truth | plain | ours) and one PNG per column."""
    from PIL import Image

    from bench import _common as B
    from bench import edit as EB
    B.boot(cpu=True, fixtures=False)  # adopt the demo's boot (no test fixtures)
    seed, cfg = SCENES_EDIT["seed"], SCENES_EDIT["cfg"]
    S = EB.Setup("scenes-sd15", steps, cfg, seed)
    b = EB.items(seed, 1, ("colour",))[0]
    e, src, gt = b.edits[0], b.src[0], b.gt[0]
    say(f"scenes edit: {S.checkpoint}, held-out scene '{e.source_caption}' -> '{e.target_caption}' "
        f"({steps} steps, cfg {cfg:g}) ...")
    with S.torch.no_grad():
        rows, pictures = EB.run(S, [b], SCENES_METHODS, log=lambda msg: say("scenes edit: " + msg.strip()))
    results = {m: pictures[("colour", m)][0] for m in SCENES_METHODS}
    cols = scene_columns(e, src, gt, results)
    seconds = {r["method"]: round(r["seconds"], 2) for r in rows}
    for c in cols:
        c["seconds"] = seconds.get(c["what"])
    for c, img in zip(cols, [src.image, gt.image, *results.values()], strict=True):
        Image.fromarray(img).save(out / ("scenes_" + c["what"].replace(" ", "_").replace(",", "") + ".png"))
    EB.grid([b], pictures, list(SCENES_METHODS), out / "scenes_edit.png", scale=2)
    return {"checkpoint": S.checkpoint, "weights": S.weights, "seed": seed, "steps": steps, "cfg": cfg,
            "scheduler": EB.SCHED, "source_prompt": e.source_caption, "target_prompt": e.target_caption,
            "held_out_target": EB.held_out(e), "gt_ceiling_db": rows[0]["gt_ceiling"], "columns": cols}


DEFINITIONS = {
    "latent_rel_error": "||x - x_src|| / ||x_src|| in model space (x_src: the encoded source)",
    "psnr_db": "PSNR (data range 1) of the decoded result against the source image",
    "vae_ceiling_db": "PSNR of decode(encode(image)): no reconstruction can beat it (refined row: of "
                      "decode(refined latent))",
    "refine_seconds": "refined row: seconds of the decoder inversion (VAE Encode (Inversion) refine)",
    "evaluations": "diffusion-model calls of the run (inversion, optimisation and sampling)",
    "looks_like": "the learned model's classifier: which photograph the result looks like",
    "scenes_edit": "the edit on the scenes model (bench/edit.py's measures): accuracy = the pixel readers read the "
                   "target colour on the object; iou = the object segmented by its target colour against the "
                   "ground-truth mask; bg_psnr_db = PSNR against the source outside the edit mask dilated by 2 px; "
                   "gt_psnr_db = PSNR against the ground truth (gt_ceiling_db: its VAE round trip); identical "
                   "pixels count as 100 dB",
}


def demo(model, a, steps, cfg, methods, out, work, cpu, t_start) -> dict:
    import torch
    ckpt = _checkpoint(model, a)
    img, origin = source_image(model, a, a.size or PRESETS[model]["size"])
    img.save(out / "source.png")
    img.save(work / "input" / "ddiminv_demo.png")
    R = Runner(ckpt, "ddiminv_demo.png", steps, a.source, a.target, cfg)
    say(f"{ckpt}: {img.width}x{img.height} {origin}; {steps} steps; '{a.source}' -> '{a.target}' at cfg {cfg:g}")

    rows = _Rows(model, R, out, img)
    _reconstructions(R, rows, methods, steps)
    if a.refine > 0 and "exact" in methods:
        _refined(R, rows, a.refine, steps)
    _guided(R, rows, cfg, a.target, edit=model != "learned")
    scenes = _scenes_edit(out, a.edit_steps) if model == "learned" else None

    sheet(rows.tiles, out / "demo.png")
    total = time.perf_counter() - t_start
    metrics = {
        "model": model, "checkpoint": R.ckpt, "note": NOTES[model], "image": origin,
        "size": [img.width, img.height], "steps": steps, "cfg": cfg, "source_prompt": a.source,
        "target_prompt": a.target, "budgets": BUDGETS, "nulltext": NULLTEXT, "device": "cpu" if cpu else "cuda",
        "torch_threads": torch.get_num_threads(), "total_seconds": round(total, 1),
        "cpu_seconds": round(time.process_time(), 1), "load_average": round(a.load_average, 2), "results": rows.rows,
        "scenes_edit": scenes, "definitions": DEFINITIONS,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print()
    print(format_table(metrics))
    print()
    say(f"total {total:.1f} s; wrote {out}/: source.png, one PNG per row, demo.png, metrics.json"
        + (", scenes_edit.png and one scenes_*.png per column" if scenes else ""))
    if NOTES[model]:
        say(f"note: {NOTES[model]}")
    return metrics


# ------------------------------------------------------------------ README
def format_table(m: dict) -> str:
    """The README's demo table, from a metrics.json."""
    lines = [f"`make demo` on the {m['note'] or m['checkpoint']}: {m['image']}, {m['size'][0]}x{m['size'][1]}, "
             f"{m['steps']} steps, '{m['source_prompt']}' -> '{m['target_prompt']}', {m['device']}, "
             f"{m['total_seconds']:.0f} s in all ({m['cpu_seconds']:.0f} s of CPU, {m['torch_threads']} torch "
             f"thread(s), load average {m['load_average']:.1f} at the start). Budgets: implicit "
             f"max_iters {m['budgets']['implicit']['max_iters']}, restarts {m['budgets']['implicit']['restarts']}; "
             f"null-text {m['nulltext']['iterations']} iterations/step.", "",
             "| run | latent error | PSNR dB (ceiling) | evaluations | seconds | classifier says |",
             "|---|---|---|---|---|---|"]
    for r in m["results"]:
        lines.append(f"| {r['what']} | {r['latent_rel_error']:.3g} | {r['psnr_db']:.2f} ({r['vae_ceiling_db']:.2f}) | "
                     f"{r['evaluations']} | {r['seconds']:.1f} | {r.get('looks_like', '-')} |")
    mean_ceiling = next((r["vae_ceiling_db"] for r in m["results"] if r["kind"] != "refined"), None)
    for r in m["results"]:
        if r["kind"] == "refined":
            lines += ["", f"{r['what']}: the latent refined by decoder inversion (VAE Encode (Inversion) refine) in "
                          f"{r['refine_seconds']:.1f} s, not counted in its seconds; its ceiling is the refined "
                          f"latent's ({r['vae_ceiling_db']:.2f} dB against the mean's {mean_ceiling:.2f} dB)."]
    if m.get("scenes_edit"):
        lines += ["", *format_scenes(m["scenes_edit"])]
    return "\n".join(lines)


def format_scenes(s: dict) -> list[str]:
    """The edit row's table: one line per column of scenes_edit.png."""
    lines = [f"Edit on the scenes model ({s['checkpoint']}, weights {s['weights']}): held-out scene "
             f"'{s['source_prompt']}' -> '{s['target_prompt']}', seed {s['seed']}, {s['steps']} steps, cfg "
             f"{s['cfg']:g}; the ground truth's VAE round trip scores {s['gt_ceiling_db']:.2f} dB against it.", "",
             "| column | accuracy | IoU | background PSNR dB | PSNR to ground truth dB | seconds |",
             "|---|---|---|---|---|---|"]
    for c in s["columns"]:
        sec = "-" if c["seconds"] is None else f"{c['seconds']:.1f}"
        lines.append(f"| {c['what']} | {c['accuracy']:.0%} | {c['iou']:.2f} | {c['bg_psnr_db']:.2f} | "
                     f"{c['gt_psnr_db']:.2f} | {sec} |")
    return lines


def write_readme(m: dict) -> None:
    text = README.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        sys.exit(f"demo: README.md has no {TABLE_START} ... {TABLE_END} block")
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    README.write_text(head + TABLE_START + "\n" + format_table(m) + "\n" + TABLE_END + tail)
    DEMO_METRICS.write_text(json.dumps(m, indent=2) + "\n")
    say(f"rewrote the demo table in {README.name} and {DEMO_METRICS.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
