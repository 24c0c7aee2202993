"""The two-expert schedule (inversion/experts.py) as matrices: switch step <-> boundary, the order of the experts
in inversion and sampling, and the sigma dispatch, against Wan 2.2's own numbers."""
import pytest
import torch

from inversion import experts as X
from inversion.errors import InversionInputError


def flow_sigmas(n: int, shift: float = 8.0) -> list:
    """ComfyUI's 'simple' flow schedule with a shift (ModelSamplingSD3-style): sigma(t) = s t / (1 + (s-1) t)."""
    ts = [1.0 - j / n for j in range(n + 1)]
    return [shift * t / (1 + (shift - 1) * t) for t in ts]


@pytest.mark.parametrize("n,shift,boundary,expected", [
    (20, 8.0, 0.875, 11),   # by hand: sigma_10 = 4/4.5 = 0.8889 >= 0.875 > sigma_11 = 3.6/4.15 = 0.8675
    (20, 1.0, 0.875, 3),    # no shift: sigma_j = 1 - j/20; 1, 0.95, 0.9 >= 0.875 > 0.85
    (20, 1.0, 0.900, 3),    # the boundary on a level counts as high noise (Wan: t >= boundary)
    (4, 1.0, 2.0, 0),       # above every level: the low-noise expert only
    (4, 1.0, 1e-6, 4),      # below every starting level: the high-noise expert only
])
def test_switch_step_matches_the_boundary(n, shift, boundary, expected):
    assert X.switch_step(flow_sigmas(n, shift), boundary) == expected


@pytest.mark.parametrize("n", [1, 2, 7, 20])
def test_boundary_for_step_inverts_switch_step_at_every_step(n):
    s = flow_sigmas(n, 5.0)
    for k in range(n + 1):
        b = X.boundary_for_step(s, k)
        assert X.switch_step(s, b) == k, (n, k, b)
        # the same switch when the levels are stored in another precision (float32 states, float64 eval sigmas)
        assert X.switch_step([float(torch.tensor(v, dtype=torch.float32)) for v in s], b) == k


def test_inversion_uses_the_expert_of_the_sampling_step_it_reverses():
    assert X.sampling_experts(5, 2) == ["high", "high", "low", "low", "low"]
    assert X.inversion_experts(5, 2) == ["low", "low", "low", "high", "high"]
    for n in range(1, 6):
        for k in range(n + 1):
            samp, inv = X.sampling_experts(n, k), X.inversion_experts(n, k)
            assert all(inv[i] == samp[n - 1 - i] for i in range(n))


def test_by_sigma_dispatches_on_the_evaluated_level():
    calls = []

    def level(s):
        return float(s.flatten()[0]) if isinstance(s, torch.Tensor) else float(s)
    low = lambda x, s: calls.append(("low", level(s))) or x          # noqa: E731
    high = lambda x, s: calls.append(("high", level(s))) or -x       # noqa: E731
    fn = X.by_sigma(low, high, 0.875)
    x = torch.ones(2)
    assert torch.equal(fn(x, torch.tensor([0.9, 0.9], dtype=torch.float64)), -x)
    assert torch.equal(fn(x, torch.tensor(0.875)), -x)              # on the boundary: high noise
    assert torch.equal(fn(x, 0.5), x)
    assert calls == [("high", 0.9), ("high", 0.875), ("low", 0.5)]


@pytest.mark.parametrize("sigmas,arg,fn", [
    ([1.0], 0.5, "switch_step"), ([1.0, 1.0, 0.0], 0.5, "switch_step"), ([1.0, 0.5, 0.0], float("nan"), "switch_step"),
    ([1.0, 0.5, 0.0], 3, "boundary_for_step"), ([1.0, 0.5, 0.0], -1, "boundary_for_step"),
    ([1.0, 0.5, 0.0], True, "boundary_for_step"),
])
def test_bad_schedules_and_switches_are_refused(sigmas, arg, fn):
    with pytest.raises(InversionInputError):
        getattr(X, fn)(sigmas, arg)


def test_wan22_defaults():
    assert X.WAN22_BOUNDARY == {"t2v": 0.875, "i2v": 0.900} and X.DEFAULT_BOUNDARY == 0.875
