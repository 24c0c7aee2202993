"""Attention control for inversion-based editing: the policy and the maps (pure torch; no ComfyUI import).

The source branch (the stored inversion state, the source prompt) *records* what a method needs from a layer's
attention; the edit branch (the edit's state, the edit prompt) *injects* it, step by step, layer by layer. This
module decides what is recorded and injected where and computes what is injected; it never learns what a UNet is:
a layer is a :class:`Layer` (self/cross, a block name and id, an index inside the block and the layer's
downsampling factor), q/k/v arrive already projected in ComfyUI's layout [B, N, heads*dim_head].

Methods (windows are fractions of the sampling schedule's steps, as the papers' code: step n is active when
``int(start*N) <= n < int(end*N)``):

* ``p2p`` (Prompt-to-Prompt, Hertz et al.): in the cond chunk only, cross-attention maps of the source are
  mapped to the edit prompt's tokens (``replace``: an alignment matrix, same number of words; ``refine``: a global
  word alignment, new words keep the edit's own maps; ``reweight``: ``replace`` with the reweighted words' columns
  scaled) during ``cross_window``; self-attention maps of the source replace the edit's during ``self_window`` in
  layers whose queries are at most ``self_max_fraction`` of the latent's tokens (P2P: <= 32^2 at 64^2). A local
  blend keeps the edit only where the blend words' accumulated cross-attention (source words in the source, edit
  words in the edit, P2P's ``mask[:1] + mask``) exceeds ``blend_threshold`` after max-normalisation, or inside a
  given mask.
* ``pnp`` (Plug-and-Play, Tumanyan et al.): decoder self-attention layers (output blocks 4-11) of both chunks
  attend with the source's queries and keys: out = softmax(q_src k_src^T) v_edit; and during ``feature_window``
  (PnP's code: the first 80% of the steps) the ResBlock features of decoder block ``feature_block`` (SD1.5's
  output block 4 of 12, PnP's ``up_blocks[1].resnets[1]``) are the source's, in both chunks. Those are
  ``FEATURE`` layers ("output", i), one per decoder block, that only ``pnp_feature`` acts in.
* ``masactrl`` (MasaCtrl, Cao et al.): decoder self-attention (output blocks 6-11 on SD1.x/SD2, 1-5 on SDXL:
  :data:`MASACTRL_BLOCKS`) from step 4 of 50, both chunks: out = softmax(q_edit k_src^T) v_src.
* ``v_inject`` (RF-Edit / FireFlow value injection, for DiTs such as Flux): in the chosen single blocks (joint
  attention over text and image tokens) for the first steps, both chunks: the edit's queries and keys attend to
  values whose image tokens are the source's (its text tokens keep the edit's values, the prompts differ):
  out = softmax(q_edit k_edit^T) [v_edit_text; v_src_image]. The defaults are Fluxtapoz's single blocks 20-37 of
  Flux's 38, scaled to the model's count, and the first 10% of the steps (2 of 28; FireFlow's one step is a
  window of 0..1/N). SD3 has joint (double) blocks only: the default is DirectEdit's SD3.5 choice, every block
  but the last. Its layers are ``JOINT`` layers named as ComfyUI's dit replace keys
  (("single_block", i), ("double_block", i)); the UNet methods never act in them, and :func:`for_model` refuses
  a UNet method on a DiT and a DiT method on a UNet.
* ``kv_edit`` (KV-Edit, Zhu et al. 2025, with a mask; 1 = edit): in every joint block of the DiT (Flux/Chroma:
  the double blocks, where KV-Edit caches K/V too, and the single blocks; SD3: its joint blocks) at every step, both
  chunks, the edit's background image tokens (patches the mask does not touch) attend with the source's keys and
  values (the foreground and the text keep the edit's), and the latent's background is the source's after every
  step (the local blend by the mask), so the background stays the source's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from .errors import InversionInputError

METHODS = ("p2p", "pnp", "masactrl")     # the UNet methods
DIT_METHODS = ("v_inject", "kv_edit")    # the DiT methods (joint attention over [text; image] tokens)
ALL_METHODS = METHODS + DIT_METHODS
P2P_MODES = ("replace", "refine", "reweight")
SELF, CROSS, JOINT, FEATURE = "self", "cross", "joint", "feature"   # FEATURE: a decoder block's ResBlock
FLUX_SINGLE_BLOCKS = 38                  # Flux dev/schnell: the count RF-Edit's block numbers refer to
FAMILY = None                            # Control.blocks: the family's default, resolved by for_model
COND, UNCOND = 0, 1                      # ComfyUI's cond_or_uncond values
# what the source records for each action (the edit branch injects the action itself)
RECORDS = {"p2p_cross": "probs", "p2p_self": "probs", "pnp_qk": "qk", "masactrl_kv": "kv", "v_inject": "v",
           "kv_edit": "kv", "pnp_feature": "features"}


@dataclass(frozen=True)
class Window:
    """A span of sampling steps as fractions of the schedule (step n active when int(start*N) <= n < int(end*N))."""
    start: float = 0.0
    end: float = 0.0

    def active(self, step: int, steps: int) -> bool:
        return int(self.start * steps) <= step < int(self.end * steps)

    def check(self, what: str) -> "Window":
        if not (0.0 <= self.start <= 1.0 and 0.0 <= self.end <= 1.0) or self.end < self.start:
            raise InversionInputError(f"{what} must satisfy 0 <= start <= end <= 1 (got {self.start:g}..{self.end:g})"
                                      "; use fractions of the steps, e.g. 0..0.4")
        return self


@dataclass(frozen=True)
class Layer:
    """One attention layer of the model: ``kind`` self|cross, ``block`` (name, id) as ComfyUI's replace keys, the
    index inside the block, and ``factor``: the latent's side over the layer's side (1, 2, 4, ...)."""
    kind: str
    block: tuple
    index: int
    factor: int = 1

    @property
    def key(self) -> tuple:
        return (self.block[0], self.block[1], self.index)

    def name(self) -> str:
        return f"{self.kind} {self.block[0]}{self.block[1]}.{self.index}"


@dataclass(frozen=True)
class Control:
    """What the Attention Control node emits (ATTENTION_CONTROL)."""
    method: str = "p2p"
    mode: str = "replace"                       # p2p
    self_window: Window = Window(0.0, 0.6)
    cross_window: Window = Window(0.0, 0.4)     # p2p
    blocks: Optional[tuple] = ()                # (name, first id, last id) the method acts in; () = every block;
    #                                             FAMILY (None): the method's default for the model (for_model)
    self_max_fraction: float = 0.25             # p2p: self maps only where queries <= this share of the latent
    reweight: float = 2.0                       # p2p: the reweight words' cross-attention scale
    reweight_words: tuple = ()
    blend_words: tuple = ()                     # p2p local blend by words (empty: no word blend)
    blend_threshold: float = 0.3
    blend_window: Window = Window(0.2, 1.0)     # P2P's start_blend 0.2
    mask: Optional[torch.Tensor] = field(default=None, compare=False)   # a given blend mask (1 = edit)
    feature_window: Window = Window()           # pnp: the steps whose decoder ResBlock features are the source's
    feature_block: int = 4                      # pnp: that decoder block (output block id)

    @property
    def blends(self) -> bool:
        if self.method == "kv_edit":          # KV-Edit keeps the background: the latent blend by its mask
            return self.mask is not None
        return self.method == "p2p" and (bool(self.blend_words) or self.mask is not None)


def flux_single_blocks(count: int) -> tuple:
    """RF-Edit's single blocks 20-37 of Flux's 38 scaled to a model with ``count`` single blocks: ids
    round(20 * count / 38) .. count - 1 (the last ~47%, at least the last block)."""
    if count < 1:
        raise InversionInputError(f"the model has {count} single blocks; value injection needs a DiT with "
                                  "single blocks (Flux, Chroma)")
    lo = min(count - 1, int(math.floor(20 * count / FLUX_SINGLE_BLOCKS + 0.5)))
    return ("single_block", lo, count - 1)


def defaults(method: str, single_blocks: int = FLUX_SINGLE_BLOCKS) -> Control:
    """The papers' settings (editing.md: PnPInversion's run_editing_p2p, PnP's and MasaCtrl's code, Fluxtapoz's
    RF-Edit); ``single_blocks``: the DiT's count of single blocks, to scale v_inject's blocks."""
    if method == "p2p":
        return Control("p2p")
    if method == "pnp":
        return Control("pnp", self_window=Window(0.0, 0.5), cross_window=Window(), blocks=("output", 4, 11),
                       feature_window=Window(0.0, 0.8), feature_block=4)
    if method == "masactrl":
        return Control("masactrl", self_window=Window(4 / 50, 1.0), cross_window=Window(), blocks=("output", 6, 11))
    if method == "v_inject":
        return Control("v_inject", self_window=Window(0.0, 0.1), cross_window=Window(),
                       blocks=flux_single_blocks(single_blocks))
    if method == "kv_edit":     # KV-Edit: every block, every step, the latent's background kept at every step
        return Control("kv_edit", self_window=Window(0.0, 1.0), cross_window=Window(), blocks=(),
                       blend_window=Window(0.0, 1.0))
    raise InversionInputError(f"method {method!r} is unknown; use one of {', '.join(ALL_METHODS)}")


def parse_blocks(text: str, default: tuple) -> tuple:
    """'' -> ``default``; 'all' -> every block; 'output 6-11' / 'input 4' -> (name, first, last); DiTs:
    'single 20-37' / 'double 3' -> ("single_block"|"double_block", first, last)."""
    t = str(text or "").strip().lower()
    if not t:
        return default
    if t == "all":
        return ()
    parts = t.replace("-", " ").split()
    try:
        if parts[0] not in ("input", "middle", "output", "single", "double") or len(parts) not in (2, 3):
            raise ValueError
        ids = [int(x) for x in parts[1:]]
    except (ValueError, IndexError):
        raise InversionInputError(f"blocks {text!r} is not understood; write e.g. 'output 6-11', 'input 4-8', "
                                  "'middle 0', 'single 20-37' (DiTs) or 'all'") from None
    name = parts[0] + "_block" if parts[0] in ("single", "double") else parts[0]
    return (name, ids[0], ids[-1])


def dit_blocks(layers) -> tuple:
    """v_inject's default blocks for a DiT with these JOINT ``layers``: with single blocks (Flux, Chroma) RF-Edit's
    20-37 of 38 scaled (:func:`flux_single_blocks`); with double blocks only (SD3's joint blocks) DirectEdit's
    SD3.5 choice, every block but the last (block 0 when there is one)."""
    singles = [la for la in layers if la.kind == JOINT and la.block[0] == "single_block"]
    if singles:
        return flux_single_blocks(len(singles))
    doubles = [la for la in layers if la.kind == JOINT and la.block[0] == "double_block"]
    if not doubles:
        raise InversionInputError("the model has no joint attention blocks; value injection needs a DiT (Flux, "
                                  "Chroma, SD3)")
    return ("double_block", 0, max(0, len(doubles) - 2))


# MasaCtrl's decoder blocks by family (ComfyUI's comfy.supported_models class name), where they are not SD1.x's
# output 6-11. MasaCtrl's run_synthesis_sdxl.py counts SDXL's 70 transformer blocks in execution order (input 4 +
# 20, middle 10, output 0-2 10 each, output 3-5 2 each) and tries start layers 44, 54 and 64 from step 4, 44 first:
# blocks 44..69 are output 1 (its 10) through output 5, every transformer of ComfyUI's output blocks 1-5. SD1.x's
# start layer 10 of 16 is output 6-11 the same way. SDXL's derivatives with other depths (SSD-1B, Vega, KOALA) and
# the refiner keep the SD1.x blocks: name blocks for them.
MASACTRL_BLOCKS = {"SDXL": ("output", 1, 5)}


def masactrl_blocks(family: Optional[str]) -> tuple:
    """MasaCtrl's default decoder blocks for a model of ``family`` (:data:`MASACTRL_BLOCKS`, else SD1.x's)."""
    return MASACTRL_BLOCKS.get(family or "", defaults("masactrl").blocks)


def for_model(c: Control, layers, family: Optional[str] = None) -> Control:
    """``c`` resolved against the model's ``layers`` (and its ``family``, ComfyUI's supported_models class name):
    the method must fit the architecture (the UNet methods act in self/cross-attention layers, the DiT methods in
    JOINT layers; refused naming the fix otherwise), and blocks FAMILY become the method's default for this
    model."""
    joint = any(la.kind == JOINT for la in layers)
    if c.method in DIT_METHODS and not joint:
        raise InversionInputError(f"method {c.method} acts in a DiT's attention over the image tokens (Flux, "
                                  "Chroma, SD3, Wan) and this model is a UNet; use method p2p, pnp or masactrl")
    if c.method not in DIT_METHODS and joint:
        raise InversionInputError(f"method {c.method} acts in a UNet's self/cross-attention and this model is a "
                                  "DiT; use method v_inject (or kv_edit with a mask)")
    if c.method == "pnp" and c.feature_window.end > c.feature_window.start:
        outs = sorted(int(la.block[1]) for la in layers if la.kind == FEATURE)
        if c.feature_block not in outs:
            raise InversionInputError(
                f"Plug-and-Play injects the ResBlock features of decoder block {c.feature_block} and this model's "
                f"decoder has {len(outs)} blocks with features the patches reach; use an SD1.x/SD2/SDXL UNet "
                "(9-12 decoder blocks), or a feature_block of the model")
    if c.blocks is not FAMILY:
        return c
    if c.method == "v_inject":
        blocks = dit_blocks(layers)
    elif c.method == "masactrl":
        blocks = masactrl_blocks(family)
    else:
        blocks = defaults(c.method).blocks
    return replace(c, blocks=blocks)


def check(c: Control) -> Control:
    if c.method not in ALL_METHODS:
        raise InversionInputError(f"method {c.method!r} is unknown; use one of {', '.join(ALL_METHODS)}")
    if c.mode not in P2P_MODES:
        raise InversionInputError(f"p2p_mode {c.mode!r} is unknown; use one of {', '.join(P2P_MODES)}")
    c.self_window.check("the self-attention window")
    c.cross_window.check("the cross-attention window")
    c.blend_window.check("the blend window")
    c.feature_window.check("the feature window")
    if not 0.0 < c.blend_threshold < 1.0:
        raise InversionInputError(f"blend_threshold must be in (0, 1) (got {c.blend_threshold:g}); use e.g. 0.3")
    if not (math.isfinite(c.reweight) and c.reweight >= 0):
        raise InversionInputError(f"reweight must be a finite number >= 0 (got {c.reweight}); use e.g. 2.0")
    if c.method == "kv_edit" and c.mask is None:
        raise InversionInputError("method kv_edit needs a mask of the region to edit (1 = edit, 0 = background "
                                  "kept from the source); connect blend_mask")
    if c.mode == "reweight" and not c.reweight_words:
        raise InversionInputError("p2p_mode reweight needs reweight_words; name the words to strengthen")
    return c


# ---------------------------------------------------------------------------------------------- the policy
def in_blocks(c: Control, layer: Layer) -> bool:
    if c.blocks is FAMILY:
        raise InversionInputError("the blocks of attention control were not resolved for the model; call "
                                  "for_model(control, layers) first")
    if not c.blocks:
        return True
    name, lo, hi = c.blocks
    return layer.block[0] == name and lo <= int(layer.block[1]) <= hi


def action(c: Control, layer: Layer, step: int, steps: int, chunk: int) -> Optional[str]:
    """What the edit branch injects into ``layer`` at sampling step ``step`` of ``steps`` in a chunk of kind
    ``chunk`` (COND/UNCOND), or None."""
    if layer.kind == FEATURE:        # PnP's decoder features: its own block and window, both chunks
        hit = c.method == "pnp" and layer.block == ("output", c.feature_block)
        return "pnp_feature" if hit and c.feature_window.active(step, steps) else None
    if not in_blocks(c, layer):
        return None
    if c.method in DIT_METHODS:      # joint layers only, every chunk that runs
        return c.method if layer.kind == JOINT and c.self_window.active(step, steps) else None
    if layer.kind == JOINT:          # the UNet methods never act in a DiT's joint attention
        return None
    if c.method == "p2p":
        if chunk != COND:
            return None
        if layer.kind == CROSS:
            return "p2p_cross" if c.cross_window.active(step, steps) else None
        small = 1.0 / (layer.factor * layer.factor) <= c.self_max_fraction
        return "p2p_self" if small and c.self_window.active(step, steps) else None
    if layer.kind != SELF or not c.self_window.active(step, steps):
        return None
    return "pnp_qk" if c.method == "pnp" else "masactrl_kv"


def blend_layers(layers) -> list:
    """The cross layers the local blend reads: P2P's 16^2 maps at a 64^2 latent (factor 4), else the coarsest."""
    cross = [la for la in layers if la.kind == CROSS]
    if not cross:
        return []
    want = 4 if any(la.factor == 4 for la in cross) else max(la.factor for la in cross)
    return [la for la in cross if la.factor == want]


@dataclass(frozen=True)
class Schedule:
    """Per sampling step: {(layer, chunk): action} the edit injects (the source records the same keys)."""
    steps: int
    actions: dict                      # step -> {(Layer, chunk): action}
    blend: tuple = ()                  # the layers whose cond cross maps both branches record for the blend
    blend_steps: tuple = ()

    @property
    def injections(self) -> int:
        return sum(len(v) for v in self.actions.values())

    def report(self) -> str:
        """What is injected, layers x steps per action."""
        parts = []
        for act in sorted({a for v in self.actions.values() for a in v.values()}):
            keys = {(k, s) for s, v in self.actions.items() for k, a in v.items() if a == act}
            layers = {k[0] for k, _ in keys}
            steps = {s for _, s in keys}
            chunks = {k[1] for k, _ in keys}
            parts.append(f"{act}: {len(layers)} layers x {len(steps)} steps x {len(chunks)} chunk"
                         f"{'s' if len(chunks) > 1 else ''} = {len(keys)}")
        if self.blend_steps:
            parts.append(f"local blend: {len(self.blend)} layers, {len(self.blend_steps)} steps")
        return "; ".join(parts) if parts else "nothing injected"


def schedule(c: Control, layers, steps: int, run_steps, chunks) -> Schedule:
    """The injection schedule over the steps that run (``run_steps``: sampling step indices of the full
    ``steps``-step schedule) for the chunk kinds that run (``chunks``: COND, plus UNCOND when cfg != 1)."""
    acts = {}
    for s in run_steps:
        row = {}
        for la in layers:
            for ch in chunks:
                a = action(c, la, s, steps, ch)
                if a is not None:
                    row[(la, ch)] = a
        acts[s] = row
    blend, bsteps = (), ()
    if c.blends and c.mask is None:
        blend = tuple(blend_layers(layers))
        bsteps = tuple(s for s in run_steps if c.blend_window.active(s, steps))
    elif c.blends:
        bsteps = tuple(s for s in run_steps if c.blend_window.active(s, steps))
    return Schedule(steps, acts, blend, bsteps)


def source_chunks(sched: Schedule, step: int, chunks, inline_drift: bool = False, batched: bool = False) -> tuple:
    """The chunk kinds the source branch evaluates at sampling step ``step`` (of those that run, ``chunks``, in
    their order): the chunks the edit injects into (the source records them), plus COND where the local blend
    reads the source's cross maps; every chunk when source_drift takes its gap from the source branch's own
    guided prediction (``inline_drift``). ``()``: nothing needs the source at that step and it is not evaluated.
    P2P acts in the cond chunk only (its code controls ``attn[h // 2:]``), so its source branch runs the cond
    chunk alone, and after its windows not at all.

    ``batched`` (a BDIA replay): whenever the source runs it runs every chunk, batched as the edit's evaluation
    is, so that with the source prompt its records are the edit's own bit for bit. A cond chunk evaluated alone
    differs from the same chunk batched with the uncond in the last bits (float32 paths, ~1e-7), and BDIA's
    recurrence amplifies that (to 8% of the latent over 8 steps on the tiny UNet)."""
    if inline_drift:
        return tuple(chunks)
    need = {ch for (_, ch) in sched.actions.get(step, {})}
    if sched.blend and step in sched.blend_steps:
        need.add(COND)
    if batched and need:
        return tuple(chunks)
    return tuple(ch for ch in chunks if ch in need)


def source_cost(runs: dict, chunks) -> float:
    """The model evaluations per step of an edit whose source branch runs ``runs`` ({step: chunks}), counted as
    batch rows against a plain edit's (``len(chunks)`` rows per step): 1.0 is a plain edit, 2.0 a full source."""
    if not runs:
        return 1.0
    return 1.0 + sum(len(c) for c in runs.values()) / (len(runs) * max(1, len(tuple(chunks))))


# ---------------------------------------------------------------------------------------------- the maps
def heads_first(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, H*D] -> [B, H, N, D]."""
    b, n, hd = t.shape
    return t.reshape(b, n, heads, hd // heads).transpose(1, 2)


def heads_last(t: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] -> [B, N, H*D]."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) per head: [B, H, Nq, Nk], computed in float32."""
    qh, kh = heads_first(q.float(), heads), heads_first(k.float(), heads)
    scale = qh.shape[-1] ** -0.5
    return torch.softmax(torch.einsum("bhnd,bhmd->bhnm", qh, kh) * scale, dim=-1)


def apply_probs(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """p [B, H, Nq, Nk] applied to v [B, Nk, H*D] -> [B, Nq, H*D] in v's dtype."""
    vh = heads_first(v.float(), p.shape[1])
    return heads_last(torch.einsum("bhnm,bhmd->bhnd", p, vh)).to(v.dtype)


def attend(q, k, v, heads: int) -> torch.Tensor:
    return apply_probs(probs(q, k, heads), v)


def pnp(q_src, k_src, v_edit, heads: int) -> torch.Tensor:
    """Plug-and-Play: the source's queries and keys, the edit's values."""
    return attend(q_src, k_src, v_edit, heads)


def masactrl(q_edit, k_src, v_src, heads: int) -> torch.Tensor:
    """MasaCtrl's mutual self-attention: the edit's queries attend to the source's keys and values."""
    return attend(q_edit, k_src, v_src, heads)


def inject_values(v_edit: torch.Tensor, v_src: torch.Tensor, image_tokens: int, dim: int = -2,
                  start: Optional[int] = None) -> torch.Tensor:
    """RF-Edit's value injection: ``v_edit`` with its ``image_tokens`` image tokens (along ``dim``, from ``start``;
    by default the last ones: Flux's joint sequence is [text; image], heads-first [B, H, N, D] so dim -2, and with
    reference latents [text; image; reference]) taken from ``v_src``; a new tensor in v_edit's dtype, neither
    input changed. The text (and reference) tokens keep the edit's values (the prompts differ)."""
    n = v_edit.shape[dim]
    start = n - image_tokens if start is None else int(start)
    if v_src.shape != v_edit.shape or not (0 < image_tokens and 0 <= start and start + image_tokens <= n):
        raise InversionInputError(f"value injection got source values {tuple(v_src.shape)} for edit values "
                                  f"{tuple(v_edit.shape)} with {image_tokens} image tokens from {start}; the source "
                                  "and edit branches must run the same latent size (same image, same batch)")
    img = v_src.narrow(dim, start, image_tokens).to(v_edit.dtype)
    end = start + image_tokens
    return torch.cat([v_edit.narrow(dim, 0, start), img, v_edit.narrow(dim, end, n - end)], dim=dim)


def background_tokens(mask: torch.Tensor, patch: int, patch_t: int = 1) -> torch.Tensor:
    """KV-Edit's background image tokens from a latent-sized mask [B, C, H, W] (1 = edit), or [B, C, T, H, W] for a
    video latent: [B, tokens] bool, True where a patch x patch cell (``patch_t`` frames deep on video; row-major,
    frames outermost, as Flux, SD3 and Wan patchify; sides padded up to the patch) has no value above 0.5 (the
    foreground keeps every patch it touches)."""
    m = mask.float()
    if m.ndim == 3:
        m = m.unsqueeze(1)
    m = m[:, :1]
    h, w = m.shape[-2:]
    if m.ndim == 5:
        t = m.shape[-3]
        m = torch.nn.functional.pad(m, (0, (-w) % patch, 0, (-h) % patch, 0, (-t) % patch_t))
        fg = torch.nn.functional.max_pool3d(m, (patch_t, patch, patch), (patch_t, patch, patch)) > 0.5
        return ~fg.flatten(1)
    m = torch.nn.functional.pad(m, (0, (-w) % patch, 0, (-h) % patch))
    fg = torch.nn.functional.max_pool2d(m, patch, patch) > 0.5
    return ~fg.flatten(1)


def inject_background(t_edit: torch.Tensor, t_src: torch.Tensor, background: torch.Tensor,
                      dim: int, start: Optional[int] = None) -> torch.Tensor:
    """KV-Edit's background keys/values: ``t_edit`` with its image tokens (along ``dim``, the
    ``background.shape[1]`` from ``start``; by default the last ones) taken from ``t_src`` where ``background``
    [B or 1, tokens] is True; the text (and reference) tokens and the foreground keep the edit's. A new tensor in
    t_edit's dtype, neither input changed."""
    n, tokens = t_edit.shape[dim], background.shape[1]
    start = n - tokens if start is None else int(start)
    if (t_src.shape != t_edit.shape or not (0 < tokens and 0 <= start and start + tokens <= n)
            or background.shape[0] not in (1, t_edit.shape[0])):
        raise InversionInputError(f"kv_edit got source {tuple(t_src.shape)} for edit {tuple(t_edit.shape)} with a "
                                  f"mask of {tuple(background.shape)} image tokens from {start}; the source and edit "
                                  "branches must run the same latent size, and the mask one per image or one for all")
    dim = dim % t_edit.ndim
    shape = [background.shape[0]] + [1] * (dim - 1) + [tokens] + [1] * (t_edit.ndim - dim - 1)
    bg = background.to(t_edit.device).reshape(shape)
    src = t_src.narrow(dim, start, tokens).to(t_edit.dtype)
    img = torch.where(bg, src, t_edit.narrow(dim, start, tokens))
    end = start + tokens
    return torch.cat([t_edit.narrow(dim, 0, start), img, t_edit.narrow(dim, end, n - end)], dim=dim)
