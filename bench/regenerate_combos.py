"""Reconstruction error of the Inverted-Latent Sampler's combinations with the source prompt (issue 19).

Every case inverts at cfg 1 (the pivot), optionally runs Null-Text Inversion (null_text / negative_prompt mode)
at cfg 7.5, and regenerates with the *source* prompt at cfg 7.5, with and without ``correction=source_drift``
and ``start_step``. The number is the relative latent error ||x_rec - x_src|| / ||x_src||; with source_drift
every row must be <= 1e-4 (the source "stays pinned").

* ``oracle``: the analytic embedding oracle (``ddiminv_dev.gmm.EmbeddingOracle``, EPS, 20 steps) in the math
  core: null-text optimised by ``inversion.nulltext.optimize``, the plan of ``inversion.regenerate`` run with
  a model function that selects each step's negative by its sigma (what ComfyUI's percent ranges do).
  ``--old-pairing`` computes the drift with the plain negative, as the sampler did before issue 19.
* ``sd15`` / ``sd3``: the tiny SD1.5 / SD3 architectures through the real executor (the pack's nodes).
* ``gmm``: the Gaussian-mixture oracle MODEL through the executor (negative_prompt mode only: its prompt flags are
  not differentiable, so null_text mode cannot optimise there).

    .venv/bin/python bench/regenerate_combos.py [--cases oracle,sd15,sd3,gmm] [--steps 10]

Measured (2 CPU cores, torch 2.14.1; "before" = the sampler before issue 19, which paired the drift with the plain
negative; executor rows with --steps 10, start_step k = 2; oracle start_step k = 5):

    case        trajectory negative   source_drift k=0 / k        before k=0 / k    no correction k=0
    oracle EPS  null_text             0 / 0                       0.754 / 0.738     0.0174
    oracle EPS  negative_prompt       1.2e-10 / 1.2e-10           0.781 / 0.766     0.0385
    oracle EPS  none                  1.1e-8 / 1.1e-8             (unchanged)       0.755
    tiny SD1.5  null_text             6.4e-7 / 2.7e-7             0.230 / 0.074     4.8e-3
    tiny SD1.5  negative_prompt       0 / 0                       0.218 / 0.049     0.0175
    tiny SD3    null_text             1.7e-8 / 1.7e-8             0.392 / 0.370     0.0527
    tiny SD3    negative_prompt       1.7e-8 / 1.7e-8             0.379 / 0.343     0.0334
    gmm MODEL   negative_prompt       6.1e-10 / 5.8e-10           2.2e-3 / 5.8e-10  0.0776
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

CFG = 7.5


def oracle_rows(steps: int = 20, old_pairing: bool = False) -> list:
    from ddiminv_dev.gmm import GMM, EmbeddingOracle, rel_error
    from ddiminv_dev.gmm import inversion_schedule as sched
    from inversion import methods as M
    from inversion import nulltext as NT
    from inversion import regenerate as R

    g = GMM.make(seed=4)
    o = EmbeddingOracle.make(g, flow=False)
    pos = o.encode([0, 1, 2], style=o.style(0.05))
    null0 = o.empty()
    x0 = g.sample_x0([0], seed=1)
    pivot = M.invert(x0, sched(False, steps), lambda x, s: o.denoise(x, s, pos), M.Options("ddim"), family="vp")
    res = NT.optimize(pivot, lambda x, s: o.denoise(x, s, pos), o.denoise, null0, NT.NullTextOptions(cfg=CFG))
    per_step = [[e, {"sigma": float(s)}] for e, s in zip(res.embeddings, res.sigmas[:-1], strict=True)]
    P, N0 = [[pos, {}]], [[null0, {}]]
    rows = []
    for mode in ("null_text", "negative_prompt", None):
        if mode is None:
            traj = pivot
        else:
            conds = per_step if mode == "null_text" else P
            traj = pivot.with_(optimized_negative={"mode": mode, "cfg": CFG if mode == "null_text" else None,
                                                   "conditioning": conds})

        def guided(positive, negative, loop, steps_, label):
            def emb_at(cond, sigma):
                if len(cond) == 1:
                    return cond[0][0]
                return min(cond, key=lambda c: abs(c[1]["sigma"] - sigma))[0]

            def fn(x, sigma):
                Dc = o.denoise(x, sigma, emb_at(positive, sigma))
                Du = o.denoise(x, sigma, emb_at(negative, sigma))
                return Du + CFG * (Dc - Du)
            return loop(fn, x0.device, None)

        for correction in ("none", "source_drift"):
            for k in (0, 5):
                plan = R.plan(traj, R.Choices(cfg=CFG, start_step=k, correction=correction),
                              R.Prompts(positive=P, negative=N0))
                if old_pairing and plan.drift is not None and mode is not None:
                    plan = plan.with_drift_negative(N0)   # the pre-issue-19 pairing: drift with the plain negative
                out = R.run(plan, traj, guided)
                rows.append(("oracle EPS", steps, mode or "none", correction, k, rel_error(out, x0)))
    return rows


def tiny_prompt(fam: str, steps: int, mode, correction: str, start_step: int) -> dict:
    sched = "simple" if fam == "flow" else "ddim_uniform"
    p = {
        "m": {"class_type": "TestTinyModel", "inputs": {"family": fam, "seed": 0}},
        "c": {"class_type": "TestTinyConditioning", "inputs": {"family": fam, "seed": 0}},
        "n": {"class_type": "TestTinyConditioning", "inputs": {"family": fam, "seed": 1, "near_seed": 0,
                                                               "distance": 0.3}},
        "e": {"class_type": "TestRandomLatent", "inputs": {"family": fam, "batch": 1, "height": 32, "width": 32,
                                                           "seed": 0}},
        "src": {"class_type": "KSampler", "inputs": {
            "model": ["m", 0], "seed": 5, "steps": 30, "cfg": 1.0, "sampler_name": "euler", "scheduler": sched,
            "positive": ["c", 0], "negative": ["n", 0], "latent_image": ["e", 0], "denoise": 1.0}},
        "inv": {"class_type": "DDIMInvert", "inputs": {
            "model": ["m", 0], "positive": ["c", 0], "negative": ["n", 0], "latent": ["src", 0], "steps": steps,
            "cfg": 1.0, "scheduler": sched, "method": "ddim"}},
    }
    traj = ["inv", 2]
    if mode is not None:
        p["nt"] = {"class_type": "DDIMInvNullText", "inputs": {
            "model": ["m", 0], "positive": ["c", 0], "negative": ["n", 0], "trajectory": ["inv", 2], "cfg": CFG,
            "mode": mode, "iterations": 5, "learning_rate": 0.1, "early_stop": 1e-5}}
        traj = ["nt", 1]
    p["rec"] = {"class_type": "DDIMInvSampler", "inputs": {
        "model": ["m", 0], "positive": ["c", 0], "negative": ["n", 0], "trajectory": traj, "cfg": CFG,
        "correction": correction, "start_step": start_step}}
    p["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["rec", 0]}}
    return p


def gmm_prompt(steps: int, mode, correction: str, start_step: int) -> dict:
    from ddiminv_dev.prompts import gmm_invert_sample
    p = gmm_invert_sample("eps", "ddim", steps, 1.0)
    traj = ["inv", 2]
    if mode is not None:
        p["nt"] = {"class_type": "DDIMInvNullText", "inputs": {
            "model": ["m", 0], "positive": ["pos", 0], "negative": ["neg", 0], "trajectory": ["inv", 2], "cfg": CFG,
            "mode": mode}}
        traj = ["nt", 1]
    p["rec"]["inputs"].update(trajectory=traj, cfg=CFG, correction=correction, start_step=start_step)
    return p


def executor_rows(cases, steps: int) -> list:
    from ddiminv_dev import host
    host.boot()
    rows = []
    for case in cases:
        modes = ("negative_prompt", None) if case == "gmm" else ("null_text", "negative_prompt", None)
        for mode in modes:
            for correction in ("none", "source_drift"):
                for k in (0, steps // 4):
                    if case == "gmm":
                        p, src = gmm_prompt(steps, mode, correction, k), "lat"
                    else:
                        p, src = tiny_prompt("eps" if case == "sd15" else "flow", steps, mode, correction, k), "src"
                    r = host.run(p, expect_success=False)
                    if not r.success:
                        rows.append((case, steps, mode or "none", correction, k, "error: " + r.error_text()[:80]))
                        continue
                    a, b = r.outputs("rec")[0]["samples"], r.outputs(src)[0]["samples"]
                    rows.append((case, steps, mode or "none", correction, k, float((a - b).norm() / b.norm())))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="oracle,sd15,sd3,gmm")
    ap.add_argument("--steps", type=int, default=10, help="steps of the executor cases (the oracle uses 20)")
    ap.add_argument("--old-pairing", action="store_true", help="oracle: the drift with the plain negative (the bug)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    cases = a.cases.split(",")
    rows = oracle_rows(old_pairing=a.old_pairing) if "oracle" in cases else []
    rows += executor_rows([c for c in cases if c != "oracle"], a.steps)
    print("| case | steps | trajectory negative | correction | start_step | rel. error |")
    print("|---|---|---|---|---|---|")
    for case, steps, mode, corr, k, err in rows:
        e = f"{err:.2e}" if isinstance(err, float) else err
        print(f"| {case} | {steps} | {mode} | {corr} | {k} | {e} |")


if __name__ == "__main__":
    main()
