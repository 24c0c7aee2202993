"""Positions, sizes and Notes of the example workflows built by ``ddiminv_dev.workflows`` (x, y, w, h)."""

_COMMON = {
    "1": (20, 80, 320, 380), "2": (20, 500, 320, 100), "3": (380, 80, 400, 160), "4": (380, 280, 400, 120),
    "5": (820, 500, 320, 110), "6": (820, 80, 320, 380), "7": (1180, 80, 320, 230),
}

NULLTEXT_RECONSTRUCT_NOTE = (
    "Null-text inversion (Mokady et al. 2023), then reconstruction with core KSamplerAdvanced.\n\n"
    "DDIM Invert at cfg 1 (method ddim) records the pivot. Null-Text Inversion optimises one negative "
    "embedding per sampling step so that sampling at cfg 7.5 lands on the pivot at every step; its 'negative' "
    "output binds each embedding to its own step (start/end percent ranges). KSamplerAdvanced with add_noise "
    "disabled, the same steps, scheduler and cfg, started from DDIM Invert's noise_latent, then reconstructs "
    "the photo without any node of this pack. mode = negative_prompt uses the source prompt as the negative "
    "instead (free, as good as the cfg-1 inversion).")
NULLTEXT_EDIT_NOTE = (
    "Null-text inversion, then a prompt edit at cfg 7.5.\n\n"
    "The Inverted-Latent Sampler takes the annotated trajectory: it starts from the inverted noise and samples "
    "with the 'Edit prompt' and, in place of its negative input, the optimised per-step negative (null_text = "
    "auto). What the edit prompt does not change stays close to the photo; cfg should be the one the negative "
    "was optimised for.")

LAYOUTS = {
    "nulltext_reconstruct": (
        {**_COMMON, "8": (1540, 80, 320, 330), "9": (1900, 80, 220, 60), "10": (1900, 180, 400, 420)},
        [(NULLTEXT_RECONSTRUCT_NOTE, (20, 660, 420, 300))]),
    "nulltext_edit": (
        {**_COMMON, "11": (380, 440, 400, 160), "8": (1540, 80, 320, 250), "9": (1900, 80, 220, 60),
         "10": (1900, 180, 400, 420)},
        [(NULLTEXT_EDIT_NOTE, (20, 660, 420, 260))]),
}
