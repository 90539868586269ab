"""modality_losses: causal shift, split by target modality, empty modalities, -inf logits, errors."""

import pytest
import torch
import torch.nn.functional as F

from pareto_lora import modality_losses, modality_token_counts

V = 11
IMG = (7, 11)


def make(seed=0, b=2, t=9):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, V, generator=gen, requires_grad=True)
    labels = torch.randint(0, V, (b, t), generator=gen)
    labels[0, 3] = -100
    return logits, labels


def manual(logits, labels, is_image):
    """Loop over positions: logits[:, t] predicts labels[:, t + 1]."""
    terms = {True: [], False: []}
    for i in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[i, t] == -100:
                continue
            ce = F.cross_entropy(logits[i, t - 1][None], labels[i, t][None])
            terms[bool(is_image[i, t])].append(ce)
    mean = lambda xs: torch.stack(xs).mean() if xs else torch.zeros(())  # noqa: E731
    return mean(terms[False]), mean(terms[True])


def test_matches_a_position_by_position_loop_with_the_causal_shift():
    logits, labels = make()
    mask = (labels >= IMG[0]) & (labels < IMG[1])
    lt, li = modality_losses(logits, labels, image_token_mask=mask)
    et, ei = manual(logits, labels, mask)
    torch.testing.assert_close(lt, et)
    torch.testing.assert_close(li, ei)
    # an unshifted reading (mask on logits positions) would give different numbers
    assert not torch.allclose(modality_losses(logits, labels, image_token_mask=mask.roll(1, dims=1))[1], ei)


def test_range_equals_mask_and_counts_recombine_to_the_plain_loss():
    logits, labels = make(1)
    mask = (labels >= IMG[0]) & (labels < IMG[1])
    by_mask = modality_losses(logits, labels, image_token_mask=mask)
    by_range = modality_losses(logits, labels, image_token_range=IMG)
    torch.testing.assert_close(by_mask, by_range)
    nt, ni = modality_token_counts(labels, image_token_range=IMG)
    plain = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close((by_mask[0] * nt + by_mask[1] * ni) / (nt + ni), plain)
    summed = modality_losses(logits, labels, image_token_range=IMG, num_items=(1, 1))
    torch.testing.assert_close(summed[0], by_mask[0] * nt)


@pytest.mark.parametrize("empty", ["image", "text"])
def test_missing_modality_gives_a_zero_loss_with_zero_gradient(empty):
    logits, labels = make(2)
    mask = torch.zeros_like(labels, dtype=torch.bool) if empty == "image" else torch.ones_like(labels, dtype=torch.bool)
    lt, li = modality_losses(logits, labels, image_token_mask=mask)
    zero = li if empty == "image" else lt
    assert zero.requires_grad and zero.item() == 0.0
    (g,) = torch.autograd.grad(zero, logits)
    assert torch.equal(g, torch.zeros_like(g))


def test_minus_inf_image_logits_keep_the_text_loss_and_gradient_finite():
    logits, labels = make(3)
    masked = logits.clone()
    masked[..., IMG[0] : IMG[1]] = float("-inf")
    lt, li = modality_losses(masked, labels, image_token_range=IMG)
    assert torch.isfinite(lt) and torch.isinf(li)
    (g,) = torch.autograd.grad(lt, logits)
    assert torch.isfinite(g).all()


def test_errors():
    logits, labels = make()
    mask = torch.zeros_like(labels, dtype=torch.bool)
    with pytest.raises(ValueError, match="image_token_mask: pass exactly one"):
        modality_losses(logits, labels)
    with pytest.raises(ValueError, match="image_token_mask: pass exactly one"):
        modality_losses(logits, labels, image_token_mask=mask, image_token_range=IMG)
    with pytest.raises(ValueError, match="image_token_mask: expected shape"):
        modality_losses(logits, labels, image_token_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="image_token_range: expected first_id < end_id"):
        modality_losses(logits, labels, image_token_range=(5, 5))
    with pytest.raises(ValueError, match="image_token_range: expected"):
        modality_losses(logits, labels, image_token_range=7)
    with pytest.raises(ValueError, match="logits: expected a \\[batch, seq, vocab\\]"):
        modality_losses(logits[0], labels, image_token_mask=mask)
    with pytest.raises(ValueError, match="logits: expected leading shape"):
        modality_losses(logits[:, 1:], labels, image_token_mask=mask)
    with pytest.raises(ValueError, match="labels: expected a \\[batch, seq\\]"):
        modality_losses(logits, labels[0], image_token_mask=mask)
    with pytest.raises(ValueError, match="num_items"):
        modality_losses(logits, labels, image_token_mask=mask, num_items=(1,))


@pytest.mark.parametrize("num_items", [(-5, 10), (float("nan"), 3), (3, float("inf")), (True, 3), ("4", 3),
                                       (torch.tensor(-1.0), 3), (torch.tensor([1, 2]), 3), 5, (1, 2, 3)])
def test_num_items_must_be_two_finite_counts(num_items):
    """Issue 27: (-5, 10) gave a loss of 76, (nan, 3) a NaN loss, both accepted."""
    logits, labels = make()
    with pytest.raises(ValueError, match=r"^num_items: expected"):
        modality_losses(logits, labels, image_token_range=IMG, num_items=num_items)


def test_num_items_accepts_counts_as_numbers_and_tensors():
    logits, labels = make()
    counts = modality_token_counts(labels, image_token_range=IMG)
    a = modality_losses(logits, labels, image_token_range=IMG, num_items=counts)
    b = modality_losses(logits, labels, image_token_range=IMG, num_items=tuple(int(c) for c in counts))
    c = modality_losses(logits, labels, image_token_range=IMG, num_items=(0, 0.0))  # no target: clamped to 1
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and all(torch.isfinite(x) for x in c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_labels_must_be_integer_ids(dtype):
    """Float labels were read by cross_entropy as class probabilities (a RuntimeError at best)."""
    logits, labels = make()
    with pytest.raises(ValueError, match=r"^labels: expected integer token ids"):
        modality_losses(logits, labels.to(dtype), image_token_range=IMG)
    with pytest.raises(ValueError, match=r"^labels: expected integer token ids"):
        modality_token_counts(labels.to(dtype), image_token_range=IMG)


@pytest.mark.parametrize("bad", [V, V + 100, -1, -101])
def test_label_ids_outside_the_vocabulary_are_refused(bad):
    """An id >= the logits' vocabulary was an IndexError on the CPU (a device assert on a GPU)."""
    logits, labels = make()
    labels[1, 4] = bad
    with pytest.raises(ValueError, match=rf"^labels: expected ids in \[0, {V}\) .* got {bad}$"):
        modality_losses(logits, labels, image_token_range=IMG)


def test_int32_labels_work_like_int64():
    logits, labels = make()
    a = modality_losses(logits, labels, image_token_range=IMG)
    b = modality_losses(logits, labels.int(), image_token_range=IMG)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
