"""Real images for the digits world: scikit-learn's 8x8 handwritten digits, split and VQ-tokenized.

``sklearn.datasets.load_digits()`` ships 1,797 real 8x8 digits (pixel values 0..16) inside the
package, so nothing is downloaded. :func:`split_digits` makes a fixed train / validation /
held-out split, stratified by digit and seeded. :class:`Codebook` is a small VQ tokenizer: k-means
over the non-overlapping ``patch x patch`` pixel patches of the *training* images only, so an
image becomes a ``(8/patch)^2`` grid of discrete codes (encode = nearest centre) and decodes back
to pixels (each code -> its centre patch). :func:`codebook_table` measures the reconstruction
error of several codebook sizes on the validation split (how the size is chosen, docs/study_digits.md).
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

__all__ = ["Split", "split_digits", "Codebook", "train_codebook", "codebook_table", "PIXEL_MAX"]

PIXEL_MAX = 16.0  # load_digits' pixel range is 0..16
SIDE = 8  # images are SIDE x SIDE pixels


@dataclasses.dataclass(frozen=True)
class Split:
    """One part of the data: images [N, 8, 8] float64 in 0..16 and their digit labels [N]."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def split_digits(seed: int = 0, fractions: tuple[float, float] = (0.2, 0.2)) -> dict[str, Split]:
    """{"train", "val", "test"}: a stratified split of load_digits() (val and held-out test fractions)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    val_f, test_f = fractions
    if not (0 < val_f < 1 and 0 < test_f < 1 and val_f + test_f < 1):
        raise ValueError(f"fractions: expected (val, test) in (0, 1) with val + test < 1, got {fractions!r}")
    d = load_digits()
    images, labels = d.images.astype(np.float64), d.target.astype(np.int64)
    idx = np.arange(len(labels))
    rest, test = train_test_split(idx, test_size=test_f, stratify=labels, random_state=seed)
    train, val = train_test_split(rest, test_size=val_f / (1 - test_f), stratify=labels[rest], random_state=seed + 1)
    return {name: Split(images[np.sort(part)], labels[np.sort(part)]) for name, part in
            (("train", train), ("val", val), ("test", test))}


def _patches(images: np.ndarray, patch: int) -> np.ndarray:
    """[N, g*g, patch*patch] non-overlapping patches in row-major grid order (g = 8 // patch)."""
    n, g = len(images), SIDE // patch
    x = images.reshape(n, g, patch, g, patch).transpose(0, 1, 3, 2, 4)
    return x.reshape(n, g * g, patch * patch)


@dataclasses.dataclass(frozen=True)
class Codebook:
    """A VQ codebook over ``patch x patch`` pixel patches: ``centers`` [K, patch*patch]."""

    centers: np.ndarray
    patch: int

    @property
    def size(self) -> int:
        return len(self.centers)

    @property
    def grid(self) -> int:
        return SIDE // self.patch

    def encode(self, images: np.ndarray) -> np.ndarray:
        """[N, grid*grid] int64 codes: the nearest centre of each patch (first one on ties)."""
        images = np.asarray(images, dtype=np.float64)
        if images.ndim != 3 or images.shape[1:] != (SIDE, SIDE):
            raise ValueError(f"images: expected [N, {SIDE}, {SIDE}], got {images.shape}")
        p = _patches(images, self.patch)
        d = ((p[:, :, None, :] - self.centers[None, None]) ** 2).sum(-1)
        return d.argmin(-1).astype(np.int64)

    def decode(self, codes) -> np.ndarray:
        """[N, 8, 8] float64 pixels of codes [N, grid*grid] (each code -> its centre patch)."""
        codes = np.asarray(codes, dtype=np.int64)
        g = self.grid
        if codes.ndim != 2 or codes.shape[1] != g * g:
            raise ValueError(f"codes: expected [N, {g * g}], got {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.size):
            raise ValueError(f"codes: expected values in 0..{self.size - 1}")
        p = self.centers[codes].reshape(len(codes), g, g, self.patch, self.patch)
        return p.transpose(0, 1, 3, 2, 4).reshape(len(codes), SIDE, SIDE)

    def digest(self) -> str:
        """Hash of the centres (keys the cached base: another codebook means other tokens)."""
        return hashlib.sha256(np.ascontiguousarray(self.centers).tobytes() + bytes([self.patch])).hexdigest()[:16]


def train_codebook(train_images: np.ndarray, size: int, patch: int = 2, seed: int = 0) -> Codebook:
    """k-means (`size` centres, 3 restarts, seeded, one thread: deterministic) over the patches of `train_images`."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    if patch not in (1, 2, 4, 8):
        raise ValueError(f"patch: expected a divisor of {SIDE} (1, 2, 4 or 8), got {patch!r}")
    if not isinstance(size, int) or size < 2:
        raise ValueError(f"size: expected an integer >= 2, got {size!r}")
    x = _patches(np.asarray(train_images, dtype=np.float64), patch).reshape(-1, patch * patch)
    with threadpool_limits(1):  # the reduction order of a multi-threaded Lloyd step can differ between runs
        km = KMeans(n_clusters=size, n_init=3, random_state=seed).fit(x)
    order = np.lexsort(km.cluster_centers_.T[::-1])  # codes numbered by their centre, not k-means' order
    return Codebook(km.cluster_centers_[order], patch)


def codebook_table(splits: dict[str, Split], sizes, patch: int = 2, seed: int = 0, classifier=None) -> list[dict]:
    """Per codebook size: reconstruction MSE (pixels^2) and relative error (MSE / pixel variance) on
    train and validation, and, with `classifier`, its accuracy on the reconstructed validation digits."""
    val = splits["val"]
    var = float(val.images.var())
    rows = []
    for k in sizes:
        cb = train_codebook(splits["train"].images, int(k), patch, seed)
        row = {"size": int(k), "patch": patch}
        for name in ("train", "val"):
            imgs = splits[name].images
            mse = float(((cb.decode(cb.encode(imgs)) - imgs) ** 2).mean())
            row[f"{name}_mse"], row[f"{name}_rel_err"] = mse, mse / var
        if classifier is not None:
            rec = cb.decode(cb.encode(val.images)).reshape(len(val), -1)
            row["val_classifier_acc"] = float((classifier.predict(rec) == val.labels).mean())
        rows.append(row)
    return rows
