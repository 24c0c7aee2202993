"""GPU speed bench: architecture-exact SD1.5 and SDXL UNets with seeded random weights (<= 5 min, H100/H200).

The models are built from ComfyUI's own classes -- ``comfy.supported_models.SD15`` / ``SDXL`` with the exact
UNet configs ``comfy.model_detection`` derives from real checkpoints, ``comfy.model_base.BaseModel`` /
``SDXL``, fp16, wrapped in a ``ModelPatcher`` on cuda -- and random weights (seeded, N(0, 1/fan_in)), so no
checkpoint is needed and the forward cost is the real one. Reported per model, as in bench/speed.py:
ours (DDIM Invert, ddim) / KSampler (ddim), ours / raw forwards, core FlipSigmas+SamplerCustom / raw,
images/s at batch 1 and 8, peak GPU memory of ours vs KSampler, and the cost of the exact and implicit
methods (seconds and evaluations per step; with random weights the implicit iteration count is not
meaningful for real images), and null-text inversion on SD1.5 (50 steps x 10 iterations, cfg 7.5, every
iteration run: seconds, backward passes, peak memory). With sd15, issue 27's attention-control rows: a P2P
(and MasaCtrl) edit / a plain edit on SD1.5 512x512, 50 steps, cfg 7.5; and a value-injection edit / a plain
edit on Flux dev's architecture (19 + 38 blocks, random bf16 weights, ~24 GB) at 1024x1024, 28 steps, cfg 1
(``--no-attention`` skips them; they add ~280 Flux forwards at 4,608 tokens, a few minutes on an H100 --
not yet run on one; the Flux path was checked on CPU with a shrunken config only).

    .venv/bin/python bench/gpu.py                 # SD1.5 512x512 (latent 64), SDXL 1024x1024 (latent 128),
                                                  # 50 steps, 2 repeats
    .venv/bin/python bench/gpu.py --cpu-smoke     # CPU: tiny configs, 64x64, 2 steps (the unit test runs this)

Writes bench/out/gpu.json.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import _common as B  # noqa: E402
from bench import speed as S  # noqa: E402

# The UNet configs comfy.model_detection.unet_config_from_diffusers_unet lists for real SD1.5 / SDXL
# checkpoints (ComfyUI 0.3.75); the dtype is set by set_inference_dtype below.
SD15_UNET = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
SDXL_UNET = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "in_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
# --cpu-smoke: the same classes and layouts, shrunk
SD15_TINY = dict(
    SD15_UNET,
    model_channels=32,
    num_res_blocks=[1, 1],
    channel_mult=[1, 2],
    transformer_depth=[1, 1],
    transformer_depth_output=[1, 1, 1, 1],
    context_dim=64,
    num_heads=2,
)
SDXL_TINY = dict(
    SDXL_UNET,
    model_channels=32,
    num_res_blocks=[1, 1],
    channel_mult=[1, 2],
    transformer_depth=[0, 1],
    transformer_depth_output=[0, 0, 1, 1],
    transformer_depth_middle=1,
    context_dim=64,
    num_head_channels=16,
)
POOLED = 1280  # SDXL clip_g pooled size; adm = 1280 + 6 * 256 = 2816
# Flux dev's config as comfy.model_detection reads it from the checkpoint (19 double, 38 single blocks, 12B)
FLUX_DEV = {
    "image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16, "patch_size": 2,
    "vec_in_dim": 768, "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24,
    "depth": 19, "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
}
FLUX_SIZE, FLUX_STEPS = 1024, 28   # issue 27's value-injection row: 1024x1024 (latent 128), 28 steps


def _random_init_(net, device, seed: int) -> None:
    """Seeded N(0, 1/fan_in) weights, norms ~1, biases ~0 (in place, on ``device``)."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim >= 2:
                std = 1.0 / math.sqrt(max(math.prod(p.shape[1:]), 1))
                p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32).mul_(std).to(p.dtype))
            elif name.endswith("weight") or name.endswith("scale"):
                p.copy_((1.0 + 0.02 * torch.randn(p.shape, generator=g, device=device)).to(p.dtype))
            else:
                p.copy_((0.02 * torch.randn(p.shape, generator=g, device=device)).to(p.dtype))
    net.eval()


def build_flux(device, dtype, seed: int = 0):
    """Flux dev's architecture (``comfy.supported_models.Flux`` with :data:`FLUX_DEV`, ``model_base.Flux``) with
    seeded random weights on ``device``, in a ModelPatcher."""
    import torch
    import comfy.model_patcher
    import comfy.supported_models as sm

    cfg = sm.Flux(dict(FLUX_DEV))
    cfg.set_inference_dtype(dtype, None)
    model = cfg.get_model({}, device=device)
    _random_init_(model.diffusion_model, device, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def flux_conditioning(seed: int) -> list:
    """Flux dev's conditioning: T5-XXL states (1, 512, 4096), CLIP-L pooled (1, 768), guidance 3.5 (random)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [[torch.randn((1, 512, 4096), generator=g), {"pooled_output": torch.randn((1, 768), generator=g),
                                                         "guidance": 3.5}]]


def attention_rows(sd15, pos, neg, latent, steps, repeats, device, cpu_smoke: bool) -> dict:
    """Issue 27's rows: a P2P (and MasaCtrl) edit against a plain edit on SD1.5 (cfg 7.5, bench/speed.py's
    attention_cost); a value-injection edit against a plain edit on Flux dev's architecture at 1024x1024
    (latent 128, 28 steps, cfg 1, RF-Edit's default window: the first 10% of the steps) -- on CPU smoke the tiny
    Flux at 2 steps, window 0..0.5."""
    import torch

    out = {"p2p_sd15": S.attention_cost(sd15, pos, neg, latent, steps, 7.5, repeats, device)}
    a = out["p2p_sd15"]
    print(f"sd15 attention control ({steps} steps, cfg 7.5): p2p edit / plain edit {a['p2p/plain']:.2f}, "
          f"masactrl / plain {a['masactrl/plain']:.2f} (plain {a['times']['plain']['median_s']:.2f} s)")
    if cpu_smoke:
        out["v_inject_flux"] = v = S.flux_attention_cost(2, repeats, device)
    else:
        import comfy.model_management as mm
        import comfy.supported_models as sm

        flux = build_flux(device, torch.bfloat16)
        g = torch.Generator().manual_seed(0)
        side = FLUX_SIZE // 8
        lat = {"samples": sm.Flux.latent_format().process_out(torch.randn((1, 16, side, side), generator=g))}
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        v = S.vinject_cost(flux, flux_conditioning(0), flux_conditioning(1), flux_conditioning(2), lat, FLUX_STEPS,
                           repeats, device, window=(0.0, 0.1))
        if torch.cuda.is_available():
            v["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        out["v_inject_flux"] = v
        del flux
        mm.unload_all_models()
        mm.soft_empty_cache()
    print(f"flux v_inject (latent {'x'.join(map(str, v['latent'][-2:]))}, cfg 1, window {v['window']}): v_inject "
          f"edit / plain edit {v['v_inject/plain']:.2f} (plain {v['times']['plain']['median_s']:.2f} s)")
    return out


def build(kind: str, tiny: bool, device, dtype, seed: int = 0):
    import torch
    import comfy.model_base as mb
    import comfy.model_patcher
    import comfy.supported_models as sm

    if kind == "sd15":
        cfg = sm.SD15(dict(SD15_TINY if tiny else SD15_UNET))
    else:
        cfg = sm.SDXL(dict(SDXL_TINY if tiny else SDXL_UNET))
    cfg.set_inference_dtype(dtype, None)
    model = (
        mb.BaseModel(cfg, model_type=mb.ModelType.EPS, device=device)
        if kind == "sd15"
        else mb.SDXL(cfg, model_type=mb.ModelType.EPS, device=device)
    )
    _random_init_(model.diffusion_model, device, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def conditioning(kind: str, tiny: bool, seed: int, size: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    ctx = (
        (SD15_TINY if tiny else SD15_UNET)["context_dim"]
        if kind == "sd15"
        else (SDXL_TINY if tiny else SDXL_UNET)["context_dim"]
    )
    c = torch.randn((1, 77, ctx), generator=g)
    extra = {}
    if kind == "sdxl":
        extra = {
            "pooled_output": torch.randn((1, POOLED), generator=g),
            "width": size,
            "height": size,
            "target_width": size,
            "target_height": size,
        }
    return [[c, extra]]


def method_cost(model, pos, neg, latent, steps, cfg, device) -> dict:
    """Seconds and evaluations/step of ddim, exact and implicit (tol 1e-4, max 10 iterations) inversions."""
    import torch

    inv = B.pack("nodes.invert").DDIMInvert
    out = {}
    for label, kw in (
        ("ddim", dict(method="ddim")),
        ("exact", dict(method="exact")),
        ("implicit", dict(method="implicit", tolerance=1e-4, max_iters=10)),
    ):
        with torch.no_grad():
            t = B.timed(
                lambda kw=kw: out.__setitem__(
                    "_o", inv.execute(model, pos, neg, latent, steps, cfg, "ddim_uniform", **kw)
                ),
                device,
            )
        traj = B.first(out.pop("_o"), 2)
        out[label] = {
            "seconds": t,
            "evals_per_step": traj.nfe / steps,
            "finite": bool(torch.isfinite(traj.noise).all()),
        }
    return out


def nulltext_cost(model, pos, neg, latent, steps, iterations, device) -> dict:
    """Null-Text Inversion at cfg 7.5 on a cfg-1 ddim pivot: seconds, evaluations, backward passes, peak memory.
    ``early_stop`` 0 so every step runs all its iterations (the paper's worst case: steps x iterations)."""
    import torch

    inv = B.pack("nodes.invert").DDIMInvert
    nt = B.pack("nodes.nulltext").DDIMInvNullText
    with torch.no_grad():
        traj = B.first(inv.execute(model, pos, neg, latent, steps, 1.0, "ddim_uniform", method="ddim"), 2)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    out = {}
    t = B.timed(
        lambda: out.__setitem__("o", nt.execute(model, pos, neg, traj, 7.5, iterations=iterations, early_stop=0.0)),
        device,
    )
    info = B.first(out["o"], 1).optimized_negative
    res = {
        "seconds": t,
        "steps": steps,
        "iterations": iterations,
        "backward": info["backward"],
        "evaluations": info["nfe"],
        "seconds_per_backward": t / max(info["backward"], 1),
    }
    if torch.cuda.is_available():
        res["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="CPU, tiny configs, 64x64, 2 steps, 1 repeat")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="timed rounds after one warm-up round (2 keeps the whole run under ~5 min)",
    )
    ap.add_argument("--models", default="sd15,sdxl")
    ap.add_argument("--cfgs", default="1,7.5")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for --cpu-smoke")
    ap.add_argument("--no-attention", dest="attention", action="store_false",
                    help="skip issue 27's rows (SD1.5 P2P edit, Flux-architecture 1024x1024 v_inject edit)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    if a.cpu_smoke:
        import torch

        torch.set_num_threads(max(1, a.threads))
    B.boot(cpu=a.cpu_smoke)
    import torch
    import comfy.model_management as mm
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    if not a.cpu_smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --cpu-smoke on CPU")
    device = mm.get_torch_device()
    dtype = torch.float32 if a.cpu_smoke else torch.float16
    steps, repeats = (2, 1) if a.cpu_smoke else (a.steps, a.repeats)
    cfgs = [float(v) for v in a.cfgs.split(",")]
    sizes = {"sd15": 64 if a.cpu_smoke else 512, "sdxl": 64 if a.cpu_smoke else 1024}
    results = {}
    for kind in [k for k in a.models.split(",") if k]:
        size = sizes[kind]
        model = build(kind, a.cpu_smoke, device, dtype)
        pos, neg = conditioning(kind, a.cpu_smoke, 0, size), conditioning(kind, a.cpu_smoke, 1, size)

        def make_latent(b, size=size):
            g = torch.Generator().manual_seed(0)
            return {"samples": torch.randn((b, 4, size // 8, size // 8), generator=g) / 0.18215}

        print(f"{kind}: {size}x{size} (latent {size // 8}), {steps} steps, {dtype}, {device}, median of {repeats}")
        res = S.compare(model, pos, neg, make_latent, steps, cfgs, repeats, [1, 8], device, peak_memory=not a.cpu_smoke)
        res["method_cost"] = method_cost(model, pos, neg, make_latent(1), steps, cfgs[0], device)
        if kind == "sd15":
            res["nulltext"] = nt = nulltext_cost(
                model, pos, neg, make_latent(1), steps, 2 if a.cpu_smoke else 10, device
            )
            print(
                f"sd15 null-text ({steps} steps x {nt['iterations']} iterations, cfg 7.5): {nt['seconds']:.2f} s, "
                f"{nt['backward']} backward passes, {nt['evaluations']} evaluations"
            )
        mc = res["method_cost"]
        print(
            f"{kind} method cost (cfg {cfgs[0]:g}): "
            + "  ".join(f"{k} {v['seconds']:.2f} s ({v['evals_per_step']:.1f}/step)" for k, v in mc.items())
        )
        print(
            f"{kind} ratios: "
            + str({c: {k: round(v, 3) for k, v in e["ratios"].items()} for c, e in res["by_cfg"].items()})
        )
        if kind == "sd15" and a.attention:
            res["attention"] = attention_rows(model, pos, neg, make_latent(1), steps, repeats, device, a.cpu_smoke)
        results[kind] = res
        del model
        mm.unload_all_models()
        mm.soft_empty_cache()
    data = {
        "bench": "gpu",
        "cpu_smoke": a.cpu_smoke,
        "machine": B.machine(),
        "steps": steps,
        "seconds": time.perf_counter() - t0,
        "results": results,
    }
    p = B.write_json("gpu_cpu_smoke.json" if a.cpu_smoke else "gpu.json", data)
    print(f"wrote {p} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
