"""Built-in multi-task data, generated or shipped with the package (no download).

* :func:`multidigits`: two overlaid handwritten digits (UCI 8x8 optical digits, CC BY 4.0, see
  ``DIGITS_LICENSE.txt``) on a 10x10 canvas, three tasks on very different scales.
* :func:`multiregression`: a generated regression set with three targets on different scales.
* :func:`multilabel`: a generated set of any width ``T`` (multi-label or multi-regression), for many tasks.
* :class:`MultiDigitsNet`: a small reference net for :func:`multidigits`.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch
from torch import Tensor, nn

SPLITS = ("train", "val", "test")
_SIZES = {"train": 4000, "val": 1000, "test": 1000}
_FRACTIONS = (0.7, 0.15, 0.15)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    with resources.files(__package__).joinpath("digits.npz").open("rb") as f:
        z = np.load(f)
        return z["images"], z["labels"]


def _source_split(labels: np.ndarray, split: str) -> np.ndarray:
    """Indices of the source images of ``split``: a stratified 70/15/15 split fixed once (seed 0), so that no
    source image is used in two splits whatever the pairing seed."""
    rng = np.random.default_rng(0)
    parts: dict[str, list[int]] = {s: [] for s in SPLITS}
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_train = round(_FRACTIONS[0] * len(idx))
        n_val = round(_FRACTIONS[1] * len(idx))
        parts["train"] += idx[:n_train].tolist()
        parts["val"] += idx[n_train : n_train + n_val].tolist()
        parts["test"] += idx[n_train + n_val :].tolist()
    return np.sort(np.array(parts[split]))


def multidigits(split: str = "train", *, seed: int = 0, size: int | None = None) -> dict[str, Tensor]:
    """Two overlaid digits: the offline MultiMNIST of the reference (Sener & Koltun 2018, scaled to 8x8 digits).

    Digit A is drawn at rows/columns 0-7 and digit B at 2-9 of a 10x10 canvas; where they overlap the pixel
    is the maximum of the two. The partner B of each A is drawn uniformly from the same split's source images
    (A = B allowed, as Sener). Source images are split 70/15/15 (stratified) *before* pairing, so no image
    appears in two splits.

    Returns a dict of tensors with ``size`` examples (default 4000 train, 1000 val, 1000 test):

    * ``"image"``: float32 (N, 1, 10, 10), values in [0, 1] (pixel / 16);
    * ``"left"``: int64 (N,), class of digit A (top-left);
    * ``"right"``: int64 (N,), class of digit B (bottom-right);
    * ``"ink"``: float32 (N, 1), the total ink of the canvas (sum of the [0, 1] pixel values, mean about 34,
      standard deviation about 3): a regression target whose squared error starts about 500 times larger
      than the cross-entropies, so that unbalanced training lets it dominate the shared trunk.

    Deterministic in ``(split, seed, size)``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    images, labels = _digits()
    src = _source_split(labels, split)
    n = _SIZES[split] if size is None else int(size)
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    a = src[rng.integers(0, len(src), n)]
    b = src[rng.integers(0, len(src), n)]
    canvas = np.zeros((n, 10, 10), dtype=np.uint8)
    canvas[:, 0:8, 0:8] = images[a]
    canvas[:, 2:10, 2:10] = np.maximum(canvas[:, 2:10, 2:10], images[b])
    return {
        "image": torch.from_numpy(canvas.astype(np.float32) / 16.0).unsqueeze(1),
        "left": torch.from_numpy(labels[a].astype(np.int64)),
        "right": torch.from_numpy(labels[b].astype(np.int64)),
        "ink": torch.from_numpy(canvas.reshape(n, -1).sum(1, dtype=np.float32) / 16.0).unsqueeze(1),
    }


def multiregression(split: str = "train", *, seed: int = 0, size: int | None = None) -> dict[str, Tensor]:
    """A generated regression set: input ``"x"`` (N, 8) standard normal, three targets on different scales.

    * ``"smooth"`` (N, 1): ``sin(x_0) + 0.5 x_1 x_2`` + noise 0.1 (scale ~1);
    * ``"linear"`` (N, 2): ``x @ W`` with a fixed random W, times 100, + noise 1 (scale ~100);
    * ``"count"`` (N, 1): ``0.01 * exp(x_3)`` + noise 0.001 (scale ~0.01).

    The generating functions are fixed (seed 0); ``seed`` and ``split`` choose the examples.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    n = {"train": 2000, "val": 500, "test": 500}[split] if size is None else int(size)
    w = np.random.default_rng(0).standard_normal((8, 2))
    rng = np.random.default_rng([seed, 100 + SPLITS.index(split)])
    x = rng.standard_normal((n, 8))
    smooth = np.sin(x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3] + 0.1 * rng.standard_normal((n, 1))
    linear = 100 * (x @ w) + rng.standard_normal((n, 2))
    count = 0.01 * np.exp(x[:, 3:4]) + 0.001 * rng.standard_normal((n, 1))

    def t(v: np.ndarray) -> Tensor:
        return torch.from_numpy(v.astype(np.float32))

    return {"x": t(x), "smooth": t(smooth), "linear": t(linear), "count": t(count)}


_KINDS = ("binary", "regression")


def multilabel(
    n: int = 1024, *, labels: int = 8, features: int = 32, rank: int = 8, kind: str = "binary", seed: int = 0
) -> dict[str, Tensor]:
    """A generated multi-task set of any width: ``labels`` targets ``"task0"``, ``"task1"``, ... on one input.

    The targets share a low-rank structure, as related tasks do: with ``x ~ N(0, I)`` (``n x features``), fixed
    random ``A`` (``features x rank``, entries ``N(0, 1/features)``) and ``B`` (``rank x labels``, ``N(0, 1)``),
    the scores are ``Z = tanh(x A) B``; each task's score is a function of the same ``rank`` latent features.

    * ``kind="regression"``: ``task_t = Z_t + 0.1 eps`` (``eps ~ N(0, 1)``), float32 ``(n, 1)``;
    * ``kind="binary"``: ``task_t = 1[4 (Z_t - median(Z_t)) / std(Z_t) + logistic noise > 0]``, float32 0/1
      ``(n, 1)``: about half positives per label, about 10% of the labels (9-14% measured) on the other side
      of their noiseless score (a multi-label classification task per column, for a sigmoid output).

    Returns ``{"x": float32 (n, features), "task0": ..., ..., "task{labels-1}": ...}``. Deterministic in all
    arguments; ``seed`` draws both the generating functions and the examples.
    """
    for name, v, low in (("n", n, 1), ("labels", labels, 1), ("features", features, 1), ("rank", rank, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"multilabel: {name} must be an integer >= {low}, not {v!r}")
    if kind not in _KINDS:
        raise ValueError(f"multilabel: kind must be one of {_KINDS}, not {kind!r}")
    rng = np.random.default_rng([seed, 200])
    A = rng.standard_normal((features, rank)) / np.sqrt(features)
    B = rng.standard_normal((rank, labels))
    x = rng.standard_normal((n, features))
    z = np.tanh(x @ A) @ B
    if kind == "regression":
        y = z + 0.1 * rng.standard_normal((n, labels))
    else:
        u = rng.uniform(1e-12, 1 - 1e-12, (n, labels))
        logit = 4.0 * (z - np.median(z, axis=0)) / z.std(axis=0).clip(1e-12)
        y = (logit + np.log(u / (1 - u)) > 0).astype(np.float64)
    out = {"x": torch.from_numpy(x.astype(np.float32))}
    for t in range(labels):
        out[f"task{t}"] = torch.from_numpy(y[:, t : t + 1].astype(np.float32))
    return out


class MultiDigitsNet(nn.Module):
    """Reference net for :func:`multidigits`: a shared conv trunk, two softmax heads and a linear ink head.

    ``forward(image) -> {"left": probabilities, "right": probabilities, "ink": (N, 1)}``; under
    ``loss="auto"`` the softmax heads get cross-entropy (from their logits) and ``ink`` gets MSE.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(16 * 10 * 10, width * 4),
            nn.ReLU(),
        )
        self.left = nn.Sequential(nn.Linear(width * 4, 10), nn.Softmax(dim=1))
        self.right = nn.Sequential(nn.Linear(width * 4, 10), nn.Softmax(dim=1))
        self.ink = nn.Linear(width * 4, 1)

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        h = self.trunk(image)
        return {"left": self.left(h), "right": self.right(h), "ink": self.ink(h)}


__all__ = ["SPLITS", "MultiDigitsNet", "multidigits", "multilabel", "multiregression"]
