"""Counting model evaluations: a ``model_function_wrapper`` on a clone of a ModelPatcher.

One batched diffusion-model call counts once (ComfyUI batches the cond and uncond halves of a CFG step
into one call when memory allows), whatever node makes it, ours or core's.
"""
from __future__ import annotations


class Counter:
    """``Counter(model)``: ``.model`` is a clone whose diffusion-model calls are counted in ``.n``.

    ``Counter(model, in_place=True)`` counts on ``model`` itself (for a MODEL already cached by an executor,
    so every node that receives it is counted)."""

    def __init__(self, model, in_place: bool = False):
        self.n = 0
        self.model = model if in_place else model.clone()

        def wrapper(apply_model, args):
            self.n += 1
            return apply_model(args["input"], args["timestep"], **args["c"])

        self.model.set_model_unet_function_wrapper(wrapper)

    def take(self) -> int:
        """The calls since the last take (and start counting afresh)."""
        n, self.n = self.n, 0
        return n
