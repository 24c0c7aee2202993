"""A tiny *trained* SD1.5-format checkpoint, ``ddiminv-learned-sd15.safetensors`` (development tooling, not the pack).

What it is, plainly: a very small latent diffusion model that has learned to denoise 64x64 crops of 15 real
photographs from ``skimage.data`` (astronaut, cat, coffee, ... grass), each with a short caption. It is not a
general text-to-image model: it knows those 15 captions (and the empty prompt, for CFG) and produces blurry
8x8-latent, 64x64 pictures in the style of those photos. Its point is that the demo and benchmarks run on a
network that actually denoises (a real eps-prediction score model on the real SD1.5 schedule), in a file of a
few MB built from ~8 MB of committed weights.

* UNet: ComfyUI's own SD1.x ``UNetModel`` in the one-level config of :mod:`ddiminv_dev.tiny_checkpoint`
  (model_channels 320, context 768), trained in a low-rank parameterisation (:mod:`.lowrank`; big layers are
  ``B @ A`` with rank 14) by denoising score matching (eps, MSE) on ComfyUI's SD15 model sampling, conditioned
  on CLIP-L encodings of the captions (empty prompt 10 % of the time);
* CLIP-L: the seeded *random* text encoder of :mod:`ddiminv_dev.tiny_checkpoint` (not trained, not committed);
  the captions are just 15 distinct encodings to it;
* VAE: a TAESD-architecture autoencoder (``comfy.taesd``), trained on the photos, scaled so that its latents
  have SD1.5's scale (raw std ~5.5, i.e. ~1 after the 0.18215 latent scale).

Modules: :mod:`.data` (photos, captions, crops, held-out strip), :mod:`.lowrank`, :mod:`.train` (trainers),
:mod:`.build` (assembles the checkpoint into ``.cache/models/checkpoints``), :mod:`.classifier` (scikit-learn
judge of samples), :mod:`.evaluate` (measures; writes ``RESULTS.md``). Retrain: ``python tools/train_learned.py``.
"""
