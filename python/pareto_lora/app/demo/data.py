"""Synthetic interleaved text/image task for the demo, generated in code and seedable.

The vocabulary follows the discrete-image-token design of Emu3/Chameleon: one embedding table
holds special tokens, text words and the codes of an image tokenizer's codebook, and a single
causal LM predicts all of them. A sequence tells a two-scene story:

    <bos> T1 <boi> I1 <eoi> T2 <boi> I2 <eoi> <eos>

* T1 is a caption from a small template grammar: filler words fixed by the template, with slots
  for an object's colour and shape (both drawn uniformly).
* I1 is a 4x4 grid of image codes rendering that object: the shape picks which cells are
  foreground, the colour picks the foreground codes (one of a few shades per colour, drawn at
  random), background cells use shared background codes, and a fraction of cells is replaced by
  uniform noise codes (the irreducible entropy of real image tokens).
* T2 says how the object changes: a verb word shifts the colour by a verb-specific amount, and
  the new colour word follows (so text depends on text and, through I1, on the image).
* I2 renders the same shape in the new colour: image content depends on both text spans.

Every image code is therefore a function of words read earlier, and the text and image
objectives train the same LoRA parameters. A :class:`World` (templates, shape masks, palettes,
verb shifts) is drawn from ``world_seed``; the pre-training world and the fine-tuning world
share the vocabulary but not their templates, masks or palettes, so fine-tuning must move both
modalities. Sampling sequences from a world is seeded separately (``torch.Generator``).
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["Vocab", "World", "make_world", "sample_batch", "Batch"]


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Token id layout: specials, then text words, then image codes (one shared table)."""

    num_colors: int = 8
    num_shapes: int = 8
    num_verbs: int = 4
    num_fillers: int = 24
    shades_per_color: int = 8
    num_background_codes: int = 16
    grid: int = 4  # images are grid x grid codes

    PAD = 0
    BOS = 1
    EOS = 2
    BOI = 3
    EOI = 4
    num_specials = 5

    # text words: colours, shapes, verbs, fillers (contiguous ranges, in this order)
    @property
    def color_base(self) -> int:
        return self.num_specials

    @property
    def shape_base(self) -> int:
        return self.color_base + self.num_colors

    @property
    def verb_base(self) -> int:
        return self.shape_base + self.num_shapes

    @property
    def filler_base(self) -> int:
        return self.verb_base + self.num_verbs

    @property
    def image_base(self) -> int:
        return self.filler_base + self.num_fillers

    @property
    def num_image_codes(self) -> int:
        return self.num_colors * self.shades_per_color + self.num_background_codes

    @property
    def size(self) -> int:
        return self.image_base + self.num_image_codes

    @property
    def image_tokens(self) -> int:
        return self.grid * self.grid

    def is_image(self, ids: torch.Tensor) -> torch.Tensor:
        return ids >= self.image_base


@dataclasses.dataclass(frozen=True)
class World:
    """Everything that maps latent scene attributes to tokens (fixed for a task)."""

    vocab: Vocab
    caption_templates: tuple[tuple[int, ...], ...]  # word ids; -1 = colour slot, -2 = shape slot
    change_templates: tuple[tuple[int, ...], ...]  # -3 = verb slot, -1 = new-colour slot
    verb_shift: tuple[int, ...]  # colour shift of each verb
    shape_masks: torch.Tensor  # [num_shapes, grid*grid] bool
    palette: torch.Tensor  # [num_colors, shades] image-code offsets of each colour
    noise: float  # fraction of image cells replaced by a uniform code


_COLOR, _SHAPE, _VERB = -1, -2, -3


def _template(gen: torch.Generator, vocab: Vocab, length: int, slots: tuple[int, ...]) -> tuple[int, ...]:
    """A random filler-word sentence of `length` words with `slots` at random distinct places."""
    words = (vocab.filler_base + torch.randint(0, vocab.num_fillers, (length,), generator=gen)).tolist()
    places = torch.randperm(length, generator=gen)[: len(slots)].sort().values.tolist()
    for place, slot in zip(places, slots):
        words[place] = slot
    return tuple(words)


def make_world(world_seed: int, vocab: Vocab | None = None, noise: float = 0.15, num_templates: int = 8) -> World:
    """Draws a task world (templates, shape masks, palettes, verb shifts) from `world_seed`."""
    vocab = vocab or Vocab()
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"noise: expected a fraction in [0, 1), got {noise!r}")
    gen = torch.Generator().manual_seed(int(world_seed))
    captions = tuple(_template(gen, vocab, 7, (_COLOR, _SHAPE)) for _ in range(num_templates))
    changes = tuple(_template(gen, vocab, 5, (_VERB, _COLOR)) for _ in range(num_templates))
    shifts = tuple((1 + torch.randperm(vocab.num_colors - 1, generator=gen)[: vocab.num_verbs]).tolist())
    cells = vocab.grid * vocab.grid
    masks = torch.rand(vocab.num_shapes, cells, generator=gen) < 0.5
    codes = torch.randperm(vocab.num_colors * vocab.shades_per_color, generator=gen)
    palette = codes.view(vocab.num_colors, vocab.shades_per_color)
    return World(vocab, captions, changes, shifts, masks, palette, float(noise))


@dataclasses.dataclass
class Batch:
    """Model inputs plus the masks the losses and metrics need ([B, T] each)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    image_token_mask: torch.Tensor  # True where the token is an image code

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.input_ids, self.labels, self.image_token_mask)))

    def model_inputs(self) -> dict:
        return {"input_ids": self.input_ids}


def _fill(templates: tuple[tuple[int, ...], ...], pick: torch.Tensor, slots: dict[int, torch.Tensor]) -> torch.Tensor:
    """[B, L] word ids from per-row template choice `pick` and per-row slot values."""
    table = torch.tensor(templates, dtype=torch.int64)[pick]
    for slot, values in slots.items():
        table = torch.where(table == slot, values[:, None], table)
    return table


def _render(world: World, color: torch.Tensor, shape: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """[B, grid*grid] image codes of objects with the given colours and shapes."""
    v = world.vocab
    b, cells = color.numel(), v.image_tokens
    shade = torch.randint(0, v.shades_per_color, (b, cells), generator=gen)
    fg = world.palette[color[:, None].expand(b, cells), shade]
    bg = v.num_colors * v.shades_per_color + torch.randint(0, v.num_background_codes, (b, cells), generator=gen)
    codes = torch.where(world.shape_masks[shape], fg, bg)
    noisy = torch.rand(b, cells, generator=gen) < world.noise
    codes = torch.where(noisy, torch.randint(0, v.num_image_codes, (b, cells), generator=gen), codes)
    return v.image_base + codes


def sample_batch(world: World, batch_size: int, gen: torch.Generator) -> Batch:
    """`batch_size` independent sequences of the world's story format (all the same length)."""
    v = world.vocab
    b = batch_size
    color = torch.randint(0, v.num_colors, (b,), generator=gen)
    shape = torch.randint(0, v.num_shapes, (b,), generator=gen)
    verb = torch.randint(0, v.num_verbs, (b,), generator=gen)
    new_color = (color + torch.tensor(world.verb_shift)[verb]) % v.num_colors
    n_cap, n_chg = len(world.caption_templates), len(world.change_templates)
    t1 = _fill(world.caption_templates, torch.randint(0, n_cap, (b,), generator=gen),
               {_COLOR: v.color_base + color, _SHAPE: v.shape_base + shape})
    t2 = _fill(world.change_templates, torch.randint(0, n_chg, (b,), generator=gen),
               {_VERB: v.verb_base + verb, _COLOR: v.color_base + new_color})
    col = lambda tok: torch.full((b, 1), tok, dtype=torch.int64)  # noqa: E731
    ids = torch.cat([
        col(v.BOS), t1, col(v.BOI), _render(world, color, shape, gen), col(v.EOI),
        t2, col(v.BOI), _render(world, new_color, shape, gen), col(v.EOI), col(v.EOS),
    ], dim=1)
    labels = ids.clone()
    labels[:, 0] = -100  # <bos> is never predicted
    return Batch(ids, labels, v.is_image(ids))


def fixed_batches(world: World, num: int, batch_size: int, seed: int) -> list[Batch]:
    """A reproducible list of batches (held-out evaluation sets)."""
    gen = torch.Generator().manual_seed(int(seed))
    return [sample_batch(world, batch_size, gen) for _ in range(num)]
