"""Low-rank parameterisation of ComfyUI's SD1.x UNet, and merging it back into a plain ``UNetModel``.

Every ``Conv2d``/``Linear`` whose input and output widths are both >= ``MIN_DIM`` (64) is replaced by two
layers applied in sequence: ``A`` (a rank-``r`` Conv2d with the original kernel/stride/padding, or a Linear to
``r`` features, no bias) then ``B`` (a 1x1 Conv2d / Linear from ``r`` to the output width, with the original
bias). The product ``B @ A`` is the full weight; :func:`merge_state_dict` computes it, giving exactly the keys
of the plain ``UNetModel`` (``x.A.weight``, ``x.B.weight``, ``x.B.bias`` -> ``x.weight``, ``x.bias``).
Smaller layers (``conv_in`` 4->320, the output conv 320->4, norms) stay full.

The module classes and :func:`merge_state_dict` need only torch; :func:`build_lowrank_unet` needs ComfyUI.
"""
from __future__ import annotations

import math

import torch
from torch import nn

MIN_DIM = 64
RANK = 14


class LowRankConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, bias: bool = True,
                 rank: int = RANK):
        super().__init__()
        self.A = nn.Conv2d(in_channels, rank, kernel_size, stride=stride, padding=padding, bias=False)
        self.B = nn.Conv2d(rank, out_channels, 1, bias=bias)

    def forward(self, x):
        return self.B(self.A(x))


class LowRankLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, rank: int = RANK):
        super().__init__()
        self.A = nn.Linear(in_features, rank, bias=False)
        self.B = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x):
        return self.B(self.A(x))


def merge_weight(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The full weight ``B @ A`` (float32): Linear ``a`` [r, in], ``b`` [out, r]; Conv ``a`` [r, in, k, k],
    ``b`` [out, r, 1, 1]."""
    a, b = a.float(), b.float()
    if a.ndim == 2:
        return b @ a
    return torch.einsum("or,rikl->oikl", b.reshape(b.shape[0], b.shape[1]), a)


def merge_state_dict(sd: dict) -> dict:
    """Plain ``UNetModel`` state dict (float32) from a low-rank one (any float dtype)."""
    out = {}
    for k, v in sd.items():
        name = "." + k  # a layer at the root has keys "A.weight", ...
        if name.endswith(".A.weight"):
            p = k[: -len("A.weight")]  # "prefix." or ""
            out[p + "weight"] = merge_weight(v, sd[p + "B.weight"])
            if p + "B.bias" in sd:
                out[p + "bias"] = sd[p + "B.bias"].float()
        elif name.endswith(".B.weight") or name.endswith(".B.bias"):
            continue
        else:
            out[k] = v.float()
    return out


def lowrank_numel(in_dim: int, out_dim: int, kernel: int, rank: int, bias: bool = True) -> int:
    """Stored parameters of one low-rank layer."""
    return rank * in_dim * kernel * kernel + out_dim * rank + (out_dim if bias else 0)


def _zero_branches(unet) -> set:
    """Names of the layers SD zero-initialises (outputs of residual branches)."""
    names = set()
    for name, mod in unet.named_modules():
        cls = type(mod).__name__
        if cls == "ResBlock":
            names.add(f"{name}.out_layers.{len(mod.out_layers) - 1}")
        elif cls == "SpatialTransformer":
            names.add(f"{name}.proj_out.0" if isinstance(mod.proj_out, nn.ModuleList) else f"{name}.proj_out")
    return names


def build_lowrank_unet(config: dict, rank: int = RANK, seed: int = 0):
    """ComfyUI's ``UNetModel(**config)`` with its big layers low-rank, seeded init (float32, CPU).

    Init (:func:`make_lowrank_`): torch defaults for full layers; ``A`` ~ N(0, 1/fan_in), ``B`` ~ N(0, 1/(3r))
    (the product has the variance of torch's default init); residual-branch outputs (SD's ``zero_module``
    layers) start with ``B`` = 0."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    import comfy.ops
    unet = UNetModel(**config, dtype=torch.float32, device=torch.device("cpu"),
                     operations=comfy.ops.disable_weight_init)
    return make_lowrank_(unet, rank, seed, _zero_branches(unet))


def make_lowrank_(net, rank: int, seed: int, zero=frozenset()):
    """``net`` (any torch module, changed in place and returned) with every ``Conv2d``/``Linear`` whose widths
    are both >= ``MIN_DIM`` replaced by its low-rank pair, seeded init: torch defaults for the full layers, ``A``
    ~ N(0, 1/fan_in), ``B`` ~ N(0, 1/(3r)); the layers named in ``zero`` start as zero (``B`` = 0, or weight
    and bias 0 when they stay full). Shared by the UNet (:func:`build_lowrank_unet`) and the scenes DiT."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for name, mod in list(net.named_modules()):
            for base in (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.LayerNorm):
                if isinstance(mod, base) and hasattr(base, "reset_parameters"):
                    base.reset_parameters(mod)
                    break
            if not name:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = net.get_submodule(parent_name) if parent_name else net
            new = None
            if (isinstance(mod, nn.Conv2d) and min(mod.in_channels, mod.out_channels) >= MIN_DIM
                    and mod.groups == 1 and mod.dilation == (1, 1)):
                new = LowRankConv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                                    bias=mod.bias is not None, rank=rank)
                fan_in = mod.in_channels * math.prod(mod.kernel_size)
            elif isinstance(mod, nn.Linear) and min(mod.in_features, mod.out_features) >= MIN_DIM:
                new = LowRankLinear(mod.in_features, mod.out_features, bias=mod.bias is not None, rank=rank)
                fan_in = mod.in_features
            if new is None:
                if name in zero:
                    nn.init.zeros_(mod.weight)
                    if mod.bias is not None:
                        nn.init.zeros_(mod.bias)
                continue
            with torch.no_grad():
                nn.init.normal_(new.A.weight, std=1.0 / math.sqrt(fan_in))
                nn.init.normal_(new.B.weight, std=0.0 if name in zero else 1.0 / math.sqrt(3 * rank))
                if new.B.bias is not None:
                    new.B.bias.copy_(mod.bias if name not in zero else torch.zeros_like(mod.bias))
            setattr(parent, child, new)
    return net


def load_lowrank_unet(config: dict, sd: dict, rank: int | None = None):
    """A low-rank UNet (float32) with the factors ``sd`` (rank read from the weights unless given)."""
    if rank is None:
        rank = next(v.shape[0] for k, v in sd.items() if k.endswith(".A.weight"))
    unet = build_lowrank_unet(config, rank=rank, seed=0)
    unet.load_state_dict({k: v.float() for k, v in sd.items()})
    return unet.eval()
