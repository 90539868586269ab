"""Exact entropy floors (enumeration) against a Monte-Carlo plug-in estimate on a tiny world."""

import collections
import math

import pytest
import torch

from pareto_lora.app.demo import data, floors


def _plugin_floors(world, n, seed=0):
    """Plug-in estimate of mean H(x_t | x_<t) per modality: counts of (prefix, next token)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.cat([data.sample_batch(world, 4096, gen).input_ids for _ in range(n // 4096)]).tolist()
    v = world.vocab
    h = {True: 0.0, False: 0.0}
    cnt = {True: 0, False: 0}
    for t in range(1, len(ids[0])):
        table = collections.defaultdict(collections.Counter)
        for row in ids:
            table[tuple(row[:t])][row[t]] += 1
        is_img = ids[0][t] >= v.image_base  # the layout is fixed, so the modality of position t is too
        ent = 0.0
        for nxt in table.values():
            tot = sum(nxt.values())
            ent -= sum(c * math.log(c / tot) for c in nxt.values())
        h[is_img] += ent / len(ids)
        cnt[is_img] += 1
    return h[False] / cnt[False], h[True] / cnt[True]


def test_floors_match_monte_carlo_on_a_tiny_world():
    v = data.Vocab(num_colors=3, num_shapes=2, num_verbs=2, num_fillers=3, shades_per_color=2,
                   num_background_codes=2, grid=1)
    world = data.make_world(3, v, noise=0.3, num_templates=2)
    exact = floors.entropy_floors(world)
    text, image = _plugin_floors(world, 4096 * 40)
    assert exact.text == pytest.approx(text, abs=0.01)
    assert exact.image == pytest.approx(image, abs=0.01)


def test_default_world_floors_are_the_reviewers_numbers():
    f = floors.entropy_floors(data.make_world(2))
    assert 0.5 < f.text < 0.65 and 2.9 < f.image < 3.15  # ~0.57 and ~3.03 nats per token (issue 13)
    assert f.image < math.log(data.Vocab().num_image_codes)


def test_noise_free_image_floor_is_the_shade_and_background_entropy():
    v = data.Vocab()
    world = data.make_world(4, v, noise=0.0)
    frac = float(world.shape_masks.float().mean())
    want = frac * math.log(v.shades_per_color) + (1 - frac) * math.log(v.num_background_codes)
    assert floors.entropy_floors(world).image == pytest.approx(want)


def test_cell_accuracy_is_one_for_an_oracle_and_low_for_a_wrong_guess():
    v = data.Vocab()
    world = data.make_world(2, v, noise=0.0)
    batch = data.sample_batch(world, 8, torch.Generator().manual_seed(0))
    logits = torch.zeros(*batch.input_ids.shape, v.size)
    logits[:, :-1].scatter_(2, batch.input_ids[:, 1:, None], 1.0)  # predicts the next token exactly
    right, total = floors.image_cell_accuracy(world, batch, logits)
    assert total == 8 * 2 * v.image_tokens and right == total
    right, _ = floors.image_cell_accuracy(world, batch, torch.zeros_like(logits))  # argmax = token 0 (text)
    assert right == 0
