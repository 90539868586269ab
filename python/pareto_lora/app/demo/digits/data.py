"""Sequences of the digits world: generation (caption -> image tokens) and understanding (image -> answer).

One vocabulary, as in Emu3/Chameleon: special tokens, ten digit words, filler words and the VQ
codes of tokens.py. Two kinds of sequence, the same length:

    generation:     <bos> caption <boi> image codes <eoi> <eos>
    understanding:  <bos> <boi> image codes <eoi> question answer <eos>

A caption is a template of filler words with one slot for the digit word ("a handwritten 7"); a
question is filler words only, and its answer (filler words and the digit slot) names the digit.
Image codes are a *real* digit's tokens, so the image is drawn by a person, not by a generator:
no exact entropy floor exists here. A :class:`DigitsWorld` is drawn from a seed (its templates)
and names the digits it shows: the pre-training world and the fine-tuning world share the
vocabulary but not their templates (and the pre-training world holds some digits out).
Batches are half generation, half understanding; sampling is seeded (``torch.Generator``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..data import Batch

__all__ = ["DigitsVocab", "DigitsWorld", "TokenSplit", "make_world", "sample_batch", "eval_batches",
           "caption_prompts", "answer_positions", "DIGIT_SLOT"]

DIGIT_SLOT = -1


@dataclasses.dataclass(frozen=True)
class DigitsVocab:
    """Token ids: specials, ten digit words, filler words, then the image codebook's codes."""

    num_codes: int = 32
    grid: int = 4  # image tokens per side
    num_fillers: int = 24
    caption_len: int = 5  # words, one of them the digit
    question_len: int = 3  # filler words
    answer_len: int = 2  # words, one of them the digit

    PAD = 0
    BOS = 1
    EOS = 2
    BOI = 3
    EOI = 4
    num_specials = 5
    digit_base = 5

    def __post_init__(self):
        if self.caption_len != self.question_len + self.answer_len:
            raise ValueError("caption_len: expected question_len + answer_len (both kinds of sequence the same length)")

    @property
    def filler_base(self) -> int:
        return self.digit_base + 10

    @property
    def image_base(self) -> int:
        return self.filler_base + self.num_fillers

    @property
    def size(self) -> int:
        return self.image_base + self.num_codes

    @property
    def image_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def seq_len(self) -> int:
        return 4 + self.caption_len + self.image_tokens


@dataclasses.dataclass(frozen=True)
class DigitsWorld:
    """Templates and digits of one task (the pre-training or the fine-tuning world)."""

    vocab: DigitsVocab
    captions: tuple[tuple[int, ...], ...]  # word ids; DIGIT_SLOT = the digit word
    questions: tuple[tuple[int, ...], ...]  # question words + answer words (DIGIT_SLOT in the answer)
    digits: tuple[int, ...]  # the digits this world shows


def _template(gen: torch.Generator, v: DigitsVocab, length: int, slot_from: int) -> tuple[int, ...]:
    words = (v.filler_base + torch.randint(0, v.num_fillers, (length,), generator=gen)).tolist()
    words[slot_from + int(torch.randint(0, length - slot_from, (1,), generator=gen))] = DIGIT_SLOT
    return tuple(words)


def make_world(seed: int, vocab: DigitsVocab, digits=tuple(range(10)), num_templates: int = 8) -> DigitsWorld:
    """Templates drawn from `seed` (distinct within a kind), showing `digits`."""
    digits = tuple(sorted(set(int(d) for d in digits)))
    if not digits or digits[0] < 0 or digits[-1] > 9:
        raise ValueError(f"digits: expected a non-empty subset of 0..9, got {digits!r}")
    gen = torch.Generator().manual_seed(int(seed))
    v = vocab

    def distinct(make):
        out: list[tuple[int, ...]] = []
        while len(out) < num_templates:
            t = make()
            if t not in out:
                out.append(t)
        return tuple(out)

    captions = distinct(lambda: _template(gen, v, v.caption_len, 0))
    questions = distinct(lambda: _template(gen, v, v.caption_len, v.question_len))
    return DigitsWorld(v, captions, questions, digits)


@dataclasses.dataclass(frozen=True)
class TokenSplit:
    """One data split in tokens: image codes [N, grid*grid] (codebook ids) and labels [N]."""

    codes: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def of(cls, codebook, split) -> "TokenSplit":
        return cls(torch.from_numpy(codebook.encode(split.images)), torch.from_numpy(np.asarray(split.labels)))

    def indices(self, digits) -> torch.Tensor:
        return torch.nonzero(torch.isin(self.labels, torch.tensor(digits))).flatten()


def _fill(templates, pick: torch.Tensor, digit: torch.Tensor, v: DigitsVocab) -> torch.Tensor:
    table = torch.tensor(templates, dtype=torch.int64)[pick]
    return torch.where(table == DIGIT_SLOT, v.digit_base + digit[:, None], table)


def _sequences(world: DigitsWorld, codes: torch.Tensor, digit: torch.Tensor, tpl: torch.Tensor, kind: str) -> torch.Tensor:
    v, b = world.vocab, len(digit)
    col = lambda tok: torch.full((b, 1), tok, dtype=torch.int64)  # noqa: E731
    image = v.image_base + codes
    if kind == "generation":
        return torch.cat([col(v.BOS), _fill(world.captions, tpl, digit, v), col(v.BOI), image, col(v.EOI), col(v.EOS)], 1)
    return torch.cat([col(v.BOS), col(v.BOI), image, col(v.EOI), _fill(world.questions, tpl, digit, v), col(v.EOS)], 1)


def _batch(ids: torch.Tensor, v: DigitsVocab) -> Batch:
    labels = ids.clone()
    labels[:, 0] = -100  # <bos> is never predicted
    return Batch(ids, labels, ids >= v.image_base)


def sample_batch(world: DigitsWorld, data: TokenSplit, batch_size: int, gen: torch.Generator) -> Batch:
    """`batch_size` sequences (first half generation, second half understanding) of random images
    of the world's digits from `data`, with random templates."""
    if batch_size < 2 or batch_size % 2:
        raise ValueError(f"batch_size: expected an even integer >= 2, got {batch_size!r}")
    pool = data.indices(world.digits)
    half = batch_size // 2
    parts = []
    for kind in ("generation", "understanding"):
        idx = pool[torch.randint(0, len(pool), (half,), generator=gen)]
        tpl = torch.randint(0, len(world.captions), (half,), generator=gen)
        parts.append(_sequences(world, data.codes[idx], data.labels[idx], tpl, kind))
    return _batch(torch.cat(parts), world.vocab)


def eval_batches(world: DigitsWorld, data: TokenSplit, seed: int, batch_size: int = 256) -> list[Batch]:
    """Every image of the world's digits in `data` once as generation and once as understanding
    (templates drawn with `seed`): the held-out (or validation) set, in batches of one kind each."""
    gen = torch.Generator().manual_seed(int(seed))
    idx = data.indices(world.digits)
    out = []
    for kind in ("generation", "understanding"):
        tpl = torch.randint(0, len(world.captions), (len(idx),), generator=gen)
        ids = _sequences(world, data.codes[idx], data.labels[idx], tpl, kind)
        out.extend(_batch(ids[i: i + batch_size], world.vocab) for i in range(0, len(ids), batch_size))
    return out


def caption_prompts(world: DigitsWorld) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompts [D*T, caption_len + 3] = <bos> caption <boi> for every digit and caption template,
    the digit each prompt asks for)."""
    v = world.vocab
    digits = torch.tensor(world.digits).repeat_interleave(len(world.captions))
    tpl = torch.arange(len(world.captions)).repeat(len(world.digits))
    b = len(digits)
    ids = torch.cat([torch.full((b, 1), v.BOS), _fill(world.captions, tpl, digits, v), torch.full((b, 1), v.BOI)], 1)
    return ids, digits


def answer_positions(batch: Batch, vocab: DigitsVocab) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) of the answer's digit word in each understanding sequence of `batch`
    (an understanding sequence starts <bos> <boi>; its only digit word is the answer's)."""
    ids = batch.input_ids
    und = ids[:, 1] == vocab.BOI
    is_digit = (ids >= vocab.digit_base) & (ids < vocab.filler_base) & und[:, None]
    rows, pos = torch.nonzero(is_digit, as_tuple=True)
    return rows, pos
