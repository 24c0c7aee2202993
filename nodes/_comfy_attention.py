"""The adapter of attention control: how the policy of ``inversion/attention.py`` reaches a ComfyUI model.

Only through ComfyUI's patch API, on a *clone* made here (the input MODEL is never patched):

* ``ModelPatcher.set_model_attn1_replace`` / ``set_model_attn2_replace`` on every attention layer of an SD1.x /
  SD2 / SDXL UNet (``comfy.ldm.modules.attention.BasicTransformerBlock`` calls ``fn(q, k, v, extra_options)`` with
  q/k/v projected, [B, N, heads*dim_head]). A replace patch another pack already set on a key (the 3-tuple, or
  the 2-tuple ComfyUI falls back to) is kept: it computes every output we do not inject, and an injection is
  made through it (PnP/MasaCtrl pass it the substituted q/k/v; P2P adds its map's difference to its output,
  which is also exactly 0 where the maps agree);
* Flux and Chroma (double and single blocks) and SD3 (joint blocks), v_inject and kv_edit:
  ``set_model_patch_replace(fn, "dit",
  "single_block"|"double_block", i)`` on each block marks the block in ``transformer_options`` while it runs, and
  ``transformer_options["optimized_attention_override"]`` (0.3.75's ``wrap_attn``; chained to an override already
  there) records/injects its attention call, q/k/v over the joint [text; image] sequence ([B, H, N, D] on
  Flux, [B, N, H*D] on SD3: the tokens are dim -2 either way). Flux's DoubleStreamBlock (0.3.75's and 0.33's
  comfy/ldm/flux/layers.py) projects text and image in their own streams and makes one
  ``attention(cat(txt, img), ...)`` call with the block's ``transformer_options``, as the SingleStreamBlock does
  over its already joined sequence, so both kinds are one marked call with the image's patches after the text.
  Reference latents (Flux Kontext / Flux 2's ``ref_latents``, ComfyUI's ReferenceLatent node) follow the image's
  patches in the image stream, [text; image; reference]: each block replace reads the text and image-stream
  lengths from its args (a single block from the double blocks before it) and only the latent's own patches are
  injected, the reference tokens keep the edit's values as the text does (HunyuanVideo is refused: 0.3.75's
  flipped blocks run [reference; image; text], 0.33's [text; reference; image], and its block arguments do not say
  which). Qwen-Image has Flux's double-block layout and is reached the same way; Wan
  2.1/2.2 (:data:`SELF_DITS`) attends over the video alone then to the text: only the first attention call of each
  marked block (its self-attention, every token the latent's) is controlled. Other DiTs (HunyuanVideo,
  Lumina/Z-Image, HiDream, ...) are refused by name: :data:`JOINT_DITS`, :data:`SELF_DITS`;
  kv_edit swaps the keys and values of the background image tokens (the patches its mask does not touch) for
  the source's, and the local blend by the same mask keeps the latent's background after every step;
* Plug-and-Play's decoder features (``pnp_feature``): ``ModelPatcher.set_model_output_block_patch``. 0.3.75's
  (and 0.33's) ``UNetModel._forward`` calls ``transformer_options["patches"]["output_block_patch"]`` as
  ``h, hsp = p(h, hsp, transformer_options)`` just before output block i (``transformer_options["block"]`` =
  ("output", i)) concatenates them and runs its ResBlock. No stable surface reaches a ResBlock's output itself
  (``forward_timestep_embed_patch`` skips TimestepBlocks), so the nearest one is used: the edit branch's (h, hsp)
  *entering* the block are replaced by the source's, so the block's ResBlock computes the source's features
  exactly where its time embedding is the same in both branches (SD1.x/SD2: it depends on the timestep only; on
  SDXL the pooled prompt enters it, so there it is the source's input under the edit's embedding), and the
  block's attention then runs on them with the edit's prompt, as in PnP;
* ``extra_options["cond_or_uncond"]`` tells which chunk of the batch is cond (0) or uncond (1): chunks run
  together ([uncond, cond]), alone when memory is short, and the uncond is skipped at cfg 1 -- every case is a
  list of chunks here; ``block``, ``block_index``, ``n_heads``, ``attn_precision``, ``activations_shape``;
* a ``comfy.samplers.CFGGuider`` subclass holding both prompt pairs, whose ``predict_noise`` picks the source or
  the edit pair by the branch the :class:`Controller` is evaluating (state in the controller, reached by closures:
  ``ModelPatcher.clone`` deep-copies ``model_options``, and a closure survives a deep copy as itself).

The :class:`Controller` is the ``control`` object of ``inversion.methods.sample``: ``source(x, sigma, step)``
evaluates the source branch (recording), the loop then evaluates the edit branch (injecting), and
``after(step, x_new, x_source)`` checks that every planned record and injection happened, clears the step's records
(memory does not grow with steps) and applies P2P's local blend.

ComfyUI modules used here: ``comfy.ldm.modules.attention`` (``SpatialTransformer``, ``SpatialVideoTransformer``
to find the layers; ``optimized_attention``, the function the model itself calls, for every output not
injected), ``comfy.ldm.modules.diffusionmodules.openaimodel`` (``Downsample``/``Upsample``: each layer's
resolution), ``comfy.ldm.flux.model`` (``Flux``), ``comfy.ldm.chroma.model`` (``Chroma``) and
``comfy.ldm.modules.diffusionmodules.mmdit`` (``MMDiT``: SD3), ``comfy.ldm.qwen_image.model``
(``QwenImageTransformer2DModel``) and ``comfy.ldm.wan.model`` (``WanModel``, matched exactly) to recognise the DiTs
reached, and
``comfy.samplers`` (``CFGGuider``, ``sampling_function``).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Optional

import torch

import comfy.ldm.chroma.model as comfy_chroma
import comfy.ldm.flux.model as comfy_flux
import comfy.ldm.modules.attention as comfy_attention
import comfy.ldm.modules.diffusionmodules.mmdit as comfy_mmdit
import comfy.ldm.qwen_image.model as comfy_qwen
import comfy.ldm.wan.model as comfy_wan
import comfy.samplers
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

from ..inversion import attention as A
from ..inversion import p2p as P
from ..inversion.errors import InversionInputError
from . import _comfy as C

SLOTS = {A.SELF: "attn1", A.CROSS: "attn2"}
DIT_KEY = "ddim_inversion_attention_layer"   # set in transformer_options while a controlled dit block runs


# ---------------------------------------------------------------------------------------------- topology
def unet_layers(model) -> list:
    """Every attention layer of the model's UNet as :class:`inversion.attention.Layer` (with its downsampling
    factor); refuses models it cannot reach (DiTs, video UNets) by name."""
    net = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not all(hasattr(net, a) for a in ("input_blocks", "middle_block", "output_blocks")):
        raise InversionInputError(
            f"attention control reaches SD1.x/SD2/SDXL UNets; this model ({C.family_name(model)}, "
            f"{type(net).__name__}) is not one; disconnect attention_control or use a UNet checkpoint")
    layers, factor = [], 1
    for i, blk in enumerate(net.input_blocks):
        layers += _block_layers(("input", i), blk, factor)
        factor *= 2 if any(isinstance(m, Downsample) for m in blk.modules()) else 1
    if net.middle_block is not None:
        layers += _block_layers(("middle", 0), net.middle_block, factor)
    for i, blk in enumerate(net.output_blocks):
        layers += _block_layers(("output", i), blk, factor)
        factor //= 2 if any(isinstance(m, Upsample) for m in blk.modules()) else 1
    return layers


# the DiTs attention control reaches: text tokens first, then the image's patches, in one joint attention call
# per block (ComfyUI's dit replace keys). Flux/Chroma: the double blocks (separate text and image streams, one
# joint call over [text; image]: KV-Edit caches K/V there too) then the single blocks (RF-Edit's value
# injection); SD3's MMDiT: its joint blocks ("double_block" keys; SD3.5's extra image-only self-attention in a
# block is a second call).
JOINT_DITS = ((comfy_flux.Flux, (("double_blocks", "double_block"), ("single_blocks", "single_block"))),
              (comfy_chroma.Chroma, (("double_blocks", "double_block"), ("single_blocks", "single_block"))),
              (comfy_mmdit.MMDiT, (("joint_blocks", "double_block"),)),
              # Qwen-Image (0.3.75's and 0.33's QwenImageTransformer2DModel): Flux's double-block layout -- text
              # and image streams, one attention call over [text; image; reference latents] ([B, H, N, D],
              # skip_reshape), ("double_block", i) replaced with {img, txt, vec, pe, transformer_options}
              (comfy_qwen.QwenImageTransformer2DModel, (("transformer_blocks", "double_block"),)))
# the DiTs whose blocks attend over the image alone, then to the text in a separate cross-attention: the *first*
# attention call of each block is its self-attention over the latent's patches (v_inject / kv_edit act there, the
# text cross-attention calls after it pass untouched). Wan 2.1/2.2 (comfy.ldm.wan.model.WanModel, exactly: its
# subclasses -- VACE, camera, S2V, HuMo, Animate, ... -- add streams or block replaces without
# transformer_options and stay refused): WanAttentionBlock runs self_attn then cross_attn, each through
# optimized_attention(..., transformer_options=...) with [B, N, H*D] q/k/v (0.3.75 and 0.33 alike), and
# forward_orig replaces its blocks by ("double_block", i) with args {img, txt, vec, pe, transformer_options}.
SELF_DITS = ((comfy_wan.WanModel, (("blocks", "double_block"),)),)
REACHES = ("attention control reaches SD1.x/SD2/SDXL UNets (p2p, pnp, masactrl) and the Flux, Chroma, SD3, "
           "Qwen-Image and Wan 2.1/2.2 DiTs (v_inject, kv_edit)")


def _dit_kind(net):
    """(stacks, self_first) of a reached DiT, or None: JOINT_DITS by isinstance, SELF_DITS by exact type."""
    for cls, stacks in JOINT_DITS:
        if isinstance(net, cls):
            return stacks, False
    for cls, stacks in SELF_DITS:
        if type(net) is cls:
            return stacks, True
    return None


def self_first(model) -> bool:
    """Whether ``model`` is a DiT of :data:`SELF_DITS` (only each block's first attention call is controlled)."""
    kind = _dit_kind(getattr(getattr(model, "model", None), "diffusion_model", None))
    return bool(kind and kind[1])


def dit_patch(model) -> tuple:
    """(temporal, spatial) patch size of a reached DiT: Wan's (1, 2, 2) gives (1, 2), Flux/SD3's 2 gives (1, 2)."""
    patch = getattr(model.model.diffusion_model, "patch_size", 1)
    if isinstance(patch, (tuple, list)):
        return (int(patch[0]) if len(patch) > 2 else 1), int(patch[-1])
    return 1, int(patch)


def image_tokens(model, shape) -> int:
    """The latent's patches in a reached DiT's sequence: ceil(H/p)*ceil(W/p), times ceil(T/pt) for a 5-D video
    latent [B, C, T, H, W] (the models pad their sides up to the patch)."""
    pt, p = dit_patch(model)
    n = math.prod(-(-int(s) // p) for s in shape[-2:])
    return n * (-(-int(shape[-3]) // pt) if len(shape) == 5 else 1)


def dit_layers(model) -> list:
    """The blocks of a joint-attention DiT (Flux/Chroma double then single blocks, SD3 joint blocks; replaced
    through ComfyUI's ("dit", name, i) keys) as JOINT layers; factor = the patch size."""
    net = getattr(getattr(model, "model", None), "diffusion_model", None)
    kind = _dit_kind(net)
    if kind is not None:
        patch = dit_patch(model)[1]
        return [A.Layer(A.JOINT, (key, i), 0, patch) for attr, key in kind[0]
                for i in range(len(getattr(net, attr, ())))]
    raise InversionInputError(f"{REACHES}; this model ({C.family_name(model)}, {type(net).__name__}) is none of "
                              "them (its attention is not one text+image call per block); disconnect "
                              "attention_control")


def feature_layers(model) -> list:
    """One FEATURE layer per decoder block of a UNet (PnP's feature injection reaches each through the output
    block patch)."""
    net = model.model.diffusion_model
    return [A.Layer(A.FEATURE, ("output", i), 0) for i in range(len(net.output_blocks))]


def model_layers(model) -> list:
    """The layers attention control can reach: a UNet's attention layers and decoder blocks (FEATURE), or a
    joint-attention DiT's blocks; other models are refused by name."""
    net = getattr(getattr(model, "model", None), "diffusion_model", None)
    if _dit_kind(net) is not None:
        return dit_layers(model)
    if not all(hasattr(net, a) for a in ("input_blocks", "middle_block", "output_blocks")):
        return dit_layers(model)      # refuses it by name
    return unet_layers(model) + feature_layers(model)


def _block_layers(block: tuple, module, factor: int) -> list:
    out = []
    for m in module.modules():
        if isinstance(m, comfy_attention.SpatialVideoTransformer):
            raise InversionInputError("attention control does not reach video UNets (SVD) yet; disconnect "
                                      "attention_control")
        if isinstance(m, comfy_attention.SpatialTransformer):
            for j, tb in enumerate(m.transformer_blocks):
                out.append(A.Layer(A.SELF, block, j, factor))
                if getattr(tb, "attn2", None) is not None:
                    out.append(A.Layer(A.CROSS, block, j, factor))
    return out


def chunks_that_run(model, cfg: float) -> tuple:
    """The chunk kinds every evaluation runs: the uncond is skipped at cfg 1 unless the model disables that."""
    if math.isclose(float(cfg), 1.0) and not model.model_options.get("disable_cfg1_optimization", False):
        return (A.COND,)
    return (A.UNCOND, A.COND)


# ---------------------------------------------------------------------------------------------- the controller
class Controller:
    """The per-run state: which branch and step is being evaluated, the step's records, the counts, the blend."""

    def __init__(self, control: A.Control, sched: A.Schedule, alignment: Optional[P.Alignment] = None,
                 blend_cols: tuple = ((), ()), blend_mask: Optional[torch.Tensor] = None,
                 source_runs: Optional[dict] = None):
        self.control, self.sched, self.alignment = control, sched, alignment
        self.source_runs = source_runs         # {step: chunks the source evaluates} (None: every chunk, every step)
        self.cond_only = False                 # the source branch's evaluation now runs the cond chunk alone
        self.blend_cols, self.given_mask = blend_cols, blend_mask
        self.branch: Optional[str] = None
        self.step = -1
        self.model_fn: Optional[Callable] = None
        self.store: dict = {}
        self.seen: Counter = Counter()         # (branch, layer, chunk) -> calls this step (occurrences)
        self.records: Counter = Counter()      # (layer, chunk) -> records this step
        self.injections: Counter = Counter()   # (layer, chunk) -> injections this step
        self.blend_calls: Counter = Counter()  # branch -> blend maps added this step
        self.blend_sum = {"source": None, "edit": None}
        self.totals = Counter()                # "records" / "injections" over the run (the node reports them)
        self.recorded_maps: list = []          # test hook: (branch, step, layer, chunk, probs) when keep_maps
        self.keep_maps = False
        self.image_tokens = 0                  # DiTs: the latent's image tokens in the joint sequence
        self.layout: Optional[tuple] = None    # DiTs: (text, image stream) tokens of the block running now
        self.self_first = False                # SELF_DITS (Wan): a block's first attention call is the controlled one
        self.background: Optional[torch.Tensor] = None   # kv_edit: [B or 1, image tokens] True = background
        self.last_mask: Optional[torch.Tensor] = None   # the blend mask of the last blended step

    # --- the loop's side (inversion.methods.sample's control protocol)
    def source(self, x, sigma, step):
        self.step, self.branch = step, "source"
        self.store.clear()
        self.seen.clear(), self.records.clear(), self.injections.clear(), self.blend_calls.clear()
        run = None if self.source_runs is None else self.source_runs.get(step)
        try:
            if run is not None and not run:
                return None            # nothing records at this step (inversion.attention.source_chunks)
            self.cond_only = run == (A.COND,)
            return self.model_fn(x, sigma)
        finally:
            self.branch, self.cond_only = "edit", False

    def after(self, step, x_new, x_source):
        self.check_step(step)
        self.store.clear()
        if step not in self.sched.blend_steps:
            return x_new
        mask = self.given_mask
        if mask is None:
            mask = P.blend_mask(self.blend_sum["source"], self.blend_sum["edit"], tuple(x_new.shape[-2:]),
                                self.control.blend_threshold)
        self.last_mask = mask
        return P.local_blend(x_source, x_new, mask.to(x_new.device, x_new.dtype))

    def check_step(self, step) -> None:
        """Every planned record and injection of ``step`` happened, once per chunk that ran (no silent no-op)."""
        planned = self.sched.actions.get(step, {})
        missing = [f"{la.name()} {'cond' if ch == A.COND else 'uncond'}" for (la, ch) in planned
                   if self.records[(la, ch)] < 1 or self.injections[(la, ch)] != self.records[(la, ch)]]
        extra = [k for k in self.injections if k not in planned]
        blend_ok = not self.sched.blend or (self.blend_calls["source"] >= len(self.sched.blend)
                                            and self.blend_calls["edit"] >= len(self.sched.blend))
        if missing or extra or not blend_ok:
            what = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise InversionInputError(
                f"attention control at step {step}: planned records/injections did not happen ({what or 'blend'}"
                f"{'; unplanned: ' + str(len(extra)) if extra else ''}); another node replaces this model's "
                "attention in a way the patches cannot reach: remove it, or disconnect attention_control")
        self.totals["records"] += sum(self.records.values())
        self.totals["injections"] += sum(self.injections.values())

    # --- the patches' side
    def attend(self, layer: A.Layer, q, k, v, eo: dict, base: Callable):
        """One attention call of ``layer`` (q/k/v projected, every chunk of the batch): record or inject."""
        chunks = list(eo.get("cond_or_uncond", [A.COND]))
        b = q.shape[0] // len(chunks)
        plan = self.sched.actions.get(self.step, {})
        blend = layer in self.sched.blend
        todo = []
        for c, ch in enumerate(chunks):
            occ = self.seen[(self.branch, layer, ch)]
            self.seen[(self.branch, layer, ch)] += 1
            todo.append((c, ch, occ, plan.get((layer, ch))))
        if not blend and not any(a for *_, a in todo):
            return base(q, k, v, eo)
        if self.branch == "source":
            return self._record_all(layer, q, k, v, eo, base, todo, b, blend)
        return self._inject_all(layer, q, k, v, eo, base, todo, b, blend)

    def _record_all(self, layer, q, k, v, eo, base, todo, b, blend):
        heads = int(eo["n_heads"])
        for c, ch, occ, a in todo:
            sl = slice(c * b, (c + 1) * b)
            if a is not None:
                if A.RECORDS[a] == "probs":
                    rec = {"probs": A.probs(q[sl], k[sl], heads)}
                else:
                    rec = {"q": q[sl], "k": k[sl], "v": v[sl]}
                self.store[(layer, ch, occ)] = rec
                self.records[(layer, ch)] += 1
                if self.keep_maps and "probs" in rec:
                    self.recorded_maps.append(("source", self.step, layer, ch, rec["probs"]))
            if blend and ch == A.COND:
                self._blend_add("source", A.probs(q[sl], k[sl], heads), eo)
        return base(q, k, v, eo)

    def _inject_all(self, layer, q, k, v, eo, base, todo, b, blend):
        heads = int(eo["n_heads"])
        qs, ks, vs = list(q.split(b)), list(k.split(b)), list(v.split(b))
        maps = []
        for c, ch, occ, a in todo:
            if blend and ch == A.COND:
                self._blend_add("edit", A.probs(qs[c], ks[c], heads), eo)
            rec = self.store.get((layer, ch, occ)) if a is not None else None
            if rec is None:
                continue
            self.injections[(layer, ch)] += 1
            if a == "pnp_qk":
                qs[c], ks[c] = rec["q"], rec["k"]
            elif a == "masactrl_kv":
                ks[c], vs[c] = rec["k"], rec["v"]
            else:
                maps.append((c, ch, a, rec["probs"]))
        out = base(torch.cat(qs), torch.cat(ks), torch.cat(vs), eo)
        for c, ch, a, src in maps:
            sl = slice(c * b, (c + 1) * b)
            own = A.probs(q[sl], k[sl], heads)
            use = src if a == "p2p_self" else P.cross_map(src, own, self.alignment)
            if self.keep_maps:
                self.recorded_maps.append(("edit", self.step, layer, ch, use))
            # as a difference to what ran: 0 bit for bit where the maps agree, and another pack's patch is kept
            out[sl] = out[sl] + A.apply_probs(use - own, v[sl]).to(out.dtype)
        return out

    def attend_dit(self, layer: A.Layer, q, k, v, to: dict, base: Callable, dim: int = 2):
        """One joint attention call of a DiT block (every chunk; the tokens along ``dim`` of k/v: 2 for Flux's
        [B, H, N, D], 1 for SD3's [B, N, H*D] / [B, N, H, D]): the source records what the action needs, the
        edit's image tokens take the source's values (v_inject) or its background tokens the source's keys and
        values (kv_edit)."""
        chunks = list(to.get("cond_or_uncond", [A.COND]))
        b = v.shape[0] // len(chunks)
        plan = self.sched.actions.get(self.step, {})
        ks, vs, changed = list(k.split(b)), list(v.split(b)), False
        for c, ch in enumerate(chunks):
            occ = self.seen[(self.branch, layer, ch)]
            self.seen[(self.branch, layer, ch)] += 1
            a = plan.get((layer, ch))
            if a is None:
                continue
            if self.branch == "source":
                self.store[(layer, ch, occ)] = {"k": ks[c], "v": vs[c]} if a == "kv_edit" else {"v": vs[c]}
                self.records[(layer, ch)] += 1
                continue
            rec = self.store.get((layer, ch, occ))
            if rec is None:
                continue
            if rec["v"].shape != vs[c].shape:
                raise InversionInputError(
                    f"{a} got a source attention call of {rec['v'].shape[dim]} tokens for the edit's "
                    f"{vs[c].shape[dim]} in {layer.name()}: the two prompts differ in their reference latents "
                    "(ReferenceLatent) or batch; give source_positive and positive the same reference images")
            start = self.image_start(vs[c].shape[dim])
            if a == "kv_edit":
                ks[c] = A.inject_background(ks[c], rec["k"], self.background, dim, start)
                vs[c] = A.inject_background(vs[c], rec["v"], self.background, dim, start)
            else:
                vs[c] = A.inject_values(vs[c], rec["v"], self.image_tokens, dim, start)
            self.injections[(layer, ch)] += 1
            changed = True
        return base(q, torch.cat(ks), torch.cat(vs)) if changed else base(q, k, v)

    def block_streams(self, args: dict) -> None:
        """A controlled DiT block starts: learn where the latent's image tokens sit in its attention calls. A
        double/joint block (``txt`` in its args) holds the text and the image stream apart: the image stream is the
        latent's patches followed by any reference latents' (Flux Kontext / Flux 2's ``ref_latents``: 0.3.75's
        Flux._forward concatenates them after the image), and its joint call is [text; image; reference]. A single
        block's args hold the joined sequence, the layout of the forward's double blocks (which run first)."""
        img = args.get("img")
        if img is None:
            raise InversionInputError("attention control cannot read this DiT block's image tokens (its block "
                                      "replace has no 'img'); disconnect attention_control")
        if self.self_first:      # Wan: the self-attention runs over the image stream alone, nothing prepended
            if int(img.shape[1]) != self.image_tokens:
                raise InversionInputError(
                    f"attention control expected this DiT block's self-attention over the latent's "
                    f"{self.image_tokens} patches, and its image stream has {img.shape[1]} tokens (reference or "
                    "context latents joined to the video); disconnect them or attention_control")
            self.layout = (None, int(img.shape[1]))
            return
        if "txt" in args:
            txt = args.get("txt")
            self.layout = (0 if txt is None else int(txt.shape[1]), int(img.shape[1]))
        elif self.layout is None or sum(self.layout) != img.shape[1]:
            raise InversionInputError(f"attention control cannot tell the text from the image tokens of this DiT's "
                                      f"single block ({img.shape[1]} tokens, no double block before it); "
                                      "disconnect attention_control")
        if self.layout[1] < self.image_tokens:
            raise InversionInputError(f"attention control expected the latent's {self.image_tokens} image tokens "
                                      f"in this DiT block, which has {self.layout[1]}; run the sampler on the "
                                      "latent the trajectory was inverted from")

    def image_start(self, n: int) -> int:
        """Where the latent's image tokens start in a joint attention call of ``n`` tokens: after the text in
        [text; image; reference], at 0 in an image-only call (SD3.5's second); the reference latents' tokens after
        them keep the edit's own values, as the text does."""
        text, stream = self.layout or (None, None)
        if text is not None and n == text + stream:
            return text
        if stream is not None and n == stream:
            return 0
        raise InversionInputError(f"attention control met a joint attention call of {n} tokens in a block of "
                                  f"{text} text and {stream} image tokens; another node changes this DiT's "
                                  "attention: remove it, or disconnect attention_control")

    def features(self, layer: A.Layer, h, hsp, to: dict):
        """PnP's decoder features at the entry of ``layer``'s block (every chunk): the source records (h, hsp),
        the edit's planned chunks take them (the block's ResBlock then computes the source's features)."""
        chunks = list(to.get("cond_or_uncond", [A.COND]))
        b = h.shape[0] // len(chunks)
        plan = self.sched.actions.get(self.step, {})
        hs, hsps, changed = list(h.split(b)), list(hsp.split(b)), False
        for c, ch in enumerate(chunks):
            occ = self.seen[(self.branch, layer, ch)]
            self.seen[(self.branch, layer, ch)] += 1
            if plan.get((layer, ch)) is None:
                continue
            if self.branch == "source":
                self.store[(layer, ch, occ)] = {"h": hs[c], "hsp": hsps[c]}
                self.records[(layer, ch)] += 1
                continue
            rec = self.store.get((layer, ch, occ))
            if rec is None or rec["h"].shape != hs[c].shape or rec["hsp"].shape != hsps[c].shape:
                continue
            hs[c], hsps[c] = rec["h"].to(h.dtype), rec["hsp"].to(hsp.dtype)
            self.injections[(layer, ch)] += 1
            changed = True
        return (torch.cat(hs), torch.cat(hsps)) if changed else (h, hsp)

    def _blend_add(self, branch: str, p, eo: dict) -> None:
        hw = tuple(eo["activations_shape"][-2:])
        m = P.word_map(p, list(self.blend_cols[0 if branch == "source" else 1]), hw)
        prev = self.blend_sum[branch]
        self.blend_sum[branch] = m if prev is None else prev + m
        self.blend_calls[branch] += 1


# ---------------------------------------------------------------------------------------------- patching a clone
def _patch(ctl: Controller, layer: A.Layer, prev: Optional[Callable]) -> Callable:
    def base(q, k, v, eo):
        if prev is not None:
            return prev(q, k, v, eo)
        return comfy_attention.optimized_attention(q, k, v, eo["n_heads"], attn_precision=eo.get("attn_precision"),
                                                   transformer_options=eo)

    def replace(q, k, v, extra_options):
        if ctl.branch is None:
            return base(q, k, v, extra_options)
        return ctl.attend(layer, q, k, v, extra_options, base)
    return replace


def _output_block_patch(ctl: Controller, layers) -> Callable:
    """The output block patch of PnP's feature injection: (h, hsp) entering a decoder block with a FEATURE
    layer go through the controller; everything else passes unchanged."""
    by_id = {int(la.block[1]): la for la in layers}

    def patch(h, hsp, transformer_options):
        block = transformer_options.get("block") or ("", -1)
        layer = by_id.get(int(block[1])) if block[0] == "output" else None
        if layer is None or ctl.branch is None:
            return h, hsp
        return ctl.features(layer, h, hsp, transformer_options)
    return patch


def _dit_block(ctl: Controller, layer: A.Layer, prev: Optional[Callable]) -> Callable:
    """A dit block replace that marks ``layer`` in transformer_options while the block runs (its one attention
    call, through the override, knows where it is), chaining to a block replace already there."""
    def replace(args, extra):
        to = args.get("transformer_options")
        mark = ctl.branch is not None and isinstance(to, dict)
        if mark:
            to[DIT_KEY] = layer
            ctl.block_streams(args)
        try:
            return prev(args, extra) if prev is not None else extra["original_block"](args)
        finally:
            if mark:
                to.pop(DIT_KEY, None)
    return replace


def _dit_override(ctl: Controller, prev: Optional[Callable]) -> Callable:
    """transformer_options["optimized_attention_override"] (0.3.75's wrap_attn): inside a marked block the
    controller records/injects, else (and for q/k/v it leaves alone) the call goes on to the override already
    there or the attention function itself."""
    def override(func, *args, **kwargs):
        to = kwargs.get("transformer_options") or {}
        layer = to.get(DIT_KEY)

        def base(q, k, v):
            a = (q, k, v) + tuple(args[3:])
            return prev(func, *a, **kwargs) if prev is not None else func(*a, **kwargs)
        if layer is None or ctl.branch is None or len(args) < 3:
            return base(*args[:3]) if len(args) >= 3 else (prev(func, *args, **kwargs) if prev is not None
                                                             else func(*args, **kwargs))
        if ctl.self_first:       # Wan: this first call is the block's self-attention; its text cross-attention
            to.pop(DIT_KEY, None)  # calls after it pass untouched
        # ComfyUI's layouts: skip_reshape -> [B, H, N, D] (Flux), else [B, N, H*D] or [B, N, H, D] (SD3's v)
        return ctl.attend_dit(layer, args[0], args[1], args[2], to, base, 2 if kwargs.get("skip_reshape") else 1)
    return override


def install_dit(clone, ctl: Controller, layers) -> int:
    """Block-replace every JOINT layer of ``clone`` and set the attention override (each chained to what is
    there); returns how many chain to another one."""
    existing = clone.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    chained = 0
    for la in layers:
        prev = existing.get(tuple(la.block))
        chained += prev is not None
        clone.set_model_patch_replace(_dit_block(ctl, la, prev), "dit", la.block[0], la.block[1])
    to = clone.model_options.setdefault("transformer_options", {})   # after the patches: they copy the dict
    prev_override = to.get("optimized_attention_override")
    chained += prev_override is not None
    to["optimized_attention_override"] = _dit_override(ctl, prev_override)
    return chained


def install(clone, ctl: Controller, layers) -> int:
    """Replace-patch every layer of ``clone`` (chaining to a replace patch already there); returns how many of
    the patches chain to another one."""
    if any(la.kind == A.JOINT for la in layers):
        return install_dit(clone, ctl, [la for la in layers if la.kind == A.JOINT])
    features = [la for la in layers if la.kind == A.FEATURE]
    if any(a == "pnp_feature" for row in ctl.sched.actions.values() for a in row.values()):
        clone.set_model_output_block_patch(_output_block_patch(ctl, features))
    existing = clone.model_options.get("transformer_options", {}).get("patches_replace", {})
    chained = 0
    for la in (la for la in layers if la.kind in SLOTS):
        slot = SLOTS[la.kind]
        prev = existing.get(slot, {}).get(la.key) or existing.get(slot, {}).get(tuple(la.block))
        chained += prev is not None
        clone.set_model_patch_replace(_patch(ctl, la, prev), slot, la.block[0], la.block[1], la.index)
    return chained


class _BranchGuider(comfy.samplers.CFGGuider):
    """A CFGGuider with both prompt pairs: the source pair while the controller evaluates the source branch."""

    def __init__(self, model_patcher, ctl: Controller):
        super().__init__(model_patcher)
        self.ctl = ctl

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 -- core's signature
        pre = "source_" if self.ctl.branch == "source" else ""
        # a source evaluation only the cond chunk's records need runs at cfg 1: core's cfg-1 shortcut skips the
        # uncond (the prediction itself is not used then: no inline source_drift)
        cfg = 1.0 if (pre and self.ctl.cond_only) else self.cfg
        return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get(pre + "negative"),
                                                self.conds.get(pre + "positive"), cfg,
                                                model_options=model_options, seed=seed)


def run_controlled(model, edit: tuple, source: tuple, cfg: float, shape, sigmas, loop: Callable, steps: int,
                   label: str, ctl: Controller, layers) -> object:
    """Run ``loop(model_fn, device, progress, control=ctl)`` on a patched clone of ``model`` whose guider
    evaluates ``source`` = (positive, negative) while ``ctl`` runs the source branch and ``edit`` otherwise."""
    clone = model.clone()
    install(clone, ctl, layers)
    joint = [la for la in layers if la.kind == A.JOINT]
    if joint:     # the joint sequence is [text; image; reference latents]: the image's patches after the text
        ctl.image_tokens, ctl.self_first = image_tokens(model, shape), self_first(model)
        if ctl.control.method == "kv_edit":
            ctl.background = A.background_tokens(ctl.given_mask, *reversed(dit_patch(model)))
            if ctl.background.shape[1] != ctl.image_tokens:
                raise InversionInputError(f"kv_edit's mask gives {ctl.background.shape[1]} image tokens for the "
                                          f"latent's {ctl.image_tokens}; connect a mask of the image's size")
    guider = _BranchGuider(clone, ctl)
    guider.inner_set_conds({"positive": edit[0], "negative": edit[1],
                            "source_positive": source[0], "source_negative": source[1]})
    guider.set_cfg(float(cfg))

    def controlled(model_fn, device, progress):
        ctl.model_fn, ctl.branch = model_fn, "edit"
        try:
            return loop(model_fn, device, progress, control=ctl)
        finally:
            ctl.branch, ctl.model_fn = None, None
    return C.drive_guider(guider, model, shape, sigmas, C._LoopSampler(controlled, label), steps)
