"""Loss layers: a plain function under each thin module, with per-example values and missing labels.

Every loss here works element by element and reduces in two documented steps:

1. **Element values** ``l_e`` with **element weights** ``a_e``: ``a_e = 0`` where the target is missing (a NaN
   float target, or a class target equal to ``ignore_index``), otherwise the class weight of the target class
   (cross-entropy with ``class_weights``) times the example's sample weight (1 when none is given).
2. **Per-example value** (``reduction="none"``): ``sum_e a_e l_e / sum_e a_e`` over the example's elements
   (NaN when the example has no labelled element). **Batch value** (``reduction="mean"``, the default):
   ``sum_e a_e l_e / sum_e a_e`` over all elements of the batch, i.e. the weighted mean over labelled elements.
   ``reduction="sum"`` gives ``sum_e a_e l_e``.

So a sub-loss is the mean over the labelled examples only, and sample weights give a weighted mean (Keras
divides by the batch size instead, which changes the scale of a part with its weights). For class indices
without class weights this is exactly ``torch.nn.functional.cross_entropy(..., ignore_index=-100)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LossLayer",
    "MSE",
    "MAE",
    "Huber",
    "CrossEntropy",
    "Contrastive",
    "PairDistance",
    "mse",
    "mae",
    "huber",
    "cross_entropy",
    "contrastive",
    "reduce_elements",
    "ALIASES",
]

IGNORE_INDEX = -100
_REDUCTIONS = ("mean", "sum", "none")


def reduce_elements(values: Tensor, weights: Tensor, reduction: str = "mean") -> Tensor:
    """Reduce element values ``values`` (shape (B, ...)) with element weights ``weights`` (same shape).

    ``"mean"``: ``sum(a l) / sum(a)`` (NaN when ``sum(a) = 0``); ``"sum"``: ``sum(a l)``;
    ``"none"``: per-example weighted means, shape (B,), NaN for examples without labelled elements.
    Masked elements may hold NaN in ``values``: they are zeroed before the products.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, not {reduction!r}")
    weights = weights.to(values.dtype)
    values = torch.where(weights > 0, values, torch.zeros((), dtype=values.dtype, device=values.device))
    weighted = values * weights
    if reduction == "sum":
        return weighted.sum()
    if reduction == "mean":
        return weighted.sum() / weights.sum()
    b = values.shape[0] if values.dim() else 1
    num = weighted.reshape(b, -1).sum(1)
    den = weights.reshape(b, -1).sum(1)
    return num / den


def _may_be_missing(target: Tensor) -> bool:
    """False when ``target`` surely has no missing label (no NaN in a float target, no negative class such as
    -100 in an integer one): one reduction and one read, the cheapest exact test (a NaN makes the sum NaN; a
    sum that is NaN without one, from inf - inf, only sends the caller to its full check)."""
    if target.is_floating_point():
        return math.isnan(target.sum().item())
    if target.dtype == torch.bool or target.numel() == 0:
        return False
    return target.min().item() < 0


def _plain(target: Tensor, sample_weight: Tensor | None, reduction: str) -> bool:
    """True when no element is masked or weighted: the fused torch loss gives the same mean, faster."""
    return (
        reduction == "mean"
        and sample_weight is None
        and not (target.is_floating_point() and _may_be_missing(target))
    )


def _float_target_mask(target: Tensor) -> Tensor:
    return ~torch.isnan(target) if target.is_floating_point() else torch.ones_like(target, dtype=torch.bool)


def _check_same_shape(name: str, input: Tensor, target: Tensor) -> Tensor:
    if input.shape == target.shape:
        return target
    # (B,) targets for (B, 1) outputs and the reverse: reshape explicitly, never broadcast to (B, B).
    if input.dim() >= 1 and target.numel() == input.numel() and target.shape[:1] == input.shape[:1]:
        squeezed_in = [d for d in input.shape[1:] if d != 1]
        squeezed_t = [d for d in target.shape[1:] if d != 1]
        if squeezed_in == squeezed_t:
            return target.reshape(input.shape)
    raise ValueError(
        f"{name}: the target has shape {tuple(target.shape)} but the output has shape {tuple(input.shape)}; "
        "they must match (a (B,) target may serve a (B, 1) output)"
    )


def _sample_weights(elements: Tensor, sample_weight: Tensor | None) -> Tensor:
    if sample_weight is None:
        return torch.ones((), dtype=elements.dtype, device=elements.device)
    sw = sample_weight.to(elements.dtype)
    if sw.dim() == 0:
        return sw
    if sw.shape[0] != elements.shape[0]:
        raise ValueError(f"sample weights have {sw.shape[0]} entries for a batch of {elements.shape[0]} examples")
    if sw.dim() == 1:
        return sw.reshape((-1,) + (1,) * (elements.dim() - 1))
    return sw


def _regression(kind: str, input: Tensor, target: Tensor, delta: float = 1.0) -> tuple[Tensor, Tensor]:
    target = _check_same_shape(kind, input, target).to(input.dtype)
    mask = _float_target_mask(target)
    diff = input - torch.where(mask, target, input.detach())
    if kind == "mse":
        vals = diff * diff
    elif kind == "mae":
        vals = diff.abs()
    else:
        vals = F.huber_loss(input, torch.where(mask, target, input.detach()), reduction="none", delta=delta)
    return vals, mask


def mse(input: Tensor, target: Tensor, *, sample_weight: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Mean squared error ``(x - y)^2`` per element; NaN targets are missing labels (see module docstring)."""
    if _plain(target, sample_weight, reduction):
        return F.mse_loss(input, _check_same_shape("mse", input, target).to(input.dtype))
    vals, mask = _regression("mse", input, target)
    return reduce_elements(vals, mask * _sample_weights(vals, sample_weight), reduction)


def mae(input: Tensor, target: Tensor, *, sample_weight: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Mean absolute error ``|x - y|`` per element; NaN targets are missing labels."""
    if _plain(target, sample_weight, reduction):
        return F.l1_loss(input, _check_same_shape("mae", input, target).to(input.dtype))
    vals, mask = _regression("mae", input, target)
    return reduce_elements(vals, mask * _sample_weights(vals, sample_weight), reduction)


def huber(
    input: Tensor,
    target: Tensor,
    *,
    delta: float = 1.0,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Huber loss: ``0.5 d^2`` for ``|d| <= delta``, else ``delta (|d| - 0.5 delta)``, with ``d = x - y``."""
    vals, mask = _regression("huber", input, target, delta)
    return reduce_elements(vals, mask * _sample_weights(vals, sample_weight), reduction)


_FORMS = ("index", "probabilities", "binary")


def _class_index_target(target: Tensor) -> Tensor:
    """Integer class targets; float targets must hold integers (NaN = missing, mapped to ``ignore_index``)."""
    if target.is_floating_point():
        nan = torch.isnan(target)
        filled = torch.where(nan, torch.full_like(target, IGNORE_INDEX), target)
        if not torch.equal(filled, filled.round()):
            raise ValueError("cross-entropy 'index': class targets must be whole numbers (or NaN for missing)")
        return filled.long()
    if target.dtype == torch.bool:
        raise ValueError("cross-entropy 'index': class targets must be integers, not booleans (use form='binary')")
    return target.long()


def _log_probabilities(input: Tensor, from_logits: bool, class_dim: int) -> Tensor:
    return F.log_softmax(input, dim=class_dim) if from_logits else input.clamp_min(1e-12).log()


def cross_entropy(
    input: Tensor,
    target: Tensor,
    *,
    form: str = "index",
    from_logits: bool = True,
    class_weights: Tensor | Sequence[float] | None = None,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
    class_dim: int = 1,
) -> Tensor:
    """Cross-entropy in three forms (Wolfram's ``CrossEntropyLossLayer[form]``).

    * ``"index"``: ``input`` has the classes on ``class_dim`` (shape (B, C, ...)), ``target`` holds class indices
      (shape (B, ...)); element value ``-log p_y``. Class ``-100`` (or NaN in a float target) is missing.
    * ``"probabilities"``: ``target`` holds distributions over the classes (same shape as ``input``); element
      value ``-sum_c q_c log p_c``. A target row with a NaN is missing.
    * ``"binary"``: ``input`` and ``target`` have the same shape, target in [0, 1]; element value
      ``-(y log p + (1 - y) log(1 - p))``. NaN targets are missing.

    ``from_logits=True`` takes raw scores (computed stably with log-softmax / log-sigmoid);
    ``from_logits=False`` takes probabilities (clamped to [1e-12, 1] before the log). ``class_weights`` (length
    C; for ``"binary"``: the weights of class 0 and class 1) weight each element by its target class.
    """
    if form not in _FORMS:
        raise ValueError(f"cross-entropy form must be one of {_FORMS}, not {form!r}")
    cw = None if class_weights is None else torch.as_tensor(class_weights, dtype=input.dtype, device=input.device)
    if form == "binary":
        target = _check_same_shape("binary cross-entropy", input, target).to(input.dtype)
        if from_logits and cw is None and _plain(target, sample_weight, reduction):
            return F.binary_cross_entropy_with_logits(input, target)
        mask = _float_target_mask(target)
        y = torch.where(mask, target, torch.zeros_like(target))
        if from_logits:
            vals = F.binary_cross_entropy_with_logits(input, y, reduction="none")
        else:
            p = input.clamp(1e-12, 1 - 1e-12)
            vals = -(y * p.log() + (1 - y) * (1 - p).log())
        w = mask.to(input.dtype)
        if cw is not None:
            if cw.numel() != 2:
                raise ValueError("binary cross-entropy: class_weights must have 2 entries (class 0, class 1)")
            w = w * (cw[0] * (1 - y) + cw[1] * y)
        return reduce_elements(vals, w * _sample_weights(vals, sample_weight), reduction)

    if input.dim() < 2:
        raise ValueError(f"cross-entropy {form!r}: the output needs a class dimension, got shape {tuple(input.shape)}")
    if form == "index":
        t = _class_index_target(target)
        expected = input.shape[:class_dim] + input.shape[class_dim + 1 :]
        if t.shape != expected:
            if t.numel() == expected.numel() and t.shape[:1] == expected[:1]:
                t = t.reshape(expected)
            else:
                raise ValueError(
                    f"cross-entropy 'index': the target has shape {tuple(target.shape)}; for an output of shape "
                    f"{tuple(input.shape)} it must have shape {tuple(expected)} (one class index per example)"
                )
        n_classes = input.shape[class_dim]
        if from_logits and sample_weight is None and reduction == "mean" and class_dim == 1:
            try:
                return F.cross_entropy(input, t, weight=cw, ignore_index=IGNORE_INDEX)
            except (IndexError, RuntimeError):
                pass  # out-of-range classes or wrong class weights: the checks below say what is wrong
        logp = _log_probabilities(input, from_logits, class_dim)
        mask = t != IGNORE_INDEX
        bad = mask & ((t < 0) | (t >= n_classes))
        if bool(bad.any()):
            raise ValueError(
                f"cross-entropy 'index': class targets must lie in 0..{n_classes - 1} (or {IGNORE_INDEX} for "
                f"missing); found {int(t[bad][0])}"
            )
        safe = torch.where(mask, t, torch.zeros_like(t))
        vals = -logp.gather(class_dim, safe.unsqueeze(class_dim)).squeeze(class_dim)
        w = mask.to(input.dtype)
        if cw is not None:
            if cw.numel() != n_classes:
                raise ValueError(f"cross-entropy: class_weights has {cw.numel()} entries for {n_classes} classes")
            w = w * cw[safe]
        return reduce_elements(vals, w * _sample_weights(vals, sample_weight), reduction)

    target = _check_same_shape("cross-entropy 'probabilities'", input, target).to(input.dtype)
    logp = _log_probabilities(input, from_logits, class_dim)
    row_ok = ~torch.isnan(target).any(dim=class_dim)
    q = torch.where(torch.isnan(target), torch.zeros_like(target), target)
    vals = -(q * logp).sum(dim=class_dim)
    w = row_ok.to(input.dtype)
    if cw is not None:
        shape = [1] * input.dim()
        shape[class_dim] = -1
        w = w * (q * cw.reshape(shape)).sum(dim=class_dim)
    return reduce_elements(vals, w * _sample_weights(vals, sample_weight), reduction)


def contrastive(
    input: Tensor,
    target: Tensor,
    *,
    margin: float = 0.5,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Contrastive loss with Wolfram's meaning (``ContrastiveLossLayer[margin]``).

    ``input`` is a distance ``d >= 0``; ``target`` is True (1) where the distance should be *maximised* (a
    dissimilar pair) and False (0) where it should be *minimised* (a similar pair). Element value:
    ``max(0, margin - d)^2`` for True targets and ``d^2`` for False ones (Hadsell, Chopra & LeCun, CVPR 2006).
    """
    target = _check_same_shape("contrastive", input, target)
    tf = target.to(input.dtype)
    mask = _float_target_mask(tf)
    y = torch.where(mask, tf, torch.zeros_like(tf))
    vals = y * F.relu(margin - input) ** 2 + (1 - y) * input**2
    return reduce_elements(vals, mask * _sample_weights(vals, sample_weight), reduction)


class LossLayer(nn.Module):
    """Base of the loss layers: ``layer(input, target, sample_weight=None, reduction="mean")``."""

    needs_target: bool = True

    def forward(
        self, input: Tensor, target: Tensor, sample_weight: Tensor | None = None, reduction: str = "mean"
    ) -> Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return repr(self)


class MSE(LossLayer):
    """Mean squared error (:func:`mse`)."""

    def forward(self, input, target, sample_weight=None, reduction="mean"):  # type: ignore[override]
        return mse(input, target, sample_weight=sample_weight, reduction=reduction)


class MAE(LossLayer):
    """Mean absolute error (:func:`mae`)."""

    def forward(self, input, target, sample_weight=None, reduction="mean"):  # type: ignore[override]
        return mae(input, target, sample_weight=sample_weight, reduction=reduction)


class Huber(LossLayer):
    """Huber loss (:func:`huber`) with threshold ``delta``."""

    def __init__(self, delta: float = 1.0) -> None:
        super().__init__()
        self.delta = float(delta)

    def forward(self, input, target, sample_weight=None, reduction="mean"):  # type: ignore[override]
        return huber(input, target, delta=self.delta, sample_weight=sample_weight, reduction=reduction)

    def extra_repr(self) -> str:
        return f"delta={self.delta}"


class CrossEntropy(LossLayer):
    """Cross-entropy (:func:`cross_entropy`): ``form`` in ``"index"``, ``"probabilities"``, ``"binary"``."""

    def __init__(
        self,
        form: str = "index",
        *,
        from_logits: bool = True,
        class_weights: Tensor | Sequence[float] | None = None,
        class_dim: int = 1,
    ) -> None:
        super().__init__()
        if form not in _FORMS:
            raise ValueError(f"CrossEntropy form must be one of {_FORMS}, not {form!r}")
        self.form = form
        self.from_logits = from_logits
        self.class_weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.class_dim = class_dim

    def forward(self, input, target, sample_weight=None, reduction="mean"):  # type: ignore[override]
        return cross_entropy(
            input,
            target,
            form=self.form,
            from_logits=self.from_logits,
            class_weights=self.class_weights,
            sample_weight=sample_weight,
            reduction=reduction,
            class_dim=self.class_dim,
        )

    def extra_repr(self) -> str:
        cw = "" if self.class_weights is None else ", class_weights=..."
        return f"{self.form!r}, from_logits={self.from_logits}{cw}"


class Contrastive(LossLayer):
    """Contrastive loss (:func:`contrastive`) with margin ``margin`` (Wolfram's default 0.5)."""

    def __init__(self, margin: float = 0.5) -> None:
        super().__init__()
        self.margin = float(margin)

    def forward(self, input, target, sample_weight=None, reduction="mean"):  # type: ignore[override]
        return contrastive(input, target, margin=self.margin, sample_weight=sample_weight, reduction=reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}"


class PairDistance(nn.Module):
    """Euclidean distance between two embeddings (Wolfram's ``NetPairEmbeddingOperator``).

    ``PairDistance(embed)(a, b) = ||embed(a) - embed(b)||`` per example; an output produced by this module
    gets the contrastive loss under ``loss="auto"``.
    """

    def __init__(self, embed: nn.Module, eps: float = 1e-9) -> None:
        super().__init__()
        self.embed = embed
        self.eps = eps

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        d = self.embed(a) - self.embed(b)
        return (d.reshape(d.shape[0], -1).pow(2).sum(1) + self.eps).sqrt()


ALIASES: dict[str, type[LossLayer] | tuple[type[LossLayer], dict]] = {
    "mse": MSE,
    "mae": MAE,
    "huber": Huber,
    "ce": (CrossEntropy, {"form": "index"}),
    "bce": (CrossEntropy, {"form": "binary"}),
    "contrastive": Contrastive,
}
"""Loss names accepted in specs. ``"ce"`` takes class indices and logits; ``"bce"`` binary targets and logits."""


def from_alias(name: str) -> LossLayer:
    """A fresh loss layer for an alias of :data:`ALIASES`."""
    entry = ALIASES[name]
    if isinstance(entry, tuple):
        cls, kw = entry
        return cls(**kw)
    return entry()
