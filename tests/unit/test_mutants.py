"""Unit tests written to kill the mutants of ``inversion/`` that survived the unit tier (docs/mutation.md has the
run, the command and what is left). Each test names the behaviour it pins; the mutants it kills are listed in
docs/mutation.md, not here, because mutant numbers change with the code."""
from __future__ import annotations

import pytest
import torch

from inversion import methods as M
from inversion import schedule as S
from ddiminv_dev.gmm import GMM
from ddiminv_dev.gmm import inversion_schedule as sched
from ddiminv_dev.gmm import rel_error as rel

DESC = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])        # a 4-step sampling schedule


def refused(sigmas, *words, **kw) -> str:
    with pytest.raises(S.ScheduleError) as e:
        S.check_sampling_sigmas(sigmas, **kw)
    msg = str(e.value)
    for w in words:
        assert w in msg, (w, msg)
    return msg


# ---------------------------------------------------------------------------------------------- schedule.py
def test_the_schedule_checks_name_the_input_and_the_fix_for_a_connected_schedule():
    """A connected SIGMAS input: the message names the input ("sigmas" by default) and says to connect a
    scheduler's output unmodified."""
    connect = "connect a scheduler node's output (e.g. BasicScheduler) unmodified"
    refused([1.0, 0.0], "sigmas is not a SIGMAS tensor (got list); connect a scheduler node such as BasicScheduler")
    refused(torch.tensor([1.0, 0.0]).to(torch.complex64), "sigmas is a complex tensor; " + connect)
    refused(torch.tensor([1.0]), "sigmas has 1 value(s)", "use steps >= 1")
    refused(torch.tensor([2.0, float("nan"), 0.0]), "sigmas contains NaN or Inf (1 of 3 values); " + connect)
    refused(torch.tensor([2.0, -1.0]), "negative values (min -1); sigmas must be >= 0: " + connect)
    refused(torch.tensor([0.0, 1.0, 2.0]), "sigmas is ascending", "do not insert FlipSigmas: DDIM Invert reverses it")
    refused(torch.tensor([2.0, 1.0, 1.0, 0.0]), "sigmas must be strictly decreasing", "remove duplicated sigmas")
    refused(torch.tensor([2.0, 0.5, 0.0]), "reaches sigma 2", "(BasicScheduler with this model)", family="flow")
    refused(torch.tensor([2.0]), "my_sigmas has 1 value(s)", name="my_sigmas")


def test_a_computed_schedule_names_its_source_and_another_scheduler_as_the_fix():
    src = "the karras scheduler at 1 step"
    refused(torch.tensor([1.0]), src + " has 1 value(s)", "; use more steps", source=src)
    refused(torch.tensor([2.0, float("inf"), 0.0]), src + " contains NaN or Inf",
            "choose another scheduler or more steps", source=src)
    msg = refused(torch.tensor([2.0, 1.0, 1.0, 0.0]), src + " must be strictly decreasing",
                  "choose another scheduler or step count", source=src)
    assert "remove duplicated" not in msg


def test_only_a_strictly_ascending_schedule_is_called_ascending():
    """Not ascending: first value below the others but out of order, or ascending with a repeat."""
    for bad in ([0.0, 2.0, 1.0], [0.0, 1.0, 1.0, 2.0]):
        msg = refused(torch.tensor(bad), "must be strictly decreasing")
        assert "ascending" not in msg, (bad, msg)


def test_the_checked_schedule_is_a_float32_copy():
    s64 = torch.tensor([3.0, 2.0, 0.0], dtype=torch.float64)
    out = S.check_sampling_sigmas(s64)
    assert out.dtype == torch.float32 and out.shape == (3,) and out.tolist() == [3.0, 2.0, 0.0]
    out[0] = 9.0
    assert float(s64[0]) == 3.0
    assert S.check_sampling_sigmas(torch.tensor([1.0, 0.5, 0.0]), family="flow").tolist() == [1.0, 0.5, 0.0]


def test_segment_ranges_and_their_errors():
    assert S.segment(DESC).tolist() == DESC.tolist()                          # defaults: the whole schedule
    assert S.segment(DESC, 0, 2).tolist() == [4.0, 3.0, 2.0]                   # sampling steps 0..1
    assert S.segment(DESC, 1, 3).tolist() == [3.0, 2.0, 1.0]
    assert S.segment(DESC, 3, 10000).tolist() == [1.0, 0.0]
    with pytest.raises(S.ScheduleError, match=r"start_step must be >= 0 \(got -1\); set it to 0 or more"):
        S.segment(DESC, -1, 4)
    with pytest.raises(S.ScheduleError, match=r"end_step must be >= 0 \(got -1\); set it to 1 or more"):
        S.segment(DESC, 0, -1)
    with pytest.raises(S.ScheduleError, match=r"start_step \(0\) must be smaller than end_step \(0, capped at steps=4"):
        S.segment(DESC, 0, 0)
    with pytest.raises(S.ScheduleError, match=r"start_step \(4\) must be smaller than end_step \(4, capped"):
        S.segment(DESC, 4, 10000)
    seg = S.segment(DESC, 0, 4)
    seg[0] = 9.0
    assert float(DESC[0]) == 4.0                                               # a copy
    inv = S.inversion_order(DESC)
    assert inv.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


# ---------------------------------------------------------------------------------------------- methods.py
@pytest.fixture(scope="module")
def oracle():
    g = GMM.make(seed=4)
    return g, g.sample_x0([0, 1, 2], seed=1)


def test_a_partial_regeneration_starts_from_the_stored_state(oracle):
    g, x0 = oracle
    fn = g.model_fn(False, cond=[0, 1, 2])
    tr = M.invert(x0, sched(False, 10), fn, M.Options("ddim"))
    out = M.sample(tr, fn, start_step=7)        # three steps from states[3]
    x = tr.states[3]
    sig = tr.sigmas.tolist()
    for i in (3, 2, 1):
        x = M.ddim_step(x, fn(x, sig[i]), sig[i], sig[i - 1])
    assert torch.allclose(out, x, atol=1e-6)
    assert rel(out, x0) < rel(M.sample(tr, fn, start_step=0), x0) + 1e-3
