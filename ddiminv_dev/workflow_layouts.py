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

ATTENTION_EDIT_NOTE = (
    "Prompt-to-Prompt on a real image (Hertz et al. 2022), through ComfyUI's patch API.\n\n"
    "Attention Prompts encodes the source and the edit prompt and records which tokens are which words. DDIM "
    "Invert (cfg 1, 50 steps) inverts the photo with the source prompt. The Inverted-Latent Sampler then, at "
    "every step, evaluates the stored inversion state with the source prompt (recording its attention) and the "
    "edit with the edit prompt (injecting it): cross-attention maps of the source mapped onto the edit's words "
    "for the first 40% of the steps, self-attention maps for the first 60%, and a local blend that keeps the "
    "source wherever 'cat' and 'dog' are not attended. Its text output says what was injected.")

VIDEO_TWO_EXPERTS_NOTE = (
    "A clip inverted and regenerated with Wan 2.2 A14B's two experts.\n\n"
    "Load Video gives the clip's frames; VAE Encode (Inversion) makes the 5-D Wan latent (frame count 1 + 4k: "
    "'fit' pads the last frame). DDIM Invert takes the low-noise expert as 'model' and the high-noise one as "
    "'model_high_noise': steps whose noise level is at or above 'boundary' (0.875, Wan 2.2's text-to-video "
    "switch; 0.9 for image-to-video) use the high-noise expert. Inverting runs the low-noise expert first; the "
    "Inverted-Latent Sampler, given the same pair, regenerates with the high-noise expert first, and with "
    "method exact and the same prompt and cfg it gives back the clip's latent exactly. Edit by changing the "
    "prompt on the sampler. DDIM Invert's text names the switch step for the two-KSamplerAdvanced workflow "
    "(its 'noise' drives SamplerCustomAdvanced for the high-noise half).")

FLOW_ATTENTION_EDIT_NOTE = (
    "Value injection on a flow DiT (RF-Edit / FireFlow), through ComfyUI's patch API.\n\n"
    "DDIM Invert (method exact, 28 steps, cfg 1) inverts the photo with the source prompt on SD3.5 (shift 3). The "
    "Inverted-Latent Sampler then, at every step, evaluates the stored inversion state with the source prompt "
    "(recording the values of each joint attention block) and the edit with the edit prompt: for the first 10% "
    "of the steps the edit's image tokens attend with the source's values (Attention Control, method v_inject; "
    "blocks empty = the family default: Flux/Chroma single blocks 20-37 of 38, SD3 every joint block but the "
    "last). Flux and Chroma work the same way (load them instead). Its text output says what was injected.")

LAYOUTS = {
    "video_two_experts": (
        {"1": (20, 80, 300, 330), "2": (20, 450, 300, 110), "3": (360, 80, 360, 90), "4": (360, 210, 360, 90),
         "5": (760, 80, 260, 60), "6": (760, 210, 260, 60), "7": (360, 340, 360, 110), "8": (360, 490, 400, 180),
         "9": (360, 710, 400, 130), "10": (20, 600, 300, 60), "11": (800, 340, 320, 200),
         "12": (1160, 80, 340, 460), "13": (1540, 80, 340, 330), "14": (1920, 80, 220, 50),
         "15": (1920, 180, 400, 420), "16": (1540, 460, 400, 420)},
        [(VIDEO_TWO_EXPERTS_NOTE, (20, 900, 460, 300))]),
    "flow_attention_edit": (
        {"1": (20, 80, 320, 380), "2": (20, 500, 300, 110), "16": (20, 640, 300, 110), "17": (20, 820, 300, 110),
         "3": (380, 80, 400, 160), "11": (380, 280, 400, 160), "4": (380, 480, 400, 160), "18": (380, 680, 300, 60),
         "5": (380, 780, 300, 110), "6": (820, 80, 320, 390), "12": (820, 520, 320, 330),
         "7": (1180, 80, 320, 300), "8": (1180, 420, 300, 110), "9": (1540, 80, 400, 420)},
        [(FLOW_ATTENTION_EDIT_NOTE, (20, 980, 420, 300))]),
    "attention_edit": (
        {"1": (20, 80, 320, 380), "2": (20, 500, 320, 100), "3": (380, 80, 400, 260), "4": (380, 380, 400, 120),
         "5": (820, 500, 320, 110), "6": (820, 80, 320, 380), "12": (1180, 420, 320, 330),
         "7": (1180, 80, 320, 300), "8": (1540, 80, 220, 60), "9": (1540, 180, 400, 420)},
        [(ATTENTION_EDIT_NOTE, (20, 660, 420, 300))]),
    "nulltext_reconstruct": (
        {**_COMMON, "8": (1540, 80, 320, 330), "9": (1900, 80, 220, 60), "10": (1900, 180, 400, 420)},
        [(NULLTEXT_RECONSTRUCT_NOTE, (20, 660, 420, 300))]),
    "nulltext_edit": (
        {**_COMMON, "11": (380, 440, 400, 160), "8": (1540, 80, 320, 250), "9": (1900, 80, 220, 60),
         "10": (1900, 180, 400, 420)},
        [(NULLTEXT_EDIT_NOTE, (20, 660, 420, 260))]),
}
