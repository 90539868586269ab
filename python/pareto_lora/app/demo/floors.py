"""Exact entropy floors of a demo world and the image cell accuracy metric.

The floor of a modality is the loss of the Bayes-optimal predictor: the mean over that
modality's target tokens of H(x_t | x_<t), computed here by enumerating the generator of
data.py (no sampling). Excess loss = model loss - floor, so 0 means "learned the world" and the
raw loss of two modalities with very different noise levels becomes comparable.

Why the enumeration is this short: in a story every colour and shape word is a distinct token,
so after T1 the colour and shape are known exactly; the image cells are then independent draws
(foreground shade / background code / uniform noise) and T2 depends only on the colour. So

* text  = H(T1) + E_colour H(T2 | colour), over the words; every special token
  (<boi>, <eoi>, <eos>) sits at a fixed position and costs 0 nats;
* image = mean over shapes and cells of the per-cell entropy (the same for every colour).

Two templates that produce the same word sequence are handled by enumerating the distribution of
whole sequences rather than assuming one template per sequence.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import torch

from .data import Batch, World

__all__ = ["Floors", "entropy_floors", "image_cell_accuracy", "text_target_count"]


@dataclasses.dataclass(frozen=True)
class Floors:
    text: float  # nats per text target token
    image: float  # nats per image target token


def _entropy(counts: collections.Counter) -> float:
    total = sum(counts.values())
    return -sum(n / total * math.log(n / total) for n in counts.values())


def _sequences(templates, slot_values: dict[int, list[int]]) -> collections.Counter:
    """Distribution (counts) of the word sequences of uniformly chosen templates and slot values."""
    out: collections.Counter = collections.Counter()
    combos = [()]
    for values in slot_values.values():
        combos = [c + (v,) for c in combos for v in values]
    for tpl in templates:
        for combo in combos:
            fill = dict(zip(slot_values, combo))
            out[tuple(fill.get(w, w) for w in tpl)] += 1
    return out


def text_target_count(world: World) -> int:
    """Text targets per sequence: both sentences' words plus <boi>, <eoi>, <boi>, <eoi>, <eos>."""
    return len(world.caption_templates[0]) + len(world.change_templates[0]) + 5


def _cell_entropy(k: int, n_codes: int, noise: float) -> float:
    """Entropy of a cell drawn uniformly from `k` codes, replaced w.p. `noise` by one of `n_codes`."""
    p_in, p_out = (1 - noise) / k + noise / n_codes, noise / n_codes
    h = -k * p_in * math.log(p_in)
    return h - (n_codes - k) * p_out * math.log(p_out) if p_out > 0 else h


def entropy_floors(world: World) -> Floors:
    """Exact (text, image) Bayes-optimal cross-entropy per token of sequences from `world`."""
    v = world.vocab
    colors = list(range(v.num_colors))
    h_t1 = _entropy(_sequences(world.caption_templates,
                               {-1: [v.color_base + c for c in colors], -2: [v.shape_base + s for s in range(v.num_shapes)]}))
    h_t2 = 0.0
    for c in colors:
        # T2's colour word is the shifted colour, so the verb slot and the colour slot move together
        seqs: collections.Counter = collections.Counter()
        for tpl in world.change_templates:
            for verb, shift in enumerate(world.verb_shift):
                fill = {-3: v.verb_base + verb, -1: v.color_base + (c + shift) % v.num_colors}
                seqs[tuple(fill.get(w, w) for w in tpl)] += 1
        h_t2 += _entropy(seqs) / len(colors)
    text = (h_t1 + h_t2) / text_target_count(world)
    h_fg = _cell_entropy(v.shades_per_color, v.num_image_codes, world.noise)
    h_bg = _cell_entropy(v.num_background_codes, v.num_image_codes, world.noise)
    fg_frac = float(world.shape_masks.float().mean())  # shapes are uniform, so the mean over masks
    return Floors(text=text, image=fg_frac * h_fg + (1 - fg_frac) * h_bg)


def _cell_class(world: World, codes: torch.Tensor) -> torch.Tensor:
    """Class of image-code indices: the colour whose palette holds it, or num_colors = background."""
    v = world.vocab
    owner = torch.full((v.num_image_codes,), v.num_colors, dtype=torch.int64)
    for c in range(v.num_colors):
        owner[world.palette[c]] = c
    return owner[codes.clamp(0, v.num_image_codes - 1)]


def image_cell_accuracy(world: World, batch: Batch, logits: torch.Tensor) -> tuple[int, int]:
    """(right, total) image cells whose most likely code has the right shape and colour.

    "Right" = the argmax code belongs to the cell's true class: the object's colour palette on a
    foreground cell of the shape's mask, a background code elsewhere. The true class comes from
    the colour/shape words of the sequence, so noise cells are judged by what they should show.
    The Bayes-optimal predictor scores 1.0; predicting each cell's code frequency scores ~0.
    """
    v = world.vocab
    ids = batch.input_ids.cpu()
    pred = logits[:, :-1].argmax(-1).cpu()  # position t predicts token t+1
    right = total = 0
    for row, prow in zip(ids, pred):
        words = row.tolist()
        color = next(t - v.color_base for t in words if v.color_base <= t < v.shape_base)
        shape = next(t - v.shape_base for t in words if v.shape_base <= t < v.verb_base)
        boi = [i for i, t in enumerate(words) if t == v.BOI]
        t2 = words[boi[0] + v.image_tokens + 2: boi[1]]
        new_color = next(t - v.color_base for t in t2 if v.color_base <= t < v.shape_base)
        for start, col in zip(boi, (color, new_color)):
            want = torch.where(world.shape_masks[shape], col, v.num_colors)
            p = prow[start: start + v.image_tokens]  # predictions of the cells start+1 ..
            is_img = p >= v.image_base
            got = torch.where(is_img, _cell_class(world, p - v.image_base), -1)
            right += int((got == want).sum())
            total += v.image_tokens
    return right, total
