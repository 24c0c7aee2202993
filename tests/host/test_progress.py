"""Progress with live previews, and an interrupt honoured at the next model evaluation (real executor). The `hook`
fixture (UI progress updates) is in conftest.py."""
import pytest
import torch

from ddiminv_dev import host
from ddiminv_dev.prompts import gmm_invert_sample as ours


def _node():
    from comfy_execution.utils import get_executing_context
    ctx = get_executing_context()
    return ctx.node_id if ctx is not None else None


@pytest.mark.parametrize("method", ["ddim", "exact"])
def test_one_progress_update_with_a_preview_per_step(hook, method):
    """Every inversion step reports progress with a preview. ComfyUI 0.33 throttles progress updates (less than
    100 ms apart: dropped unless they carry a preview or are the first or last), so this exact count holds there
    because each update carries its preview: a step that lost its preview would go missing on 0.33 too."""
    res = host.run(ours("eps", method, 10, 1.0))
    assert res.success
    inv = [c for c in hook if c[3] == "inv"]
    rec = [c for c in hook if c[3] == "rec"]
    assert [c[0] for c in inv] == list(range(1, 11)) and all(c[1] == 10 for c in inv)
    assert all(c[2] is not None for c in inv)                  # a decoded x0 preview every step
    assert len(rec) == (10 if method == "ddim" else 9)         # BDIA starts from the stored pair


def test_interrupt_stops_at_the_next_evaluation_and_leaves_a_clean_state(hook):
    import comfy.model_management as mm
    import comfy.utils

    stopped_at = []

    def interrupting(value, total, preview, node_id=None):
        hook.append((value, total, preview, _node()))
        if _node() == "inv" and value >= 3 and not stopped_at:   # >= : 0.33 may drop an update without a preview
            stopped_at.append(value)
            mm.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(interrupting)
    p = ours("flow", "implicit", 20, 7.5)
    res = host.run(p, expect_success=False)
    assert not res.success and res.error() is not None
    assert [e for e, _ in res.executor.status_messages if e == "execution_interrupted"]
    assert stopped_at and stopped_at[0] < 20, stopped_at
    assert max(c[0] for c in hook if c[3] == "inv") == stopped_at[0]      # no step after the interrupt
    comfy.utils.set_progress_bar_global_hook(None)
    again = host.run(p)                                         # the next prompt runs, same as a fresh one
    fresh = host.run(p)
    assert torch.equal(again.outputs("rec")[0]["samples"], fresh.outputs("rec")[0]["samples"])


def test_trajectories_are_released_when_no_longer_cached():
    import gc
    import weakref
    res = host.run(ours("eps", "exact", 6, 1.0))
    traj_ref = weakref.ref(res.outputs("inv")[2])
    states_ref = weakref.ref(res.outputs("inv")[2].states)
    assert traj_ref() is not None
    other = {"lat": {"class_type": "TestGMMLatent", "inputs": {"comps": "1", "seed": 4, "sample_seed": 9}},
             "out": {"class_type": "PreviewAny", "inputs": {"source": ["lat", 0]}}}
    host.run(other, executor=res.executor)        # the same executor: the old nodes leave the cache
    del res
    gc.collect()
    assert traj_ref() is None and states_ref() is None
