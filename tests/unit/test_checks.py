"""The validation layer (inversion/checks.py, inversion/schedule.py) and the one error model, without ComfyUI."""
import math
from types import SimpleNamespace

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


# ---------------------------------------------------------------------------------------------- mutation-run edges
FIX_MASK = "set it with Set Latent Noise Mask (a MASK with values 0..1)"


def _mask_error(mask, shape=(1, 4, 8, 8)) -> str:
    with pytest.raises(E) as e:
        checks.check_mask(mask, shape)
    return str(e.value)


def test_mask_errors_word_for_word():
    assert _mask_error([[1.0]]) == f"noise_mask must be a MASK tensor (got list); {FIX_MASK}"
    assert _mask_error(torch.zeros(8, 8, dtype=torch.complex64)) == (
        f"noise_mask must be a MASK tensor (got Tensor); {FIX_MASK}")
    for bad in (torch.zeros(8), torch.zeros(1, 1, 1, 8, 8), torch.zeros(0, 8)):
        assert _mask_error(bad) == (f"noise_mask must be [H,W], [B,H,W] or [B,1,H,W] (got shape "
                                    f"{tuple(bad.shape)}); {FIX_MASK}")
    assert _mask_error(torch.tensor([[0.5, float("inf")]])) == f"noise_mask contains NaN or Inf values; {FIX_MASK}"


def test_a_mask_in_range_passes_unchanged_as_float32():
    """A binary mask (exactly 0 and 1) and a [B,1,H,W] mask pass without a note; a float64 one comes back
    float32. Only values past [0, 1] are clamped, with the note saying what they spanned."""
    binary = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    m, note = checks.check_mask(binary, (1, 4, 8, 8))
    assert note is None and m.dtype == torch.float32 and torch.equal(m, binary.float())
    m, note = checks.check_mask(torch.ones(1, 1, 8, 8), (1, 4, 8, 8))
    assert note is None and m.shape == (1, 1, 8, 8)
    m, note = checks.check_mask(torch.tensor([[0.0, 1.5]]), (1, 4, 8, 8))
    assert torch.equal(m, torch.tensor([[0.0, 1.0]]))
    assert note == "noise_mask values spanned [0, 1.5]; clamped to [0, 1] (1 = regenerate, 0 = keep the source)"


def test_the_conditioning_walk_is_bounded_in_depth_and_count():
    """Extras are inspected 4 levels deep (dicts or lists) and 64 tensors at most: a NaN at depth 4 or as the 64th
    tensor is found, one at depth 5 or as the 65th is not looked at (ComfyUI's own objects can be large)."""
    nan = torch.tensor([float("nan")])

    def cond(extra):
        return [[torch.zeros(1, 2, 4), {"extra": extra}]]
    with pytest.raises(E, match=r"^positive.extra.a.b.c contains NaN"):
        checks.check_conditioning(cond({"a": {"b": {"c": nan}}}), 1, "positive")
    checks.check_conditioning(cond({"a": {"b": {"c": {"d": nan}}}}), 1, "positive")
    with pytest.raises(E, match=r"^positive.extra\[0\]\[0\]\[0\] contains NaN"):
        checks.check_conditioning(cond([[[nan]]]), 1, "positive")
    checks.check_conditioning(cond([[[[nan]]]]), 1, "positive")
    with pytest.raises(E, match=r"^positive.extra\[63\] contains NaN"):
        checks.check_conditioning(cond([torch.zeros(1)] * 63 + [nan]), 1, "positive")
    checks.check_conditioning(cond([torch.zeros(1)] * 64 + [nan]), 1, "positive")


def test_conditioning_errors_word_for_word():
    with pytest.raises(E) as e:
        checks.check_conditioning([[torch.zeros(1, 2, 4), "not a dict"]], 1, "negative")
    assert str(e.value) == "negative[0] is not a ComfyUI conditioning entry; connect a CONDITIONING output"
    with pytest.raises(E) as e:
        checks.check_conditioning([[torch.zeros(1, 2, 4), {"pooled_output": torch.zeros(1, 8)}],
                                   [torch.zeros(1, 2, 4), {"x": [torch.tensor([float("inf")])]}]], 1, "positive")
    assert str(e.value) == ("positive.x[0] contains NaN or Inf values; re-encode the prompt (or fix the node that "
                            "added it)")
    with pytest.raises(E) as e:
        checks.check_conditioning([[torch.zeros(1, 2, 4), {"pooled_output": torch.zeros(2, 8)}]], 3, "positive")
    assert str(e.value) == ("positive.pooled_output has batch 2 but the latent has batch 3; use one conditioning "
                            "per latent or a shared one (batch 1)")
    with pytest.raises(E) as e:
        checks.check_conditioning([[torch.full((1, 2, 4), float("nan")), {}]], 1, "positive")
    assert str(e.value) == "positive contains NaN or Inf values; re-encode the prompt"
    with pytest.raises(E) as e:
        checks.check_conditioning([[torch.zeros(2, 2, 4), {}]], 3, "positive")
    assert str(e.value) == ("positive has batch 2 but the latent has batch 3; use one conditioning (batch 1, shared) "
                            "or exactly one per latent")


def _latent_error(latent, **kw) -> str:
    with pytest.raises(E) as e:
        checks.check_latent(latent, **kw)
    return str(e.value)


def test_latent_errors_word_for_word():
    assert _latent_error([1]) == ("latent is not a LATENT (a dict with 'samples'); connect a LATENT output such as "
                                  "VAE Encode (Inversion)")
    assert _latent_error({"x": 1}).startswith("latent is not a LATENT")
    assert _latent_error({"samples": [1.0]}, what="source") == (
        "source has no 'samples' tensor (got list); connect a LATENT (e.g. from VAE Encode (Inversion))")
    nested = torch.nested.nested_tensor([torch.zeros(2, 8), torch.zeros(3, 8)], layout=torch.jagged)
    assert _latent_error({"samples": nested}) == (
        "latent is a nested (multi-stream) latent; DDIM inversion supports image and video latents only: connect "
        "the image/video part")
    for dtype in (torch.bool, torch.complex64, torch.int32):
        assert _latent_error({"samples": torch.zeros(1, 4, 8, 8, dtype=dtype)}) == (
            f"latent has dtype {dtype}; a latent is a float tensor: connect a LATENT output")
    assert _latent_error({"samples": torch.zeros(1, 4, 8)}) == (
        "latent has shape (1, 4, 8) but an image model (its latent format) takes [B,C,H,W] latents; encode with "
        "this model's own VAE (an image model cannot invert a video latent)")
    assert _latent_error({"samples": torch.zeros(1, 4, 8, 8)}, spatial_dims=3, format_name="Wan21") == (
        "latent has shape (1, 4, 8, 8) but a video model (Wan21) takes [B,C,T,H,W] latents; encode with this "
        "model's own VAE (an image model cannot invert a video latent)")
    assert _latent_error({"samples": torch.zeros(1, 4, 8, 8)}, spatial_dims=1, format_name="Audio") == (
        "latent has shape (1, 4, 8, 8) but this model (Audio) takes 3-D latents; encode with this model's own VAE "
        "(an image model cannot invert a video latent)")
    assert checks.check_latent({"samples": torch.zeros(1, 4, 8)}, spatial_dims=1).shape == (1, 4, 8)
    assert _latent_error({"samples": torch.zeros(1, 4, 0, 8)}) == (
        "latent is empty (shape (1, 4, 0, 8)); connect a non-empty LATENT")
    assert checks.check_latent({"samples": torch.zeros(1, 4, 1, 1)}, channels=4).numel() == 4
    assert _latent_error({"samples": torch.zeros(1, 16, 8, 8)}, channels=4, format_name="SD15") == (
        "latent has 16 channels but this model's latent format (SD15) uses 4; encode the image with this model's "
        "own VAE")
    bad = torch.zeros(1, 4, 8, 8, dtype=torch.float64)
    bad[0, 1] = float("nan")
    assert _latent_error({"samples": bad}) == (
        "latent contains NaN or Inf values (64 of 256); re-encode the image (check the VAE and the image)")


_FIX_TRAJ = "connect DDIM Invert's trajectory output (or re-run DDIM Invert)"


@pytest.mark.parametrize("change,msg", [
    (dict(method="edict"), "trajectory method 'edict' is unknown to this version of the pack; " + _FIX_TRAJ),
    (dict(sigmas=torch.tensor([0.0, 0.5, 0.5, 2.0, 3.0])),
     "trajectory sigmas must be finite, >= 0 and strictly increasing; " + _FIX_TRAJ),
    (dict(sigmas=torch.tensor([-0.5, 0.5, 1.0, 2.0, 3.0])),
     "trajectory sigmas must be finite, >= 0 and strictly increasing; " + _FIX_TRAJ),
    (dict(sigmas=torch.tensor([0.0])),
     "trajectory has 1 sigmas (shape (1,)) but needs at least 2, 1-D; " + _FIX_TRAJ),
    (dict(denoised=torch.zeros(3, 1, 4, 8, 8)),
     "trajectory is malformed (states (5, 1, 4, 8, 8), denoised (3, 1, 4, 8, 8), 5 sigmas); " + _FIX_TRAJ),
    (dict(family="flow", sigmas=torch.tensor([0.0, 0.25, 0.5, 0.75, 1.001])),
     "trajectory is a flow trajectory but reaches sigma 1.001 > 1; " + _FIX_TRAJ),
    # just past the 1e-5 slack: the message shows the digits that make it more than 1 (.4g printed "1 > 1")
    (dict(family="flow", sigmas=torch.tensor([0.0, 0.25, 0.5, 0.75, 1.00002])),
     "trajectory is a flow trajectory but reaches sigma 1.00002 > 1; " + _FIX_TRAJ),
    (dict(family="martian"), "trajectory family 'martian' is unknown (vp or flow); " + _FIX_TRAJ),
    (dict(states=torch.full((5, 1, 4, 8, 8), float("nan"))),
     "trajectory states contain NaN or Inf values; re-run DDIM Invert (for method exact use gamma 1.0)"),
    (dict(denoised=torch.full((4, 1, 4, 8, 8), float("inf"))),
     "trajectory denoised contain NaN or Inf values; re-run DDIM Invert (for method exact use gamma 1.0)"),
    (dict(eval_sigmas=torch.zeros(2)), "trajectory eval_sigmas must be 4 finite values; " + _FIX_TRAJ),
    (dict(options=[]), "trajectory options/replay must be dicts; " + _FIX_TRAJ),
    (dict(method="exact", options={"gamma": 1.5}), "trajectory gamma 1.5 is not in (0, 1]; " + _FIX_TRAJ),
    (dict(method="exact", replay={"pair": torch.zeros(2, 1, 4, 4, 4)}),
     "trajectory replay pair must be 2 finite states of shape (1, 4, 8, 8); " + _FIX_TRAJ),
    (dict(extra=[1, 2]), "trajectory extra must be a dict (got list); " + _FIX_TRAJ),
    (dict(extra={"guidance_fingerprint": 7}),
     "trajectory extra['guidance_fingerprint'] must be a string or None; " + _FIX_TRAJ),
    (dict(optimized_negative={"mode": "x"}),
     "trajectory optimized_negative must be a dict with mode null_text or negative_prompt and a non-empty "
     "conditioning list; re-run Null-Text Inversion"),
    (dict(batch_index=["a"]), "trajectory batch_index must be a list of ints; " + _FIX_TRAJ),
])
def test_trajectory_errors_word_for_word(change, msg):
    with pytest.raises(E) as e:
        checks.check_trajectory(traj(**change))
    assert str(e.value) == msg


def test_trajectories_at_the_edges_pass():
    """A flow trajectory ending at sigma 1 (within 1e-5), gamma 1 and a small gamma, batch_index ints, a
    fingerprint string, an optimised negative."""
    flow = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0 + 5e-6])
    checks.check_trajectory(traj(family="flow", sigmas=flow))
    for g in (1, 1.0, 0.05):
        checks.check_trajectory(traj(method="exact", options={"gamma": g}))
    checks.check_trajectory(traj(batch_index=[0, 2], extra={"guidance_fingerprint": "abc"},
                                 optimized_negative={"mode": "null_text", "conditioning": [[torch.zeros(1)]]}))


def test_cfg_errors_word_for_word():
    with pytest.raises(E) as e:
        checks.check_cfg("x", "source_cfg")
    assert str(e.value) == "source_cfg must be a number (got 'x'); use e.g. 1.0"
    with pytest.raises(E) as e:
        checks.check_cfg(float("inf"))
    assert str(e.value) == "cfg must be a finite number (got inf); use e.g. 1.0"
    assert checks.check_cfg(0) == 0.0 and checks.check_cfg(-2) == -2.0


def test_more_trajectory_edges():
    """Non-float schedules, a 1-step and an audio (4-D states) trajectory, batch 0, an old trajectory without a
    family, a bad experts record, an optimised negative with an unknown mode, another pack's object that has only
    the fields the sampler needs."""
    for sig in ([0.0, 1.0, 2.0, 3.0, 4.0], torch.arange(5)):
        with pytest.raises(E) as e:
            checks.check_trajectory(traj(sigmas=sig))
        assert str(e.value) == "trajectory sigmas/states/denoised must be float tensors; " + _FIX_TRAJ
    checks.check_trajectory(traj(sigmas=torch.tensor([0.0, 1.0]), states=torch.zeros(2, 1, 4, 8, 8),
                                 denoised=torch.zeros(1, 1, 4, 8, 8), eval_sigmas=torch.ones(1, dtype=torch.float64)))
    checks.check_trajectory(traj(states=torch.zeros(5, 1, 64, 16), denoised=torch.zeros(4, 1, 64, 16)))
    for s_shape, d_shape in (((5, 64, 16), (4, 64, 16)), ((5, 0, 4, 8, 8), (4, 0, 4, 8, 8))):
        with pytest.raises(E, match="^trajectory is malformed"):
            checks.check_trajectory(traj(states=torch.zeros(s_shape), denoised=torch.zeros(d_shape)))
    checks.check_trajectory(traj(family=""))
    with pytest.raises(E, match=r"^trajectory extra\['experts'\] must be a dict"):
        checks.check_trajectory(traj(extra={"experts": {"boundary": 0.9}}))
    with pytest.raises(E, match="^trajectory optimized_negative must be a dict with mode"):
        checks.check_trajectory(traj(optimized_negative={"mode": "x", "conditioning": [[torch.zeros(1)]]}))
    t = traj()
    bare = SimpleNamespace(sigmas=t.sigmas, states=t.states, denoised=t.denoised, method="ddim", options={},
                           replay={})
    checks.check_trajectory(bare)
    old = SimpleNamespace(**vars(bare), latent_format="", family="")          # no sampling record
    assert checks.compatibility_warnings(old, "SD15", {"prediction": "eps"}, "vp") == []


def test_integer_extras_are_not_nan_and_a_table_without_sigmas_reads_zero():
    mask = torch.ones(1, 77, dtype=torch.long)                 # an int attention mask is a valid extra
    checks.check_conditioning([[torch.zeros(1, 2, 4), {"attention_mask": mask}]], 1, "positive")
    t = traj(latent_format="SD15", family="vp", sampling={"prediction": "eps", "table": "abc"})
    assert checks.compatibility_warnings(t, "SD15", {"prediction": "eps", "table": "def", "sigma_min": 0.03,
                                                     "sigma_max": 14.6}, "vp") == [
        "model sampling differs: another sigma table (trajectory sigma 0..0, model 0.03..14.6; e.g. another shift)"]
