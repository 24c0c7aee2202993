"""Procedurally rendered scenes with exact ground-truth edits, and the scenes model trained on them
(development tooling, not the pack). See ``docs/scenes.md``.

Modules: :mod:`.render` (scenes, rendering, the caption grammar, the samplers), :mod:`.edits` (colour, shape
and background swaps), :mod:`.measure` (pixel measures: colour/shape/background readers, segmentation),
:mod:`.train` (the SD1.5-format trainer), :mod:`.build` (assembles the checkpoint).
"""
