"""Speed of DDIM Invert against core ComfyUI on the same model, in one process, interleaved (CPU).

Variants (same model, steps, scheduler ``ddim_uniform`` and CFG; every loop under ``torch.no_grad()``):

* ``ours``        DDIMInvert (method ddim) called in-process: the whole node (CFGGuider, model load, checks,
                  trajectory recording, VAE-space output);
* ``ksampler``    core KSampler (sampler ddim), a plain generation of the same length;
* ``flip``        core FlipSigmas(BasicScheduler) + SamplerCustom(euler, add_noise off): core's inversion;
* ``raw``         the diffusion model's forwards alone: ``model.model.apply_model`` ``steps`` times (cond and
                  uncond batched into one forward when CFG > 1, as ComfyUI does) -- the floor for a loop.

Also the cost of an attention-controlled edit (p2p, masactrl; and v_inject on the tiny Flux) over a plain edit,
the trajectory-capture overhead (the core has no switch to turn recording off, so: the math core's
``invert`` vs a bare DDIM loop calling the same ``model_fn``, and the node vs that bare loop) and batch 1 vs
batch 8 for ours and KSampler. Medians of ``--repeats`` interleaved rounds. Timings only, no assertions.

    .venv/bin/python bench/speed.py            # tiny SD1.5-architecture UNet, 256x256 (latent 32x32), 20 steps
    .venv/bin/python bench/speed.py --quick    # smoke: 64x64, 3 steps, 1 repeat (~20 s)

Writes bench/out/speed.json (speed_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import _common as B  # noqa: E402

SCHED = "ddim_uniform"


def _ctx(model, cond):
    """c_crossattn and any extra model kwargs (SDXL's y) for a raw apply_model call, via the model's
    own ``extra_conds`` (what CFGGuider does), so raw forwards see exactly what the samplers feed."""
    c = cond[0]
    kw = dict(c[1])
    kw["cross_attn"] = c[0]
    return kw


def raw_forwards(model, positive, negative, x, steps: int, cfg: float, device):
    """The floor: ``steps`` diffusion-model forwards via model.model.apply_model (batch 2B when CFG > 1)."""
    import torch

    mm = model.model
    B_ = x.shape[0]
    pairs = [positive] if cfg == 1.0 else [positive, negative]
    conds = []
    for cond in pairs:
        kw = dict(cond[0][1])
        out = mm.extra_conds(
            input=x,
            noise=x,
            device=device,
            cross_attn=cond[0][0].to(device),
            **{k: v for k, v in kw.items() if k != "cross_attn"},
        )
        conds.append(out)
    # batch cond (+ uncond) like calc_cond_batch: concatenate each conditioning along the batch
    keys = conds[0].keys()
    c = {}
    for k in keys:
        vals = [
            cc[k].process_cond(batch_size=B_, device=device).cond if hasattr(cc[k], "process_cond") else cc[k]
            for cc in conds
        ]
        c[k] = torch.cat(vals) if isinstance(vals[0], torch.Tensor) else vals[0]
    xb = torch.cat([x] * len(pairs)).to(device)
    sig = model.get_model_object("model_sampling").sigmas
    ts = [float(sig[-1]) * (1.0 - i / max(steps, 1)) + 1e-3 for i in range(steps)]

    def run():
        with torch.no_grad():
            for s in ts:
                mm.apply_model(xb, torch.full((xb.shape[0],), s, device=device), **c)

    return run, c


def variants(model, positive, negative, latent, steps: int, cfg: float, device):
    """name -> zero-arg callable for one run of each variant (all under no_grad)."""
    import torch
    import comfy.model_management

    nodes = B._STATE["nodes"]
    inv = B.pack("nodes.invert").DDIMInvert
    euler = B.first(B.core("KSamplerSelect").execute("euler"))
    sig = B.first(B.core("BasicScheduler").execute(model, SCHED, steps, 1.0))
    flipped = B.first(B.core("FlipSigmas").execute(sig))
    ks = nodes.KSampler()
    sc = B.core("SamplerCustom")
    comfy.model_management.load_models_gpu([model])
    x = model.model.latent_format.process_in(latent["samples"].clone()).to(device)
    raw, _ = raw_forwards(model, positive, negative, x, steps, cfg, device)

    def ng(fn):
        def run():
            with torch.no_grad():
                return fn()

        return run

    return {
        "ours": ng(lambda: inv.execute(model, positive, negative, latent, steps, cfg, SCHED, "ddim")),
        "ksampler": ng(lambda: ks.sample(model, 0, steps, cfg, "ddim", SCHED, positive, negative, latent)),
        "flip": ng(lambda: sc.execute(model, False, 0, cfg, positive, negative, euler, flipped, latent)),
        "raw": raw,
    }


def capture_overhead(model, positive, latent, steps: int, repeats: int, device) -> dict:
    """Math core ``invert`` (records every state and x0 estimate) vs a bare DDIM loop with the same
    ``model_fn`` (keeps nothing), and the DDIM Invert node vs that bare loop. CFG 1."""
    import torch
    import comfy.samplers

    methods = B.pack("inversion.methods")
    mm = model.model
    x0 = mm.latent_format.process_in(latent["samples"].clone()).to(device)
    kw = {"c_crossattn": positive[0][0].to(device).repeat(x0.shape[0], 1, 1)}
    extra = mm.extra_conds(
        input=x0,
        noise=x0,
        device=device,
        cross_attn=positive[0][0].to(device),
        **{k: v for k, v in positive[0][1].items()},
    )
    kw = {k: (v.process_cond(batch_size=x0.shape[0], device=device).cond) for k, v in extra.items()}

    def model_fn(x, sigma):
        return mm.apply_model(x, torch.full((x.shape[0],), float(sigma), device=device), **kw).float()

    full = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), SCHED, steps).cpu().float()
    asc = torch.flip(full, [0])
    asc = asc[asc > 0] if float(asc[0]) == 0 else asc
    asc = torch.cat([torch.zeros(1), asc])
    sig = [float(v) for v in asc]

    def bare():
        with torch.no_grad():
            x = x0.clone()
            for i in range(len(sig) - 1):
                s, t = sig[i], sig[i + 1]
                se = s if s > 0 else min(methods.FIRST_EVAL_SIGMA, t / 2)
                D = model_fn(x, se)
                x = x + (t - s) * (x - D) / se
            return x

    def core():
        return methods.invert(x0, asc, model_fn, methods.Options(method="ddim", eval_sigma="current"), family="vp")

    inv = B.pack("nodes.invert").DDIMInvert
    cond = positive

    def node():
        with torch.no_grad():
            return inv.execute(model, cond, cond, latent, steps, 1.0, SCHED, "ddim", eval_sigma="current")

    # sanity: the bare loop and the core reach the same noise
    xb, tr = bare(), core()
    same = float((xb.float() - tr.noise.to(xb.device).float()).abs().max())
    t = B.interleaved({"bare_loop": bare, "core_invert": core, "node": node}, repeats, device=device)
    return {
        "times": t,
        "max_abs_diff_bare_vs_core": same,
        "core_over_bare": t["core_invert"]["median_s"] / t["bare_loop"]["median_s"],
        "node_over_bare": t["node"]["median_s"] / t["bare_loop"]["median_s"],
    }


def attention_cost(model, positive, negative, latent, steps: int, cfg: float, repeats: int, device) -> dict:
    """An attention-controlled edit against a plain edit on the same trajectory (the Inverted-Latent Sampler,
    in-process): p2p (replace, every layer) and masactrl (decoder blocks), timed interleaved. The issue's goal is
    <= 2.1x at the same steps. The source branch evaluates only what records (p2p: the cond chunk while its
    windows are open; masactrl: both chunks from its window's start), plus the maps."""
    import torch

    A, P = B.pack("inversion.attention"), B.pack("inversion.p2p")
    inv, smp = B.pack("nodes.invert").DDIMInvert, B.pack("nodes.sampler").DDIMInvSampler
    words = P.prompt_info(P.Prompt(("a", "b", "c"), ((1, 2), (2, 3), (3, 4)), int(positive[0][0].shape[1])))
    src = [[t, {**o, P.PROMPT_KEY: words}] for t, o in positive]
    edit = [[t * 1.1, {**o, P.PROMPT_KEY: words}] for t, o in positive]
    with torch.no_grad():
        traj = inv.execute(model, src, negative, latent, steps, cfg, SCHED, "ddim").result[2]
    ctl = {"p2p": A.Control("p2p"), "masactrl": A.Control("masactrl", self_window=A.Window(0.08, 1.0),
                                                          blocks=("output", 0, 11))}

    def run(control):
        def go():
            with torch.no_grad():
                return smp.execute(model, edit, negative, traj, cfg, source_positive=src, attention_control=control)
        return go
    v = {"plain": run(None), **{k: run(c) for k, c in ctl.items()}}
    evals = {k: evaluations_per_step(v[k]()) for k in ctl}
    t = B.interleaved(v, repeats, device=device)
    med = {k: t[k]["median_s"] for k in t}
    return {"cfg": cfg, "times": t, "p2p/plain": med["p2p"] / med["plain"],
            "masactrl/plain": med["masactrl"] / med["plain"], "evaluations_per_step": evals}


def evaluations_per_step(result) -> float:
    """The model evaluations per step the sampler's text reports for an attention-controlled edit (batch rows
    against a plain edit's: 1.0 plain, 2.0 a source branch of every chunk at every step)."""
    text = "\n".join(result.ui.as_dict()["text"])
    found = re.search(r"([0-9.]+) evaluations per step", text)
    if found is None:
        raise RuntimeError(f"the sampler's text reports no evaluations per step: {text[-300:]}")
    return float(found.group(1))


def compare(
    model,
    positive,
    negative,
    make_latent,
    steps: int,
    cfgs,
    repeats: int,
    batches,
    device,
    log=print,
    peak_memory: bool = False,
) -> dict:
    """The ratios table for one model: for each CFG (batch 1) all four variants; then batch scaling."""
    import torch

    res = {"steps": steps, "cfgs": list(cfgs), "repeats": repeats, "by_cfg": {}, "batch": {}}
    for cfg in cfgs:
        v = variants(model, positive, negative, make_latent(1), steps, cfg, device)
        t = B.interleaved(v, repeats, device=device)
        med = {k: t[k]["median_s"] for k in t}
        ratios = {
            "ours/ksampler": med["ours"] / med["ksampler"],
            "ours/raw": med["ours"] / med["raw"],
            "ksampler/raw": med["ksampler"] / med["raw"],
            "flip/raw": med["flip"] / med["raw"],
            "ours/flip": med["ours"] / med["flip"],
        }
        mn = {k: t[k]["min_s"] for k in t}
        entry = {
            "times": t,
            "ratios": ratios,  # medians; minimums are steadier on a shared machine
            "ratios_of_minimums": {
                "ours/ksampler": mn["ours"] / mn["ksampler"],
                "ours/raw": mn["ours"] / mn["raw"],
                "ksampler/raw": mn["ksampler"] / mn["raw"],
                "flip/raw": mn["flip"] / mn["raw"],
            },
        }
        if peak_memory and torch.cuda.is_available():
            mem = {}
            for k in ("ours", "ksampler", "flip"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                v[k]()
                torch.cuda.synchronize()
                mem[k] = {
                    "peak_bytes": torch.cuda.max_memory_allocated(),
                    "peak_over_start_bytes": torch.cuda.max_memory_allocated() - base,
                }
            entry["peak_memory"] = mem
            entry["ratios"]["peak_mem_ours/ksampler"] = mem["ours"]["peak_over_start_bytes"] / max(
                mem["ksampler"]["peak_over_start_bytes"], 1
            )
        res["by_cfg"][str(cfg)] = entry
        log(
            f"cfg {cfg:g}, batch 1, {steps} steps: "
            + "  ".join(f"{k} {med[k] * 1e3:.1f} ms" for k in med)
            + "  | "
            + "  ".join(f"{k} {r:.3f}" for k, r in ratios.items())
        )
    cfg = cfgs[0]
    per = {}
    for b in batches:
        v = variants(model, positive, negative, make_latent(b), steps, cfg, device)
        t = B.interleaved({k: v[k] for k in ("ours", "ksampler", "raw")}, repeats, device=device)
        per[b] = {k: t[k]["median_s"] for k in t}
        per[b]["images_per_s_ours"] = b / per[b]["ours"]
        per[b]["images_per_s_ksampler"] = b / per[b]["ksampler"]
    if len(batches) > 1:
        b0, b1 = batches[0], batches[-1]
        res["batch"] = {
            "cfg": cfg,
            "by_batch": per,
            f"ours_b{b1}/b{b0}": per[b1]["ours"] / per[b0]["ours"],
            f"ksampler_b{b1}/b{b0}": per[b1]["ksampler"] / per[b0]["ksampler"],
            f"ours/ksampler_b{b1}": per[b1]["ours"] / per[b1]["ksampler"],
        }
        log(
            f"batch {b0} -> {b1} (cfg {cfg:g}): ours x{res['batch'][f'ours_b{b1}/b{b0}']:.2f} time, "
            f"ksampler x{res['batch'][f'ksampler_b{b1}/b{b0}']:.2f};  "
            f"images/s ours {per[b0]['images_per_s_ours']:.2f} -> {per[b1]['images_per_s_ours']:.2f}, "
            f"ksampler {per[b0]['images_per_s_ksampler']:.2f} -> {per[b1]['images_per_s_ksampler']:.2f}"
        )
    return res


def vinject_cost(model, src, edit, neg, latent, steps: int, repeats: int, device, window=(0.0, 0.5)) -> dict:
    """Value injection (v_inject, the model's default blocks) against a plain edit on one DiT, cfg 1 (Flux dev's
    distilled guidance), the same ddim trajectory, timed interleaved. ``window``: fractions of the steps
    (RF-Edit's default is the first 10%; 0..0.5, the dearer case, in the CPU bench). Every step evaluates
    source + edit (the source branch runs every step); the window's steps also record and swap the values."""
    import torch

    A = B.pack("inversion.attention")
    inv, smp = B.pack("nodes.invert").DDIMInvert, B.pack("nodes.sampler").DDIMInvSampler
    with torch.no_grad():
        traj = inv.execute(model, src, neg, latent, steps, 1.0, SCHED, "ddim").result[2]
    ctl = A.Control(**{**A.defaults("v_inject").__dict__, "blocks": A.FAMILY, "self_window": A.Window(*window)})

    def run(control):
        def go():
            with torch.no_grad():
                return smp.execute(model, edit, neg, traj, 1.0, source_positive=src, attention_control=control)
        return go
    evals = evaluations_per_step(run(ctl)())
    t = B.interleaved({"plain": run(None), "v_inject": run(ctl)}, repeats, device=device)
    med = {k: t[k]["median_s"] for k in t}
    return {"cfg": 1.0, "window": list(window), "latent": list(latent["samples"].shape), "times": t,
            "v_inject/plain": med["v_inject"] / med["plain"], "evaluations_per_step": evals}


def flux_attention_cost(steps: int, repeats: int, device) -> dict:
    """:func:`vinject_cost` on the tiny Flux (ddiminv_dev/tiny_families.py 'Flux': one double and one single
    block, patch 2, its own latent size), window 0..0.5."""
    from ddiminv_dev import tiny_families as tf

    src, edit, neg = tf.conditioning("Flux", 1), tf.conditioning("Flux", 2), tf.conditioning("Flux", 9)
    return vinject_cost(tf.tiny_model("Flux"), src, edit, neg, tf.latent("Flux"), steps, repeats, device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="64x64, 3 steps, 1 repeat, batch 1 vs 2 (smoke test)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (latent = size / 8)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cfgs", default="1,7.5")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--attention-only", action="store_true",
                    help="only the attention-control rows (p2p/masactrl/v_inject against a plain edit)")
    ap.add_argument("--source-every-step", action="store_true",
                    help="for comparison: the source branch evaluates every chunk at every step, as before it "
                         "skipped what records nothing (inversion.attention.source_chunks)")
    B.add_threads_arg(ap)
    a = ap.parse_args(argv)
    B.set_threads(a.threads)
    if a.quick:
        a.steps, a.size, a.repeats, a.batches = 3, 64, 1, "1,2"
    t0 = time.perf_counter()
    B.boot(cpu=True)
    import torch
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    from ddiminv_dev import tiny_models as T

    model = T.tiny_model("eps")
    pos, neg = T.tiny_conditioning("eps", 0), T.tiny_conditioning("eps", 1)
    dev = torch.device("cpu")

    def make_latent(b):
        return T.random_latent("eps", batch=b, height=a.size, width=a.size, seed=0)

    cfgs = [float(v) for v in a.cfgs.split(",")]
    batches = [int(v) for v in a.batches.split(",")]
    if a.source_every_step:
        B.pack("inversion.attention").source_chunks = lambda sched, step, chunks, inline=False, batched=False: \
            tuple(chunks)
    print(
        f"tiny SD1.5-architecture UNet (ddiminv_dev/tiny_models.py 'eps'), {a.size}x{a.size} "
        f"(latent {a.size // 8}x{a.size // 8}), {a.steps} steps, median of {a.repeats}, "
        f"torch threads {torch.get_num_threads()}"
    )
    res = {"source_every_step": a.source_every_step}
    if not a.attention_only:
        res.update(compare(model, pos, neg, make_latent, a.steps, cfgs, a.repeats, batches, dev))
        cap = capture_overhead(model, pos, make_latent(1), a.steps, a.repeats, dev)
        print(
            f"capture overhead (cfg 1): core invert / bare loop {cap['core_over_bare']:.3f}, node / bare loop "
            f"{cap['node_over_bare']:.3f} (bare vs core max |diff| {cap['max_abs_diff_bare_vs_core']:.1e})"
        )
        res["capture"] = cap
    att = attention_cost(model, pos, neg, make_latent(1), a.steps, cfgs[-1], a.repeats, dev)
    ev = att["evaluations_per_step"]
    print(f"attention control (cfg {att['cfg']:g}): p2p edit / plain edit {att['p2p/plain']:.2f} "
          f"({ev['p2p']:.2f} evaluations per step), masactrl edit / plain edit {att['masactrl/plain']:.2f} "
          f"({ev['masactrl']:.2f}) (goal <= 2.1)")
    res["attention"] = att
    fx = flux_attention_cost(a.steps, a.repeats, dev)
    print(f"value injection (tiny Flux, latent {'x'.join(map(str, fx['latent'][-2:]))}, cfg 1): v_inject edit / "
          f"plain edit {fx['v_inject/plain']:.2f} ({fx['evaluations_per_step']:.2f} evaluations per step) "
          "(goal <= 2.1)")
    res["attention_flux"] = fx
    data = {
        "bench": "speed",
        "machine": B.machine(),
        "model": "tiny_models.tiny_model('eps')",
        "size": a.size,
        "seconds": time.perf_counter() - t0,
        "result": res,
    }
    p = B.write_json(("speed_quick" if a.quick else "speed") + ("_attention" if a.attention_only else "") + ".json",
                     data)
    if not a.attention_only:
        print("ratios:", {c: {k: round(v, 3) for k, v in e["ratios"].items()} for c, e in res["by_cfg"].items()})
    print(f"wrote {p} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
