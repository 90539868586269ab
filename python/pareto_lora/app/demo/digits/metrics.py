"""What the digits world measures beyond loss: understanding accuracy and generation accuracy.

* Held-out text / image loss: token-weighted mean cross-entropy over the text / image targets of
  every held-out image, once as generation and once as understanding (data.eval_batches).
* Understanding accuracy: the share of held-out understanding sequences whose most likely token at
  the answer's digit slot (teacher-forced question, argmax over the whole vocabulary) is the right
  digit word.
* Generation accuracy: for every digit and caption template, the model draws the image codes
  after ``<bos> caption <boi>`` (sampling restricted to image codes, as a UMM's image decoding is),
  greedily and at temperature 1; the codes are decoded to pixels (tokens.Codebook.decode) and a
  scikit-learn classifier trained on the *real* training digits names them. The score is the
  share named as the asked digit. The classifier's own accuracy on real (and on VQ-reconstructed)
  held-out digits is the ceiling it can certify.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch

from ..evaluation import held_out
from .data import DigitsWorld, answer_positions, caption_prompts

__all__ = ["train_classifier", "classifier_accuracy", "evaluate_losses", "understanding_hits",
           "generate_codes", "generation_accuracy"]


def train_classifier(train_split):
    """An RBF support-vector classifier on the raw pixels of the real training digits (deterministic)."""
    from sklearn.svm import SVC

    return SVC(gamma=0.001, C=10.0).fit(train_split.images.reshape(len(train_split), -1), train_split.labels)


def classifier_accuracy(classifier, images: np.ndarray, labels) -> float:
    """Share of `images` [N, 8, 8] the classifier names as `labels`."""
    images = np.asarray(images, dtype=np.float64)
    if len(images) == 0:
        raise ValueError("images: expected at least one image")
    return float((classifier.predict(images.reshape(len(images), -1)) == np.asarray(labels)).mean())


def understanding_hits(batch, logits: torch.Tensor, vocab) -> tuple[int, int]:
    """(right, total) understanding sequences whose argmax at the answer slot is the right digit word."""
    rows, pos = answer_positions(batch, vocab)
    pred = logits[rows, pos - 1].argmax(-1).to(batch.input_ids.device)
    return int((pred == batch.input_ids[rows, pos]).sum()), int(len(rows))


def evaluate_losses(model, batches, device, vocab) -> dict[str, float]:
    """Held-out text and image loss (nats/token, token-weighted) and understanding accuracy."""
    text, image, right, total = held_out(model, batches, device, lambda b, logits: understanding_hits(b, logits, vocab))
    return {"text": text, "image": image, "und_acc": right / max(total, 1)}


def _cache_keyword(model) -> str:
    """The name transformers gives the KV cache (argument and output): ``cache`` from 5.25 on,
    ``past_key_values`` before (deprecated there, removed in 5.40)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


@torch.no_grad()
def generate_codes(model, prompts: torch.Tensor, vocab, device, temperature: float = 0.0,
                   gen: torch.Generator | None = None) -> torch.Tensor:
    """[B, grid*grid] codebook ids drawn after `prompts` (greedy when temperature is 0), restricted
    to the image codes. Sampling uses `gen` (CPU) so that every method of a seed gets the same draws."""
    if temperature < 0:
        raise ValueError(f"temperature: expected a number >= 0, got {temperature!r}")
    was_training = model.training
    model.eval()
    ids = prompts.to(device)
    lo, hi = vocab.image_base, vocab.image_base + vocab.num_codes
    kw = _cache_keyword(model)
    out = model(input_ids=ids, use_cache=True)  # the prompt once, then one token at a time from the KV cache
    for i in range(vocab.image_tokens):
        logits = out.logits[:, -1, lo:hi].float().cpu()
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, -1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        tok = (lo + nxt).to(device)[:, None]
        ids = torch.cat([ids, tok], 1)
        if i + 1 < vocab.image_tokens:
            out = model(input_ids=tok, use_cache=True, **{kw: getattr(out, kw)})
    model.train(was_training)
    return (ids[:, prompts.shape[1]:] - lo).cpu()


def generation_accuracy(model, world: DigitsWorld, codebook, classifier, device, seed: int,
                        samples: int = 4, temperature: float = 1.0) -> dict:
    """Greedy and temperature-sampled generation accuracy over every digit x caption template
    (`samples` draws per prompt at `temperature`, generator seed 50_000 + `seed`), plus the greedy
    image of each digit under the first template (pixels, for the samples figure)."""
    prompts, digits = caption_prompts(world)
    greedy = generate_codes(model, prompts, world.vocab, device)
    gen = torch.Generator().manual_seed(50_000 + int(seed))
    sampled = generate_codes(model, prompts.repeat(samples, 1), world.vocab, device, temperature, gen)
    g_img, s_img = codebook.decode(greedy.numpy()), codebook.decode(sampled.numpy())
    first = [int(np.flatnonzero(digits.numpy() == d)[0]) for d in world.digits]
    return {"gen_acc_greedy": classifier_accuracy(classifier, g_img, digits.numpy()),
            "gen_acc_sampled": classifier_accuracy(classifier, s_img, digits.repeat(samples).numpy()),
            "greedy_images": np.round(g_img[first], 3).tolist(),
            "sampled_images": np.round(s_img[first], 3).tolist()}
