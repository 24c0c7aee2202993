"""Host tier fixtures: one booted in-process ComfyUI (the pack loaded by ``nodes.init_extra_nodes``), the fixture
node modules, and the shared assertions on the pack's error model. Prompt builders live in
``ddiminv_dev.prompts`` (shared code), the executor harness in ``ddiminv_dev.host``."""
from __future__ import annotations

import pytest
import torch

from ddiminv_dev import host

ERR = "InversionInputError"


@pytest.fixture(scope="session", autouse=True)
def booted():
    """The ComfyUI ``nodes`` module with the pack and the test-only fixture nodes registered."""
    return host.boot()


@pytest.fixture(scope="session")
def hard():
    from ddiminv_dev.fixtures import hardening_nodes
    return hardening_nodes


@pytest.fixture(scope="session")
def fx(booted):
    """(ComfyUI nodes module, the preview/encode fixture module)."""
    from ddiminv_dev.fixtures import preview_nodes
    return booted, preview_nodes


@pytest.fixture(scope="session")
def pack_error():
    """The pack's one error class, as ComfyUI loaded it."""
    return host.pack_submodule("inversion.errors").InversionInputError


def _unchanged(hard, r, p) -> None:
    """The cached outputs of the hardening source nodes equal a fresh build of the same inputs (nothing the
    pack touched was mutated)."""
    want = hard.hard_latent(**p["l"]["inputs"])
    got = r.outputs("l")[0]
    assert set(got) == set(want)
    for k in want:
        same = got[k].dtype == want[k].dtype and torch.equal(torch.nan_to_num(got[k]), torch.nan_to_num(want[k]))
        assert same and torch.equal(torch.isnan(got[k]), torch.isnan(want[k])), f"latent[{k!r}] was mutated"
    for node in ("c", "n"):
        want_c = hard.hard_cond(**p[node]["inputs"])
        got_c = r.outputs(node)[0]
        assert len(got_c) == len(want_c)
        for (gt, gd), (wt, wd) in zip(got_c, want_c, strict=True):
            assert torch.equal(torch.nan_to_num(gt), torch.nan_to_num(wt)), f"conditioning {node} was mutated"
            assert set(gd) == set(wd), f"conditioning {node} options were changed"
            for k in wd:
                a, b = gd[k], wd[k]
                same = (torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)) if isinstance(b, torch.Tensor)
                        else a == b)
                assert same, f"conditioning {node}[{k!r}] was mutated"


@pytest.fixture(scope="session")
def assert_unchanged(hard):
    return lambda r, p: _unchanged(hard, r, p)


@pytest.fixture(scope="session")
def run_error():
    """``run_error(prompt, node, display, *words)``: the prompt passes ComfyUI's own validation, then fails in
    ``node`` with the pack's error, whose message starts with ``display + ": "`` and contains every word
    (case-insensitive). Returns (message, result)."""
    def check(p, node, display, *words):
        ok = host.validate(p)
        assert ok[0], f"ComfyUI's validation rejected the prompt, so the pack's check is not reached: {ok[1]} {ok[3]}"
        r = host.run(p, expect_success=False)
        assert not r.success
        e = r.error()
        assert e is not None and e["node_id"] == node, e
        assert e["exception_type"].endswith(ERR), (e["exception_type"], e["exception_message"])
        msg = e["exception_message"]
        assert msg.startswith(display + ": "), msg
        for w in words:
            assert w.lower() in msg.lower(), f"{w!r} not in {msg!r}"
        return msg, r
    return check


def model_calls(r, node: str = "m") -> int:
    return r.outputs(node)[0].model.diffusion_model.calls


@pytest.fixture(scope="session")
def calls():
    """Model evaluations the TestHardModel of a result made (0 = the error came before any evaluation)."""
    return model_calls


def _node():
    from comfy_execution.utils import get_executing_context
    ctx = get_executing_context()
    return ctx.node_id if ctx is not None else None


@pytest.fixture
def hook():
    """ComfyUI's UI progress updates as (value, total, preview, node id), with latent previews on."""
    import comfy.utils
    import latent_preview
    from comfy.cli_args import args, LatentPreviewMethod
    calls = []
    old_hook, old_method = comfy.utils.PROGRESS_BAR_HOOK, args.preview_method
    # newer ComfyUI (0.33) resets args.preview_method to latent_preview.default_preview_method at every prompt
    has_default = hasattr(latent_preview, "default_preview_method")
    old_default = getattr(latent_preview, "default_preview_method", None)
    args.preview_method = LatentPreviewMethod.Latent2RGB
    if has_default:
        latent_preview.default_preview_method = LatentPreviewMethod.Latent2RGB

    def record(value, total, preview, node_id=None):
        calls.append((value, total, preview, _node()))

    comfy.utils.set_progress_bar_global_hook(record)
    yield calls
    comfy.utils.set_progress_bar_global_hook(old_hook)
    args.preview_method = old_method
    if has_default:
        latent_preview.default_preview_method = old_default


# ------------------------------------------------------------------------------------------------ trainers
SCENE_CAPTIONS = [[[["red", "circle"]], "grass"], [[["blue", "square"], ["yellow", "triangle"]], "night"]]


def _trainer_resumes(train, d, tmp, vae_file: str, model_file: str, state_file: str, rank: int) -> None:
    """In ``d`` (trained 2 iterations): fp16 weights of ``rank``; a resumed third iteration trains and gives the
    weights of three iterations in one run (in ``tmp``, from the same VAE)."""
    import shutil

    from safetensors.torch import load_file

    from ddiminv_dev.training import meta
    out = d / model_file
    assert meta(out)["iterations"] == "2" and meta(d / vae_file)["iterations"] == "2"
    sd = load_file(str(out))
    assert all(v.dtype == torch.float16 for v in sd.values())
    assert next(v.shape[0] for k, v in sd.items() if k.endswith(".A.weight")) == rank
    before = torch.load(d / state_file, weights_only=False)["model"]
    train(d, d / vae_file, iterations=3, batch=2, captions=SCENE_CAPTIONS)
    assert meta(out)["iterations"] == "3"  # continued from 2: one more step
    after = torch.load(d / state_file, weights_only=False)["model"]
    assert any(not torch.equal(before[k], after[k]) for k in before), "resuming did not train"
    shutil.copy(d / vae_file, tmp / vae_file)
    train(tmp, tmp / vae_file, iterations=3, batch=2, captions=SCENE_CAPTIONS)
    one_run, resumed = load_file(str(tmp / model_file)), load_file(str(out))
    assert one_run.keys() == resumed.keys() and all(torch.equal(one_run[k], resumed[k]) for k in one_run)


def _trainer_stops_in_time(train, d, tmp, vae_file: str, model_file: str, state_file: str) -> None:
    """``minutes=0`` ends a run (continued in ``tmp`` from ``d``'s files) after its first iteration with the
    weights and the full state saved, so the next run resumes from there instead of losing the work."""
    import shutil

    from ddiminv_dev.training import meta
    for f in (vae_file, model_file, state_file):
        shutil.copy(d / f, tmp / f)
    start = int(meta(tmp / model_file)["iterations"])
    train(tmp, tmp / vae_file, iterations=start + 50, batch=2, captions=SCENE_CAPTIONS, minutes=0)
    assert meta(tmp / model_file)["iterations"] == str(start + 1)
    assert torch.load(tmp / state_file, weights_only=False)["iterations"] == start + 1


@pytest.fixture(scope="session")
def trainer_checks():
    """(training captions, resume check, time-budget check) shared by the scenes trainers' tests (the SD1.5 UNet's
    and the flow DiT's run the same :class:`ddiminv_dev.training.Resumable` loop)."""
    return SCENE_CAPTIONS, _trainer_resumes, _trainer_stops_in_time
