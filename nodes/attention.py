"""Attention Control and Attention Prompts: the inputs of an attention-controlled edit in the Inverted-Latent
Sampler (the policy lives in inversion/attention.py and inversion/p2p.py; the patches in _comfy_attention.py)."""
from __future__ import annotations

from comfy_api.latest import io

from ..inversion import attention as A
from ..inversion import p2p as P
from ..inversion.errors import InversionInputError, node_boundary
from .types import ATTENTION_CONTROL, CATEGORY

CONTROL = "Attention Control"
PROMPTS = "Attention Prompts"


def _words(text: str) -> tuple:
    return tuple(w.strip() for w in str(text).split(",") if w.strip())


def _window(start: float, end: float, default: A.Window) -> A.Window:
    return A.Window(default.start if start < 0 else float(start), default.end if end < 0 else float(end))


class DDIMInvAttentionControl(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DDIMInvAttentionControl",
            display_name=CONTROL,
            category=CATEGORY,
            description=(
                "Attention control for the Inverted-Latent Sampler: at every step the sampler evaluates the source "
                "branch (the stored inversion state with source_positive) and records its attention, then the edit "
                "injects it. p2p = Prompt-to-Prompt (cross-attention maps of the source mapped to the edit's words, "
                "self-attention maps early, optional local blend); pnp = Plug-and-Play (decoder self-attention "
                "queries/keys of the source, and the source's ResBlock features of decoder block feature_block (4) "
                "for the first feature_end (80%) of the steps, as PnP's code); masactrl = the edit's decoder queries "
                "attend to the source's keys and values (these three: SD1.x/SD2/SDXL UNets); v_inject = value "
                "injection (RF-Edit, FireFlow) for the "
                "Flux, Chroma, SD3, Qwen-Image and Wan 2.1/2.2 DiTs: in the chosen blocks' joint attention (Wan: "
                "the blocks' self-attention over the video), for the first steps, the edit's image tokens take the "
                "source's values; kv_edit = KV-Edit's background mode for the same DiTs "
                "(blend_mask = the region to edit): the background image tokens' keys and values come from the source"
                " at every step and the latent's background stays the source's. -1 in a window field takes the "
                "method's default from its paper's code; a method of the other architecture than the model's is "
                "refused."),
            inputs=[
                io.Combo.Input("method", options=list(A.ALL_METHODS), default="p2p",
                               tooltip="UNets: p2p (needs the Attention Prompts node's conditionings), pnp or "
                                       "masactrl. DiTs (Flux, Chroma, SD3, Qwen-Image, Wan 2.1/2.2): "
                                       "v_inject, or kv_edit (needs blend_mask)."),
                io.Combo.Input("p2p_mode", options=list(A.P2P_MODES), default="replace",
                               tooltip="p2p only. replace: prompts with the same number of words (word swap); "
                                       "refine: words added or removed (global alignment); reweight: replace "
                                       "with reweight_words' attention scaled by reweight."),
                io.Float.Input("self_start", default=-1.0, min=-1.0, max=1.0, step=0.01,
                               tooltip="First step (fraction of the steps) of self-attention control (v_inject: of "
                                       "the value injection); -1: the method's default (p2p 0, pnp 0, masactrl "
                                       "0.08 = step 4 of 50, v_inject 0, kv_edit 0)."),
                io.Float.Input("self_end", default=-1.0, min=-1.0, max=1.0, step=0.01,
                               tooltip="End (fraction, exclusive) of self-attention control (v_inject: of the "
                                       "value injection, kv_edit: of the background keys/values); -1: default (p2p "
                                       "0.6, pnp 0.5, masactrl 1.0, v_inject 0.1 = the first 10% of the steps, "
                                       "RF-Edit's 2 of 28 (FireFlow's one step is 1/steps), kv_edit 1.0)."),
                io.Float.Input("cross_end", default=-1.0, min=-1.0, max=1.0, step=0.01,
                               tooltip="p2p: end (fraction) of cross-attention replacement; -1: 0.4. 0 turns it off."),
                io.String.Input("blocks", default="", optional=True,
                                tooltip="The blocks the method acts in: UNets e.g. 'output 6-11' (ComfyUI's block "
                                        "ids), DiTs e.g. 'single 20-37' or 'double 0-22', or 'all'. Empty: the "
                                        "method's default (p2p all, pnp output 4-11, masactrl output 6-11 on "
                                        "SD1.x/SD2 and output 1-5 on SDXL, MasaCtrl's layers 10 of 16 and 44 of "
                                        "70; v_inject: Flux/Chroma's single blocks "
                                        "20-37 of 38 scaled to the model's count, the blocks but the last on "
                                        "SD3, Qwen-Image and Wan (one kind of block); kv_edit: every block)."),
                io.String.Input("reweight_words", default="", optional=True,
                                tooltip="p2p: comma-separated words of the edit prompt whose attention is scaled "
                                        "by reweight (e.g. 'fluffy')."),
                io.Float.Input("reweight", default=2.0, min=0.0, max=10.0, step=0.1, optional=True,
                               tooltip="p2p: the scale of reweight_words' cross-attention (P2P's equalizer)."),
                io.String.Input("blend_words", default="", optional=True,
                                tooltip="p2p local blend: comma-separated words (of either prompt, e.g. 'cat, dog'); "
                                        "the edit is kept only where their cross-attention is strong, the rest "
                                        "follows the source. Empty: no word blend."),
                io.Float.Input("blend_threshold", default=0.3, min=0.01, max=0.99, step=0.01, optional=True,
                               tooltip="p2p local blend: the share of the words' peak attention that counts as "
                                       "'the object' (P2P: 0.3)."),
                io.Mask.Input("blend_mask", optional=True,
                              tooltip="p2p local blend by a MASK instead of words (1 = edit, 0 = keep the source); "
                                      "kv_edit: the region to edit (required; outside it the source's background "
                                      "keys, values and latent are kept)."),
                io.Int.Input("feature_block", default=-1, min=-1, max=63, optional=True,
                             tooltip="pnp: the decoder block (ComfyUI's output block id) whose ResBlock features "
                                     "are the source's; -1: 4 (PnP's up_blocks[1].resnets[1] on SD1.x). Other "
                                     "methods: leave -1."),
                io.Float.Input("feature_end", default=-1.0, min=-1.0, max=1.0, step=0.01, optional=True,
                               tooltip="pnp: end (fraction, exclusive) of the feature injection, from the first "
                                       "step; -1: 0.8 (PnP's 80% of the steps); 0 turns it off. Other methods: "
                                       "leave -1."),
            ],
            outputs=[ATTENTION_CONTROL.Output("attention_control", display_name="attention_control",
                                              tooltip="Connect to the Inverted-Latent Sampler's attention_control.")],
        )

    @classmethod
    def execute(cls, method, p2p_mode, self_start, self_end, cross_end, blocks="", reweight_words="",
                reweight=2.0, blend_words="", blend_threshold=0.3, blend_mask=None, feature_block=-1,
                feature_end=-1.0) -> io.NodeOutput:
        with node_boundary(CONTROL):
            d = A.defaults(method)
            dit = method in A.DIT_METHODS
            c = A.Control(
                method=method, mode=p2p_mode, self_window=_window(self_start, self_end, d.self_window),
                cross_window=_window(-1, cross_end, d.cross_window),
                # DiTs and masactrl (SDXL's blocks differ): resolved by the model
                blocks=A.parse_blocks(blocks, A.FAMILY if dit or method == "masactrl" else d.blocks),
                reweight=float(reweight), reweight_words=_words(reweight_words) if method == "p2p" else (),
                blend_words=_words(blend_words) if method == "p2p" else (),
                blend_threshold=float(blend_threshold), blend_window=d.blend_window,
                feature_window=_window(-1, feature_end, d.feature_window),
                feature_block=d.feature_block if int(feature_block) < 0 else int(feature_block),
                mask=None if blend_mask is None else blend_mask.detach().clone().float())
            masked = method in ("p2p", "kv_edit")
            if (method != "p2p" and _words(blend_words)) or (not masked and blend_mask is not None):
                raise InversionInputError(f"the local blend is p2p's (and kv_edit's mask); {method} has none: "
                                          "clear blend_words and blend_mask, or use method p2p")
            if method != "pnp" and (int(feature_block) >= 0 or float(feature_end) >= 0):
                raise InversionInputError(f"feature_block and feature_end are pnp's (its decoder features); {method} "
                                          "has none: set both to -1, or use method pnp")
            return io.NodeOutput(A.check(c))


def _tokens(clip, text: str) -> tuple:
    """(key, the first encoder window's tokens) of ComfyUI's tokenizer; refuses prompts of several windows."""
    toks = clip.tokenize(text, return_word_ids=True)
    key = "l" if "l" in toks else sorted(toks)[0]
    windows = toks[key]
    if len(windows) != 1:
        raise InversionInputError(f"the prompt {text[:40]!r} spans {len(windows)} token windows; p2p aligns one "
                                  "77-token window: shorten the prompt")
    return key, [int(t[0]) if not hasattr(t[0], "shape") else -1 for t in windows[0]]


def prompt_of_text(clip, text: str, what: str) -> P.Prompt:
    """Each word's token slots from ComfyUI's own tokenizer (``clip.tokenize(..., return_word_ids=True)``)."""
    key, tokens = _tokens(clip, text)
    words = [w for w in str(text).split() if w]
    if not words:
        raise InversionInputError(f"{what} is empty; write the prompt")
    per_word = []
    for w in words:
        wt = clip.tokenize(w, return_word_ids=True)[key][0]
        per_word.append((w, [int(t[0]) for t in wt if t[2] != 0]))
    return P.Prompt(tuple(words), P.word_spans(tokens, per_word, what), len(tokens)).check(what)


class DDIMInvAttentionPrompts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DDIMInvAttentionPrompts",
            display_name=PROMPTS,
            category=CATEGORY,
            description=(
                "Encodes the source and the edit prompt with ComfyUI's own tokenizer and attaches which tokens are "
                "which words, so Prompt-to-Prompt can map the source's cross-attention onto the edit's words. "
                "Connect source to DDIM Invert's positive and the sampler's source_positive, edit to the sampler's "
                "positive. Plain words only (no (word:1.2) weights or embeddings), one 77-token window."),
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder of the model (the one the inversion used)."),
                io.String.Input("source_text", multiline=True, default="a photo of a cat",
                                tooltip="The prompt describing the source image."),
                io.String.Input("edit_text", multiline=True, default="a photo of a dog",
                                tooltip="The edited prompt: swap words (p2p replace) or add/remove some (refine)."),
            ],
            outputs=[io.Conditioning.Output("source", display_name="source",
                                            tooltip="The source prompt's conditioning, with its word alignment."),
                     io.Conditioning.Output("edit", display_name="edit",
                                            tooltip="The edit prompt's conditioning, with its word alignment.")],
        )

    @classmethod
    def execute(cls, clip, source_text, edit_text) -> io.NodeOutput:
        with node_boundary(PROMPTS):
            if clip is None:
                raise InversionInputError("no CLIP is connected; connect the checkpoint's CLIP")
            out = []
            for text, what in ((source_text, "source_text"), (edit_text, "edit_text")):
                p = prompt_of_text(clip, text, what)
                cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))
                out.append([[t, {**opts, P.PROMPT_KEY: P.prompt_info(p)}] for t, opts in cond])
            src, edit = (P.prompt_of(c, w) for c, w in zip(out, ("source", "edit"), strict=True))
            P.align(src, edit, "refine")        # every pair aligns by refine; replace is checked by the sampler
            return io.NodeOutput(out[0], out[1])


NODES = [DDIMInvAttentionControl, DDIMInvAttentionPrompts]
