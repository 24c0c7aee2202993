"""The learned model's low-rank layers (no ComfyUI): merging the factors gives the same layer, and the committed
weights fit the 8 MB budget."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ddiminv_dev.learned import lowrank
from ddiminv_dev.learned.build import weight_paths

BUDGET_BYTES = 8_000_000


def _randomise(m: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


@pytest.mark.parametrize("stride,padding,kernel", [(1, 1, 3), (2, 1, 3), (1, 0, 1)])
def test_conv_merge_equals_sequential(stride, padding, kernel):
    lr = _randomise(lowrank.LowRankConv2d(64, 96, kernel, stride=stride, padding=padding, rank=5), 0)
    full = nn.Conv2d(64, 96, kernel, stride=stride, padding=padding)
    sd = lowrank.merge_state_dict({f"c.{k}": v for k, v in lr.state_dict().items()})
    assert set(sd) == {"c.weight", "c.bias"}
    full.load_state_dict({k[2:]: v for k, v in sd.items()})
    x = torch.randn(2, 64, 9, 9)
    torch.testing.assert_close(full(x), lr(x), rtol=1e-4, atol=1e-4)


def test_linear_merge_equals_sequential():
    lr = _randomise(lowrank.LowRankLinear(768, 320, rank=7), 1)
    full = nn.Linear(768, 320)
    full.load_state_dict(lowrank.merge_state_dict(lr.state_dict()))
    x = torch.randn(3, 77, 768)
    torch.testing.assert_close(full(x), lr(x), rtol=1e-4, atol=1e-4)


def test_linear_without_bias_and_full_keys_pass_through():
    lr = _randomise(lowrank.LowRankLinear(64, 64, bias=False, rank=3), 2)
    sd = {"a." + k: v for k, v in lr.state_dict().items()} | {"norm.weight": torch.ones(4, dtype=torch.float16)}
    merged = lowrank.merge_state_dict(sd)
    assert set(merged) == {"a.weight", "norm.weight"} and merged["norm.weight"].dtype == torch.float32
    assert torch.linalg.matrix_rank(merged["a.weight"]) <= 3


def test_lowrank_numel():
    m = lowrank.LowRankConv2d(320, 640, 3, padding=1, rank=lowrank.RANK)
    assert sum(p.numel() for p in m.parameters()) == lowrank.lowrank_numel(320, 640, 3, lowrank.RANK)


def test_committed_weights_fit_budget():
    from safetensors import safe_open
    vae, unet = weight_paths()
    assert vae.exists() and unet.exists(), "the learned model's weights are missing (tools/train_learned.py)"
    assert vae.stat().st_size + unet.stat().st_size <= BUDGET_BYTES
    with safe_open(str(unet), framework="pt") as f:
        keys = list(f.keys())
        ranks = {f.get_slice(k).get_shape()[0] for k in keys if k.endswith(".A.weight")}
        assert ranks == {lowrank.RANK}
        assert all(f.get_slice(k).get_dtype() == "F16" for k in keys)
    assert any(k.endswith(".A.weight") for k in keys) and "out.2.weight" in keys
