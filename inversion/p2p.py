"""Prompt-to-Prompt's token alignment, cross-attention maps and local blend (pure torch; no ComfyUI import).

A prompt is a :class:`Prompt`: its words and each word's token span [a, b) in the encoder's token slots (the
Attention Prompts node reads them from ComfyUI's own tokenizer). :func:`align` builds both of P2P's mappings:

* ``replace`` (P2P's ``get_replacement_mapper``): prompts with the same number of words; a matrix M [Ks, Ke]
  with ``edit_map = einsum('bhpw,wn->bhpn', source_map, M)``: equal words map token to token, a swapped word's
  source tokens are spread evenly over the new word's tokens, the tail (end and padding tokens) maps in order;
* ``refine`` (P2P's ``get_refinement_mapper``): a global (Needleman-Wunsch) alignment of the words; for every
  edit token the source token it comes from (``index``) and ``alpha`` 1 where it has one, 0 for a new word, with
  ``edit_map = source_map[..., index] * alpha + edit_map * (1 - alpha)``.

Reweighting multiplies the chosen edit words' columns (``equalizer``). The local blend (P2P's ``LocalBlend``)
sums the blend words' columns, averages heads and layers, max-pools 3x3, resizes to the latent, normalises by
the maximum and thresholds; the source's and the edit's masks are united.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .errors import InversionInputError

PROMPT_KEY = "ddiminv_prompt"     # the CONDITIONING option the Attention Prompts node writes (a Prompt as a dict)


@dataclass(frozen=True)
class Prompt:
    words: tuple            # the words, as split by whitespace
    spans: tuple            # per word, its token slots (a, b)
    length: int             # token slots of the encoding (e.g. 77)

    def check(self, what: str) -> "Prompt":
        prev = 0
        for w, (a, b) in zip(self.words, self.spans, strict=True):
            if not (prev <= a < b <= self.length):
                raise InversionInputError(f"{what}: the word {w!r} has token slots {a}..{b} out of order or outside "
                                          f"0..{self.length}; rebuild the prompts with the Attention Prompts node")
            prev = b
        return self

    def positions(self, word: str) -> list:
        return [t for w, (a, b) in zip(self.words, self.spans, strict=True) if w.lower() == word.lower()
                for t in range(a, b)]


def _tail_start(p: Prompt) -> int:
    return p.spans[-1][1] if p.spans else 1


def replace_mapper(src: Prompt, edit: Prompt) -> torch.Tensor:
    """P2P's replacement matrix [Ks, Ke]; prompts must have the same number of words."""
    if len(src.words) != len(edit.words):
        raise InversionInputError(
            f"p2p replace needs prompts with the same number of words (source {len(src.words)}: "
            f"{' '.join(src.words)!r}, edit {len(edit.words)}: {' '.join(edit.words)!r}); swap word for word, or "
            "use p2p_mode refine")
    m = torch.zeros(src.length, edit.length, dtype=torch.float32)
    for i in range(min(src.spans[0][0], edit.spans[0][0]) if src.spans else 1):
        m[i, i] = 1.0                                   # the start token(s)
    for (a, b), (c, d) in zip(src.spans, edit.spans, strict=True):
        if b - a == d - c:
            m[torch.arange(a, b), torch.arange(c, d)] = 1.0
        else:
            m[a:b, c:d] = 1.0 / (d - c)
    i, j = _tail_start(src), _tail_start(edit)
    while j < edit.length:
        m[min(i, src.length - 1), j] = 1.0
        i, j = i + 1, j + 1
    return m


def _word_alignment(a: tuple, b: tuple) -> list:
    """Needleman-Wunsch on words (match 1, mismatch -1, gap -1): pairs (i, j) of equal aligned words."""
    n, m = len(a), len(b)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        score[i][0] = -i
    for j in range(m + 1):
        score[0][j] = -j
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            diag = score[i - 1][j - 1] + (1 if a[i - 1].lower() == b[j - 1].lower() else -1)
            score[i][j] = max(diag, score[i - 1][j] - 1, score[i][j - 1] - 1)
    pairs, i, j = [], n, m
    while i > 0 and j > 0:
        same = a[i - 1].lower() == b[j - 1].lower()
        if score[i][j] == score[i - 1][j - 1] + (1 if same else -1):
            if same:
                pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif score[i][j] == score[i - 1][j] - 1:
            i -= 1
        else:
            j -= 1
    return pairs[::-1]


def refine_mapper(src: Prompt, edit: Prompt) -> tuple:
    """(index [Ke] long, alpha [Ke] float): the source token each edit token takes its map from, 1/0."""
    index = torch.zeros(edit.length, dtype=torch.long)
    alpha = torch.zeros(edit.length, dtype=torch.float32)
    for t in range(min(src.spans[0][0], edit.spans[0][0]) if src.spans else 1):
        index[t], alpha[t] = t, 1.0
    for i, j in _word_alignment(src.words, edit.words):
        (a, b), (c, d) = src.spans[i], edit.spans[j]
        for k in range(d - c):
            index[c + k], alpha[c + k] = a + min(k, b - a - 1), 1.0
    i, j = _tail_start(src), _tail_start(edit)
    while j < edit.length:
        index[j], alpha[j] = min(i, src.length - 1), 1.0
        i, j = i + 1, j + 1
    return index, alpha


def word_columns(p: Prompt, words, what: str, required: bool = True) -> list:
    cols = []
    for w in words:
        pos = p.positions(w)
        if not pos and required:
            raise InversionInputError(f"{what}: the word {w!r} is not in the prompt {' '.join(p.words)!r}; name "
                                      "words of that prompt")
        cols += pos
    return cols


def equalizer(edit: Prompt, words, scale: float) -> torch.Tensor:
    """[Ke]: ``scale`` at the words' tokens in the edit prompt, 1 elsewhere (P2P's get_equalizer)."""
    eq = torch.ones(edit.length, dtype=torch.float32)
    eq[word_columns(edit, words, "reweight_words")] = float(scale)
    return eq


@dataclass(frozen=True)
class Alignment:
    """Everything P2P's cross-attention edit needs for one (source, edit) prompt pair."""
    mode: str
    mapper: Optional[torch.Tensor]          # replace/reweight: [Ks, Ke]
    index: Optional[torch.Tensor]           # refine: [Ke]
    alpha: Optional[torch.Tensor]           # refine: [Ke]
    equalizer: Optional[torch.Tensor]       # [Ke] or None
    src_len: int
    edit_len: int


def align(src: Prompt, edit: Prompt, mode: str, reweight_words=(), reweight: float = 1.0) -> Alignment:
    src, edit = src.check("the source prompt"), edit.check("the edit prompt")
    eq = equalizer(edit, reweight_words, reweight) if reweight_words else None
    if mode == "refine":
        index, alpha = refine_mapper(src, edit)
        return Alignment(mode, None, index, alpha, eq, src.length, edit.length)
    return Alignment(mode, replace_mapper(src, edit), None, None, eq, src.length, edit.length)


def _tiled(al: Alignment, ks: int, ke: int) -> Alignment:
    """The alignment for keys repeated r times (ComfyUI repeats contexts of different lengths to a common one)."""
    if (ks, ke) == (al.src_len, al.edit_len):
        return al
    if ks % al.src_len or ke % al.edit_len or ks // al.src_len != ke // al.edit_len:
        raise InversionInputError(f"the cross-attention has {ks} source and {ke} edit keys but the prompts have "
                                  f"{al.src_len} and {al.edit_len} tokens; connect the Attention Prompts node's "
                                  "conditionings to the sampler unchanged")
    r = ks // al.src_len
    mapper = None if al.mapper is None else torch.block_diag(*[al.mapper] * r)
    index = None if al.index is None else torch.cat([al.index + k * al.src_len for k in range(r)])
    alpha = None if al.alpha is None else al.alpha.repeat(r)
    eq = None if al.equalizer is None else al.equalizer.repeat(r)
    return Alignment(al.mode, mapper, index, alpha, eq, ks, ke)


def cross_map(src_p: torch.Tensor, edit_p: torch.Tensor, al: Alignment) -> torch.Tensor:
    """The cross-attention map the edit uses: [B, H, Nq, Ke] from the source's [B, H, Nq, Ks] and its own."""
    al = _tiled(al, src_p.shape[-1], edit_p.shape[-1])
    if al.mode == "refine":
        a = al.alpha.to(edit_p)
        out = src_p[..., al.index.to(src_p.device)] * a + edit_p * (1 - a)
    else:
        out = torch.einsum("bhpw,wn->bhpn", src_p, al.mapper.to(src_p))
    if al.equalizer is not None:
        out = out * al.equalizer.to(out)
    return out


# ---------------------------------------------------------------------------------------------- local blend
def word_map(p: torch.Tensor, cols: list, hw: tuple) -> torch.Tensor:
    """[B, 1, h, w]: the columns' attention summed over the words' tokens, averaged over heads."""
    b, _, n, _ = p.shape
    m = p[..., cols].sum(-1).mean(1) if cols else p.new_zeros(b, n)
    return m.reshape(b, 1, hw[0], hw[1])


def blend_mask(src_map: torch.Tensor, edit_map: torch.Tensor, size: tuple, threshold: float) -> torch.Tensor:
    """P2P's LocalBlend mask [B, 1, H, W] (1 = keep the edit) from accumulated word maps [B, 1, h, w]."""
    def one(m):
        m = F.max_pool2d(m, (3, 3), (1, 1), padding=(1, 1))
        m = F.interpolate(m, size=tuple(size))
        peak = m.amax(dim=(2, 3), keepdim=True)
        return (m / torch.where(peak > 0, peak, torch.ones_like(peak))).gt(threshold)
    return (one(src_map) | one(edit_map)).to(torch.float32)


def local_blend(x_src: torch.Tensor, x_edit: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x_src + mask.to(x_edit) * (x_edit - x_src)


# ---------------------------------------------------------------------------------------------- on a CONDITIONING
def prompt_info(p: Prompt) -> dict:
    """A Prompt as the plain dict stored in a CONDITIONING entry's options (hashable by the fingerprint)."""
    return {"words": list(p.words), "spans": [list(s) for s in p.spans], "length": int(p.length)}


def prompt_of(cond, what: str) -> Prompt:
    """The Prompt the Attention Prompts node attached to ``cond`` (every entry carries the same one)."""
    info = None
    if isinstance(cond, list) and cond and isinstance(cond[0], (list, tuple)) and len(cond[0]) > 1:
        info = cond[0][1].get(PROMPT_KEY) if isinstance(cond[0][1], dict) else None
    if info is None:
        raise InversionInputError(f"{what} carries no word alignment (p2p needs to know which tokens are which "
                                  "words); connect the Attention Prompts node's conditionings to positive and "
                                  "source_positive")
    return Prompt(tuple(info["words"]), tuple(tuple(s) for s in info["spans"]), int(info["length"]))


def word_spans(tokens: list, word_tokens: list, what: str) -> tuple:
    """Each word's token slots in ``tokens`` (one encoder window), given each word's own tokens: the tokenizer
    splits words independently, so the words' tokens appear in order."""
    spans, pos = [], 0
    for w, toks in word_tokens:
        n = len(toks)
        while pos + n <= len(tokens) and list(tokens[pos:pos + n]) != list(toks):
            pos += 1
        if n == 0 or pos + n > len(tokens):
            raise InversionInputError(f"{what}: the word {w!r} is not found in the prompt's tokens (weights like "
                                      "(word:1.2), embeddings or a prompt longer than one 77-token window); write "
                                      "the prompt as plain words")
        spans.append((pos, pos + n))
        pos += n
    return tuple(spans)
