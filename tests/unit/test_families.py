"""The family rule (inversion/families.py) without ComfyUI: the sampling probe's verdict and its refusal texts,
and the family check's three answers. The host tier (tests/host/test_families.py) runs the same functions through
real model samplings; this tier pins their edges (docs/mutation.md, issue 29)."""
import pytest

from inversion import families as F
from inversion.errors import InversionInputError as E

VP = [(0.25, 1.0, 0.25), (0.5, 1.0, 0.5)]            # x = x0 + sigma*noise
FLOW = [(0.25, 0.75, 0.25), (0.5, 0.5, 0.5)]         # x = (1 - sigma)*x0 + sigma*noise
UNKNOWN = [(0.25, 0.875, 0.25), (0.5, 0.75, 0.5)]    # x = (1 - sigma/2)*x0 + sigma*noise


def refusal(probe, *args) -> str:
    with pytest.raises(E) as e:
        F.sampling_family(probe, *args)
    return str(e.value)


def test_the_two_samplings_and_a_noise_scale():
    assert F.sampling_family(VP) == "vp"
    assert F.sampling_family(FLOW, "CONST") == "flow"
    assert F.sampling_family([(s, a, 8.0 * b) for s, a, b in FLOW]) == "flow"      # 0.33's noise_scale 8
    assert F.sampling_family([(s, a, 0.5 * b) for s, a, b in VP]) == "vp"


def test_the_noise_scale_tolerance_is_relative_to_the_scale():
    """A probe read in float32 is proportional only to rounding: a relative spread of 5e-6 of k is accepted
    whatever k (8 or 0.1); a spread of 5e-5 is refused. Guards the ratio test's `_TOL * max(ks)`."""
    for k in (8.0, 0.1):
        near = [(0.25, 1.0, 0.25 * k), (0.5, 1.0, 0.5 * k * (1 + 5e-6))]
        assert F.sampling_family(near) == "vp", k
        far = [(0.25, 1.0, 0.25 * k), (0.5, 1.0, 0.5 * k * (1 + 5e-5))]
        assert "is neither" in refusal(far), k


def test_b_must_be_proportional_to_sigma_and_positive():
    """b = sigma + 0.2 (not k*sigma) with a = 1 is refused although a says vp; so is a negative noise scale."""
    assert "is neither" in refusal([(0.25, 1.0, 0.45), (0.5, 1.0, 0.7)])
    assert "is neither" in refusal([(s, a, -b) for s, a, b in VP])


def test_a_is_checked_against_one_and_against_one_minus_sigma():
    """a off by 2e-5 (twice the tolerance) from 1 or from 1 - sigma is refused; off by 5e-6 is accepted."""
    assert F.sampling_family([(s, a + 5e-6, b) for s, a, b in VP]) == "vp"
    assert F.sampling_family([(s, a - 5e-6, b) for s, a, b in FLOW]) == "flow"
    assert "is neither" in refusal([(s, a + 2e-5, b) for s, a, b in VP])
    assert "is neither" in refusal([(s, a - 2e-5, b) for s, a, b in FLOW])
    assert "is neither" in refusal([(s, 1.0 + s, b) for s, _, b in VP])


def test_the_unknown_sampling_message_word_for_word():
    """What the user reads: the prediction class if known, each probe point, why it is refused and the fix."""
    assert refusal(UNKNOWN, "NEW") == (
        "this model's sampling (NEW) is unknown to the inversion: its noise scaling is neither x0 + sigma*noise "
        "(EPS, V, EDM) nor (1 - sigma)*x0 + sigma*noise (flow) (sigma 0.25: x = 0.875 x0 + 0.25 noise, sigma 0.5: "
        "x = 0.75 x0 + 0.5 noise); it is refused rather than inverted with a guessed sampling: use a model with an "
        "EPS, V-prediction, EDM or flow sampling")
    assert refusal(UNKNOWN).startswith("this model's sampling is unknown to the inversion: its noise scaling is "
                                       "neither")


def test_a_sampling_without_noise_is_called_an_image_to_image_predictor():
    """b = 0 (a renamed IMG_TO_IMG_FLOW): 'adds no noise'; b just above the tolerance is not called that."""
    assert refusal([(0.25, 1.0, 0.0), (0.5, 1.0, 0.0)]) == (
        "this model's sampling is unknown to the inversion: its noise scaling adds no noise (an image-to-image "
        "predictor) (sigma 0.25: x = 1 x0 + 0 noise, sigma 0.5: x = 1 x0 + 0 noise); it is refused rather than "
        "inverted with a guessed sampling: use a model with an EPS, V-prediction, EDM or flow sampling")
    msg = refusal([(0.25, 1.0, 2e-5), (0.5, 1.0, 0.0)])
    assert "is neither" in msg and "adds no noise" not in msg


@pytest.mark.parametrize("pred,what", [
    ("IMG_TO_IMG", "the model maps its input to the output in one step, as Lotus does"),
    ("IMG_TO_IMG_FLOW", "its noise scaling returns the input unchanged"),
])
def test_a_refused_prediction_is_refused_by_name_whatever_its_probe(pred, what):
    msg = refusal(VP, pred)
    assert msg.startswith(f"this model's sampling is an image-to-image predictor ({pred} sampling: {what}); ")
    assert msg.endswith("it cannot be inverted: use a generative model (or core ModelSamplingDiscrete with eps, "
                        "v_prediction or x0)")


def test_check_family_refuses_warns_or_passes():
    assert F.check_family("SD15") is None and F.check_family("WAN21_T2V") is None
    with pytest.raises(E) as e:
        F.check_family("Stable_Cascade_B")
    assert str(e.value) == ("model family Stable_Cascade_B cannot be inverted: Stage B decodes Stage C's latent "
                            "(its conditioning); invert with Stage C instead")
    tail = (" is not in the tested family matrix; its sampling was probed and is inverted as such, but nothing "
            "checked this family's conditioning or latent: compare the reconstruction")
    assert F.check_family("FutureFamilyXYZ") == "model family FutureFamilyXYZ" + tail
    assert F.check_family(None) == "model family unknown (no supported_models config)" + tail
    assert F.check_family("") == "model family unknown (no supported_models config)" + tail
