"""The validation layer (inversion/checks.py, inversion/schedule.py) and the one error model, without ComfyUI."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from inversion import checks, errors, schedule
from inversion.trajectory import Trajectory
from ddiminv_dev.gmm import ddim_uniform, sd15_sigmas_table

E = errors.InversionInputError


def traj(**kw):
    sig = torch.linspace(0, 14.6, 5)
    st_ = torch.randn(5, 1, 4, 8, 8)
    base = dict(sigmas=sig, states=st_, denoised=st_[1:].clone(), eval_sigmas=sig[1:].double(), method="ddim",
                cfg=1.0, nfe=4, nfe_per_step=(1,) * 4, family="vp")
    base.update(kw)
    return Trajectory(**base)


def test_node_boundary_prefixes_the_node_and_keeps_one_class():
    with pytest.raises(E) as e:
        with errors.node_boundary("DDIM Invert"):
            raise schedule.ScheduleError("sigmas is ascending; do not flip them")
    assert type(e.value) is E and str(e.value) == "DDIM Invert: sigmas is ascending; do not flip them"
    with pytest.raises(E) as e:
        with errors.node_boundary("DDIM Invert"):
            raise E("DDIM Invert: already named; fine")
    assert str(e.value) == "DDIM Invert: already named; fine"
    with pytest.raises(KeyError):              # anything else is not the pack's input error: left alone
        with errors.node_boundary("DDIM Invert"):
            raise KeyError("x")


# ---------------------------------------------------------------------------------------------- schedules
def test_schedule_messages_name_the_fix():
    with pytest.raises(E, match="ascending.*FlipSigmas"):
        schedule.check_sampling_sigmas(torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(E, match="strictly decreasing.*remove duplicated"):
        schedule.check_sampling_sigmas(torch.tensor([2.0, 1.0, 1.0, 0.0]))
    with pytest.raises(E, match="NaN or Inf.*scheduler node"):
        schedule.check_sampling_sigmas(torch.tensor([2.0, float("nan"), 0.0]))
    with pytest.raises(E, match="at least 2.*steps >= 1"):
        schedule.check_sampling_sigmas(torch.tensor([2.0]))
    src = "the kl_optimal scheduler at 1 step"
    with pytest.raises(E, match="^the kl_optimal scheduler at 1 step contains NaN or Inf.*another scheduler or more "
                                "steps"):
        schedule.check_sampling_sigmas(torch.tensor([float("nan"), 0.0]), source=src)
    with pytest.raises(E, match="flow model.*ends at 1"):
        schedule.check_sampling_sigmas(torch.tensor([3.0, 1.0, 0.0]), family="flow")
    assert schedule.check_sampling_sigmas(torch.tensor([1.0, 0.5, 0.0]), family="flow").tolist() == [1.0, 0.5, 0.0]
    assert schedule.check_sampling_sigmas(torch.tensor([14.6, 1.0, 0.0])).tolist()[0] == pytest.approx(14.6)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(values=st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                                 st.sampled_from([0.0, 1.0, 1e-4, 14.6])), min_size=0, max_size=8),
       flow=st.booleans())
def test_any_schedule_is_refused_or_invertible(values, flow):
    t = torch.tensor(values, dtype=torch.float32)
    try:
        s = schedule.check_sampling_sigmas(t, family="flow" if flow else None)
    except E as e:
        assert "; " in str(e) or ": " in str(e)
        return
    assert s.numel() >= 2 and torch.isfinite(s).all() and (s >= 0).all() and (s[:-1] > s[1:]).all()
    assert not flow or float(s.max()) <= 1 + 1e-5


def _discrete_percent_to_sigma(p: float) -> float:
    """ComfyUI's ModelSamplingDiscrete.percent_to_sigma on the SD1.x table (interpolated in log sigma)."""
    if p <= 0.0:
        return 999999999.9
    if p >= 1.0:
        return 0.0
    table = sd15_sigmas_table().double().log()
    t = (1.0 - p) * 999
    lo = int(math.floor(t))
    hi = min(lo + 1, 999)
    w = t - lo
    return float(((1 - w) * table[lo] + w * table[hi]).exp())


@pytest.mark.parametrize("name,p2s,sig", [
    ("discrete", _discrete_percent_to_sigma, ddim_uniform(sd15_sigmas_table(), 10)),
    ("flow", lambda p: 1.0 - min(max(p, 0.0), 1.0), torch.linspace(1.0, 0.0, 9)),
])
def test_step_ranges_tile_the_percent_scale_one_step_each(name, p2s, sig):
    ranges = schedule.step_ranges(p2s, sig)
    assert len(ranges) == sig.numel() - 1 and ranges[0][0] == 0.0 and ranges[-1][1] == 1.0
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(ranges, ranges[1:], strict=False))
    for k, s in enumerate(sig[:-1].tolist()):      # ComfyUI's test: timestep_end <= sigma <= timestep_start
        hits = [j for j, (p0, p1) in enumerate(ranges) if p2s(p1) <= s <= p2s(p0)]
        assert hits == [k], (name, k, s, hits)


def test_a_schedule_the_percent_scale_cannot_separate_is_the_packs_error():
    """Two sigmas above the model's sigma_max (a zero-terminal-SNR model's karras schedule, given to the plain
    model): step 1 gets no range of its own."""
    with pytest.raises(schedule.ScheduleError) as e:
        schedule.step_ranges(_discrete_percent_to_sigma, torch.tensor([4518.8, 485.59, 18.03, 0.029, 0.0]))
    assert isinstance(e.value, E)
    msg = str(e.value)
    assert msg.startswith("the schedule's step 1 (sigma 485.59) cannot be bound to its own conditioning range")
    assert "end near sigma 14.6" in msg and "; use the model that made the trajectory" in msg


# ---------------------------------------------------------------------------------------------- latents, masks
def test_latent_checks():
    ok = {"samples": torch.zeros(1, 4, 8, 8)}
    assert checks.check_latent(ok, channels=4) is ok["samples"]
    with pytest.raises(E, match="not a LATENT"):
        checks.check_latent(torch.zeros(1, 4, 8, 8))
    with pytest.raises(E, match=r"image model \(SD15\) takes \[B,C,H,W\]"):
        checks.check_latent({"samples": torch.zeros(1, 4, 2, 8, 8)}, channels=4, format_name="SD15")
    with pytest.raises(E, match=r"\[B,C,H,W\]"):
        checks.check_latent({"samples": torch.zeros(1, 4, 8)}, channels=4)
    assert checks.check_latent({"samples": torch.zeros(1, 16, 2, 8, 8)}, channels=16, spatial_dims=3).ndim == 5
    with pytest.raises(E, match="16 channels but this model's latent format \\(SD15\\) uses 4"):
        checks.check_latent({"samples": torch.zeros(1, 16, 8, 8)}, channels=4, format_name="SD15")
    with pytest.raises(E, match="dtype torch.int64"):
        checks.check_latent({"samples": torch.zeros(1, 4, 8, 8, dtype=torch.long)})
    with pytest.raises(E, match="empty"):
        checks.check_latent({"samples": torch.zeros(0, 4, 8, 8)})
    bad = torch.zeros(1, 4, 8, 8)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(E, match="NaN or Inf values \\(1 of 256\\)"):
        checks.check_latent({"samples": bad})


def test_masks_are_clamped_with_a_note_or_refused():
    shape = (1, 4, 8, 8)
    m, note = checks.check_mask(torch.rand(8, 8), shape)
    assert note is None and m.dtype == torch.float32
    src = torch.full((1, 8, 8), 2.0)
    m, note = checks.check_mask(src, shape)
    assert torch.equal(m, torch.ones(1, 8, 8)) and "clamped to [0, 1]" in note and "[2, 2]" in note
    assert torch.equal(src, torch.full((1, 8, 8), 2.0))            # the input is not touched
    m, note = checks.check_mask(torch.full((8, 8), -1.5), shape)
    assert torch.equal(m, torch.zeros(8, 8)) and "-1.5" in note
    assert checks.check_mask(None, shape) == (None, None)
    with pytest.raises(E, match="NaN or Inf"):
        checks.check_mask(torch.tensor([[float("nan")]]), shape)
    with pytest.raises(E, match=r"\[H,W\]"):
        checks.check_mask(torch.zeros(8), shape)
    with pytest.raises(E, match="MASK tensor"):
        checks.check_mask([[1.0]], shape)


# ---------------------------------------------------------------------------------------------- conditioning, cfg
def test_conditioning_checks_reach_the_extras():
    c = [[torch.zeros(1, 2, 4), {"pooled_output": torch.zeros(1, 8), "guidance": 3.5}]]
    checks.check_conditioning(c, 3, "positive")
    nan = [[torch.zeros(1, 2, 4), {"pooled_output": torch.full((1, 8), float("nan"))}]]
    with pytest.raises(E, match="positive.pooled_output contains NaN"):
        checks.check_conditioning(nan, 1, "positive")
    nested = [[torch.zeros(1, 2, 4), {"extra": {"deep": [torch.tensor([float("inf")])]}}]]
    with pytest.raises(E, match=r"positive.extra.deep\[0\] contains NaN"):
        checks.check_conditioning(nested, 1, "positive")
    with pytest.raises(E, match="pooled_output has batch 2 but the latent has batch 3"):
        checks.check_conditioning([[torch.zeros(1, 2, 4), {"pooled_output": torch.zeros(2, 8)}]], 3, "positive")
    with pytest.raises(E, match="positive has batch 2 but the latent has batch 3"):
        checks.check_conditioning([[torch.zeros(2, 2, 4), {}]], 3, "positive")
    with pytest.raises(E, match="empty"):
        checks.check_conditioning([], 1, "negative")
    with pytest.raises(E, match=r"negative\[0\] is not a ComfyUI conditioning entry"):
        checks.check_conditioning([torch.zeros(1)], 1, "negative")
    obj = object()                      # a ControlNet or hook: ComfyUI's business, not a value to check
    checks.check_conditioning([[torch.zeros(1, 2, 4), {"control": obj}]], 1, "positive")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "x", None])
def test_cfg_must_be_finite(bad):
    with pytest.raises(E, match="cfg must be a"):
        checks.check_cfg(bad)
    assert checks.check_cfg("7.5") == 7.5


# ---------------------------------------------------------------------------------------------- trajectories
def test_a_good_trajectory_passes():
    checks.check_trajectory(traj())
    checks.check_trajectory(traj(method="exact", options={"gamma": 1.0}, replay={"pair": torch.zeros(2, 1, 4, 8, 8)}))


@pytest.mark.parametrize("change,words", [
    (dict(method="edict"), "method 'edict' is unknown"),
    (dict(sigmas=torch.linspace(14.6, 0, 5)), "strictly increasing"),
    (dict(sigmas=torch.tensor([0.0, 0.5, float("nan"), 2.0, 3.0])), "finite"),
    (dict(states=torch.full((5, 1, 4, 8, 8), float("nan"))), "states contain NaN"),
    (dict(denoised=torch.zeros(3, 1, 4, 8, 8)), "malformed"),
    (dict(family="flow"), "reaches sigma 14.6 > 1"),
    (dict(family="martian"), "family 'martian'"),
    (dict(family="other"), "family 'other'"),  # the pack inverts vp and flow only: nothing makes "other"
    (dict(extra=[1, 2]), "extra must be a dict"),
    (dict(extra={"guidance_fingerprint": 7}), "guidance_fingerprint"),
    (dict(method="exact", options={"gamma": 0.0}), "gamma"),
    (dict(method="exact", replay={"pair": torch.zeros(2, 1, 4, 4, 4)}), "replay pair"),
    (dict(batch_index=["a"]), "batch_index"),
    (dict(eval_sigmas=torch.zeros(2)), "eval_sigmas"),
])
def test_a_broken_trajectory_is_refused(change, words):
    with pytest.raises(E) as e:
        checks.check_trajectory(traj(**change))
    assert words in str(e.value) and "DDIM Invert" in str(e.value)


def test_not_a_trajectory():
    with pytest.raises(E, match="not a DDIM_TRAJECTORY"):
        checks.check_trajectory({"states": 1})


def test_results_must_be_finite():
    checks.check_finite_result(torch.zeros(3), "x", "fix")
    with pytest.raises(E, match=r"^the inversion \(m\) contains NaN or Inf \(1 of 3 values\); use gamma 1.0$"):
        checks.check_finite_result(torch.tensor([0.0, math.inf, 1.0]), "the inversion (m)", "use gamma 1.0")


def test_compatibility_warnings_compare_what_decides_the_states():
    t = traj(latent_format="SD15", family="vp",
             sampling={"prediction": "eps", "table": "abc", "sigma_min": 0.03, "sigma_max": 14.6})
    same = {"prediction": "eps", "table": "abc", "sigma_min": 0.03, "sigma_max": 14.6}
    assert checks.compatibility_warnings(t, "SD15", same, "vp") == []
    assert checks.compatibility_warnings(t, "SD3", same, "vp") == ["latent format differs: trajectory SD15, model SD3"]
    assert checks.compatibility_warnings(t, "SD15", {**same, "prediction": "v"}, "vp") == [
        "model sampling differs: trajectory eps prediction, model v"]
    assert checks.compatibility_warnings(t, "SD15", {**same, "table": "def", "sigma_max": 20.0}, "vp") == [
        "model sampling differs: another sigma table (trajectory sigma 0.03..14.6, model 0.03..20; e.g. another "
        "shift)"]
    assert checks.compatibility_warnings(t, "SD15", same, "flow") == [
        "model family differs: trajectory vp, model flow (the states will not match this model)"]
    t = traj(latent_format="", family="", sampling={})  # an old trajectory without the facts: nothing to compare
    assert checks.compatibility_warnings(t, "SD3", {**same, "prediction": "v"}, "flow") == []
