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

import copy
import inspect
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import LossSpecError

__all__ = [
    "ALIASES",
    "MAE",
    "MSE",
    "Contrastive",
    "CrossEntropy",
    "Huber",
    "LossLayer",
    "PairDistance",
    "TorchLoss",
    "contrastive",
    "cross_entropy",
    "huber",
    "is_torch_loss",
    "mae",
    "mse",
    "port_loss",
    "reduce_elements",
    "resolve_class_dim",
    "torch_loss",
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
        reduction == "mean" and sample_weight is None and not (target.is_floating_point() and _may_be_missing(target))
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
    hint = ""
    if not target.is_floating_point() and target.dim() == input.dim() - 1:
        hint = "; the target looks like class indices: give this output the loss 'ce' (cross-entropy)"
    raise ValueError(
        f"{name}: the target has shape {tuple(target.shape)} but the output has shape {tuple(input.shape)}; "
        f"they must match (a (B,) target may serve a (B, 1) output){hint}"
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


def _without(shape: Sequence[int], dim: int) -> tuple[int, ...]:
    return tuple(shape[:dim]) + tuple(shape[dim + 1 :])


def resolve_class_dim(input_shape: Sequence[int], target_shape: Sequence[int], class_dim: int | None, form: str) -> int:
    """The class dimension of a cross-entropy output, as a non-negative index.

    An explicit ``class_dim`` (negative counts from the end) is only range-checked. ``None`` infers it for the
    ``"index"`` form: dim 1 (torch's layout, (B, C, ...)) or the last dim (Hugging Face token logits (B, T, K)
    with targets (B, T)), whichever the target's shape fits: exactly, else by the number of elements. When both
    fit (T == K) the layout is ambiguous and this raises, saying how to choose; when neither does, dim 1 (the
    shape check then names the expected target shape). Other forms default to dim 1.
    """
    n = len(input_shape)
    if class_dim is not None:
        if not -n <= class_dim < n:
            raise ValueError(f"class_dim={class_dim} is out of range for an output of shape {tuple(input_shape)}")
        return class_dim % n
    if form != "index" or n <= 2:
        return 1
    target = tuple(target_shape)
    exact = [d for d in (1, n - 1) if _without(input_shape, d) == target]
    numel = math.prod(target)
    loose = [
        d for d in (1, n - 1) if math.prod(_without(input_shape, d)) == numel and target[:1] == tuple(input_shape[:1])
    ]
    fits = exact or loose
    if len(fits) > 1:
        raise ValueError(
            f"cross-entropy 'index': an output of shape {tuple(input_shape)} with class targets of shape {target} "
            f"could hold its classes on dim 1 or on the last dim ({n - 1}); say which: CrossEntropy(class_dim=1) "
            "(torch's (B, C, ...) layout) or CrossEntropy(class_dim=-1) (token logits (B, T, K))"
        )
    return fits[0] if fits else 1


def cross_entropy(
    input: Tensor,
    target: Tensor,
    *,
    form: str = "index",
    from_logits: bool = True,
    class_weights: Tensor | Sequence[float] | None = None,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
    class_dim: int | None = None,
) -> Tensor:
    """Cross-entropy in three forms (Wolfram's ``CrossEntropyLossLayer[form]``).

    * ``"index"``: ``input`` has the classes on ``class_dim`` (shape (B, C, ...), or (B, ..., C) with
      ``class_dim=-1``), ``target`` holds class indices (the input's shape without the class dim); element value
      ``-log p_y``. Class ``-100`` (or NaN in a float target) is missing. ``class_dim=None`` infers dim 1 or the
      last dim from the target's shape and raises when both fit (:func:`resolve_class_dim`).
    * ``"probabilities"``: ``target`` holds distributions over the classes (same shape as ``input``); element
      value ``-sum_c q_c log p_c``. A target row with a NaN is missing.
    * ``"binary"``: ``input`` and ``target`` have the same shape, target in [0, 1]; element value
      ``-(y log p + (1 - y) log(1 - p))``. NaN targets are missing.

    ``from_logits=True`` takes raw scores (computed stably with log-softmax / log-sigmoid);
    ``from_logits=False`` takes probabilities (clamped to [1e-12, 1] before the log). ``class_weights`` (length
    C; for ``"binary"``: the weights of class 0 and class 1) weight each element by its target class.
    ``class_dim`` (default dim 1 for ``"probabilities"``) is ignored by ``"binary"``.
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
    class_dim = resolve_class_dim(input.shape, target.shape, class_dim, form)
    if form == "index":
        t = _class_index_target(target)
        expected = torch.Size(_without(input.shape, class_dim))
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

    def forward(
        self, input: Tensor, target: Tensor, sample_weight: Tensor | None = None, reduction: str = "mean"
    ) -> Tensor:
        return mse(input, target, sample_weight=sample_weight, reduction=reduction)


class MAE(LossLayer):
    """Mean absolute error (:func:`mae`)."""

    def forward(
        self, input: Tensor, target: Tensor, sample_weight: Tensor | None = None, reduction: str = "mean"
    ) -> Tensor:
        return mae(input, target, sample_weight=sample_weight, reduction=reduction)


class Huber(LossLayer):
    """Huber loss (:func:`huber`) with threshold ``delta``."""

    def __init__(self, delta: float = 1.0) -> None:
        super().__init__()
        self.delta = float(delta)

    def forward(
        self, input: Tensor, target: Tensor, sample_weight: Tensor | None = None, reduction: str = "mean"
    ) -> Tensor:
        return huber(input, target, delta=self.delta, sample_weight=sample_weight, reduction=reduction)

    def extra_repr(self) -> str:
        return f"delta={self.delta}"


class CrossEntropy(LossLayer):
    """Cross-entropy (:func:`cross_entropy`): ``form`` in ``"index"``, ``"probabilities"``, ``"binary"``.

    ``class_dim=None`` (default) infers dim 1 or the last dim from the target (an error when both fit);
    ``class_dim=1`` / ``class_dim=-1`` say it.
    """

    def __init__(
        self,
        form: str = "index",
        *,
        from_logits: bool = True,
        class_weights: Tensor | Sequence[float] | None = None,
        class_dim: int | None = None,
    ) -> None:
        super().__init__()
        if form not in _FORMS:
            raise ValueError(f"CrossEntropy form must be one of {_FORMS}, not {form!r}")
        self.form = form
        self.from_logits = from_logits
        self.class_weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.class_dim = class_dim

    def forward(
        self, input: Tensor, target: Tensor, sample_weight: Tensor | None = None, reduction: str = "mean"
    ) -> Tensor:
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
        cd = "" if self.class_dim is None else f", class_dim={self.class_dim}"
        return f"{self.form!r}, from_logits={self.from_logits}{cw}{cd}"


class Contrastive(LossLayer):
    """Contrastive loss (:func:`contrastive`) with margin ``margin`` (Wolfram's default 0.5)."""

    def __init__(self, margin: float = 0.5) -> None:
        super().__init__()
        self.margin = float(margin)

    def forward(
        self, input: Tensor, target: Tensor, sample_weight: Tensor | None = None, reduction: str = "mean"
    ) -> Tensor:
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


# -- torch.nn loss modules ------------------------------------------------------------------------------------

_MODULE_REDUCTIONS = ("mean", "sum", "batchmean")
_PREPARES = (None, "log", "logit")


def is_torch_loss(obj: object) -> bool:
    """Whether ``obj`` is a ``torch.nn`` loss module (any module with a string ``reduction``, not a lossport layer)."""
    reduction = getattr(obj, "reduction", None)
    return isinstance(obj, nn.Module) and not isinstance(obj, LossLayer) and isinstance(reduction, str)


def module_name(module: nn.Module) -> str:
    """``nn.MSELoss`` for a torch loss, the bare class name for any other module."""
    cls = type(module)
    return f"nn.{cls.__name__}" if cls.__module__.startswith("torch.nn") else cls.__name__


def _check_takes_input_and_target(module: nn.Module) -> None:
    """A loss spec calls ``loss(output, target)``: refuse modules that need a third input (triplet, cosine, CTC)."""
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return
    ps = list(sig.parameters.values())
    if any(p.kind == p.VAR_POSITIONAL for p in ps):
        return
    positional = [p for p in ps if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p.name for p in positional if p.default is p.empty]
    if len(required) > 2 or len(positional) < 2:
        names = ", ".join(p.name for p in positional)
        raise ValueError(
            f"{module_name(module)} takes ({names}), but a loss spec calls loss(output, target); wrap it in "
            "a callable of (output, target), e.g. lossport.CustomLoss(lambda o, t: loss(o[:, 0], o[:, 1], t), "
            "target=True)"
        )


class TorchLoss(LossLayer):
    """A ``torch.nn`` loss module as a loss layer, with missing labels and sample weights.

    ``TorchLoss(nn.CrossEntropyLoss(weight=w, label_smoothing=0.1))``; a spec may give the module itself (it is
    wrapped at compile time). A *copy* of the module runs with ``reduction="none"`` (the given module is never
    changed) and gives element values ``l_e`` of shape (B, ...). With ``a_e`` = 1 for a labelled element (0 where
    a float target is NaN or a class target equals the module's ``ignore_index``) times the sample weight, the
    batch value follows the module's documented ``reduction`` (PyTorch docs, ``torch.nn`` loss functions):

    * ``"mean"``: ``sum_e a_e l_e / sum_e a_e d_e``, with ``d_e = weight[y_e]`` for ``CrossEntropyLoss`` and
      ``NLLLoss`` on class-index targets with a class ``weight`` (the weighted mean's denominator, as torch) and
      ``d_e = 1`` otherwise; per example: the same ratio over the example's elements.
    * ``"sum"``: ``sum_e a_e l_e``; per example: the sum of its labelled elements.
    * ``"batchmean"`` (``KLDivLoss``): ``sum_i w_i s_i / sum_i w_i`` over the labelled examples, ``s_i`` the sum
      of example i's labelled elements (torch's sum / B without masks or weights).

    On full labels without sample weights this equals the module's own value. A module whose ``reduction="none"``
    output has no batch dimension raises: its per-example values cannot be had.

    ``class_dim``: for ``CrossEntropyLoss``/``NLLLoss``, where the classes are (moved to dim 1 before the call);
    ``None`` keeps torch's dim 1 unless only the last dim fits the targets. ``prepare``: ``"log"`` feeds
    ``log p`` (probabilities from a functional softmax; ``log_softmax(log p) = log p``, so cross-entropy on them
    is the cross-entropy of ``p``), ``"logit"`` feeds ``log p - log(1 - p)`` (sigmoid probabilities to
    ``BCEWithLogitsLoss``); both clamp ``p`` to [1e-12, 1 - 1e-12].
    """

    needs_target = True

    def __init__(self, module: nn.Module, *, class_dim: int | None = None, prepare: str | None = None) -> None:
        super().__init__()
        if not is_torch_loss(module):
            raise ValueError(f"TorchLoss needs a torch.nn loss module (one with a `reduction`), got {module!r}")
        reduction = str(module.reduction)
        if reduction not in _MODULE_REDUCTIONS:
            raise ValueError(
                f"{module_name(module)}(reduction={reduction!r}) gives no batch value; give it "
                "reduction='mean' (the default) or 'sum': lossport runs it per example itself (missing labels, "
                "sample weights; objective(..., per_example=True) returns the per-example values)"
            )
        if prepare not in _PREPARES:
            raise ValueError(f"prepare must be one of {_PREPARES}, not {prepare!r}")
        _check_takes_input_and_target(module)
        # a shallow copy: the parameters (a learned loss's) stay the given module's, so its optimizer still trains
        # them; its own buffer table, so moving the class weights to the input's device leaves the module as it is
        inner = copy.copy(module)
        inner._buffers = dict(module._buffers)
        inner.reduction = "none"  # type: ignore[assignment]
        self.inner = inner
        self.rule = reduction
        self.class_dim = class_dim
        self.prepare = prepare

    @property
    def expects(self) -> str | None:
        """What the module's input must hold: ``"index"`` class scores for a softmax (``CrossEntropyLoss``),
        ``"binary"`` logits for a sigmoid (``BCEWithLogitsLoss``), ``"log"`` log-probabilities (``NLLLoss``,
        ``KLDivLoss``); None when it is not about scores or probabilities."""
        if isinstance(self.inner, nn.CrossEntropyLoss):
            return "index"
        if isinstance(self.inner, nn.BCEWithLogitsLoss):
            return "binary"
        if isinstance(self.inner, (nn.NLLLoss, nn.KLDivLoss)):
            return "log"
        return None

    def adapted(self, *, class_dim: int | None = None, prepare: str | None = None) -> TorchLoss:
        """A copy (sharing the inner module) with another class dim and/or input preparation."""
        new = copy.copy(self)
        new.class_dim = self.class_dim if class_dim is None else class_dim
        new.prepare = self.prepare if prepare is None else prepare
        return new

    def describe(self) -> str:
        extra = f", class_dim={self.class_dim}" if self.class_dim is not None else ""
        extra += f", from {self.prepare} of the probabilities" if self.prepare else ""
        return f"{module_name(self.inner)} (reduction={self.rule!r}, per example{extra})"

    def extra_repr(self) -> str:
        return f"reduction={self.rule!r}, class_dim={self.class_dim}, prepare={self.prepare!r}"

    def forward(
        self, input: Tensor, target: Tensor, sample_weight: Tensor | None = None, reduction: str = "mean"
    ) -> Tensor:
        """``reduction="mean"``: the batch value by the module's own reduction; ``"none"``: per-example values
        (shape (B,), NaN for an example without labels); ``"sum"``: ``sum_e a_e l_e``."""
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, not {reduction!r}")
        x, y, mask, den = self._prepared(input, target)
        self._match_device(x)
        vals = self.inner(x, y)
        name = module_name(self.inner)
        if not isinstance(vals, Tensor) or vals.dim() == 0 or vals.shape[0] != x.shape[0]:
            got = tuple(vals.shape) if isinstance(vals, Tensor) else type(vals).__name__
            raise ValueError(
                f"{name} with reduction='none' returned {got} for a batch of {x.shape[0]}: no per-example "
                "values, so missing labels and sample weights cannot be applied; wrap it to use its value as is: "
                "lossport.CustomLoss(loss, target=True)"
            )
        if vals.numel() > x.numel():
            raise ValueError(
                f"{name}: the target of shape {tuple(y.shape)} and the output of shape {tuple(x.shape)} were "
                f"broadcast to {tuple(vals.shape)}; give a target of the output's shape"
            )
        mask = _values_mask(name, mask, vals)  # class-index targets (den) have the values' shape already
        return _reduce_module(name, vals, mask, den, sample_weight, self.rule, reduction)

    def _prepared(self, input: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(input, target with missing entries filled, element mask of the target, class-weight denominators)."""
        x = input
        if self.prepare is not None:
            p = input.clamp(1e-12, 1 - 1e-12)
            x = p.log() if self.prepare == "log" else p.log() - (-p).log1p()
        if not isinstance(target, Tensor):
            target = torch.as_tensor(target, device=x.device)
        if isinstance(self.inner, (nn.CrossEntropyLoss, nn.NLLLoss)):
            return self._class_prepared(x, target)
        y = target
        if y.shape != x.shape and x.dim() >= 1:
            y = _reshape_if_same(x, y)
        mask = _float_target_mask(y)
        if y.is_floating_point():
            y = torch.where(mask, y, torch.zeros((), dtype=y.dtype, device=y.device)).to(x.dtype)
        return x, y, mask, None

    def _class_prepared(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        ignore = int(getattr(self.inner, "ignore_index", IGNORE_INDEX))
        probabilities = y.is_floating_point() and y.shape == x.shape
        if x.dim() >= 2:
            dim = self._class_dim(x, y, probabilities)
            if dim != 1:
                x = x.movedim(dim, 1)
                y = y.movedim(dim, 1) if probabilities else y
        if probabilities:
            mask = _float_target_mask(y)
            return x, torch.where(mask, y, torch.zeros_like(y)).to(x.dtype), mask, None
        if y.is_floating_point():
            nan = torch.isnan(y)
            y = torch.where(nan, torch.full_like(y, ignore), y)
            if not torch.equal(y, y.round()):
                raise ValueError(f"{module_name(self.inner)}: class targets must be whole numbers (or NaN)")
            y = y.long()
        if x.dim() >= 1:
            y = _reshape_if_same(x[:, 0] if x.dim() >= 2 else x, y)  # a (B, 1) label column for (B, C) scores
        mask = y != ignore
        weight = getattr(self.inner, "weight", None)
        den = None
        if isinstance(weight, Tensor):
            safe = torch.where(mask, y, torch.zeros_like(y)).clamp(0, weight.numel() - 1)
            den = weight.to(device=x.device, dtype=x.dtype)[safe]
        return x, y, mask, den

    def _class_dim(self, x: Tensor, y: Tensor, probabilities: bool) -> int:
        """The given class dim, else torch's dim 1, or the last dim when only it fits index targets."""
        if self.class_dim is not None:
            return resolve_class_dim(x.shape, y.shape, self.class_dim, "index")
        last = x.dim() - 1
        if probabilities or last <= 1 or _without(x.shape, 1) == tuple(y.shape):
            return 1
        return last if _without(x.shape, last) == tuple(y.shape) else 1

    def _match_device(self, x: Tensor) -> None:
        """Put the copy's own buffers (class weights, ``pos_weight``) on the input's device and floating dtype."""
        table = self.inner._buffers
        for key, buf in table.items():
            if buf is None:
                continue
            dtype = x.dtype if buf.is_floating_point() and x.is_floating_point() else buf.dtype
            if buf.device != x.device or buf.dtype != dtype:
                table[key] = buf.to(device=x.device, dtype=dtype)


def _reshape_if_same(x: Tensor, y: Tensor) -> Tensor:
    """A (B,) target for a (B, 1) output and the reverse: reshaped, never broadcast to (B, B)."""
    same_rows = y.numel() == x.numel() and y.shape[:1] == x.shape[:1]
    if same_rows and [d for d in x.shape[1:] if d != 1] == [d for d in y.shape[1:] if d != 1]:
        return y.reshape(x.shape)
    return y


def _values_mask(name: str, mask: Tensor, vals: Tensor) -> Tensor:
    """The target's element mask mapped onto the values' shape (a class dim or all non-batch dims reduced)."""
    if mask.shape == vals.shape:
        return mask
    b = vals.shape[0]
    if bool(mask.all()):
        return torch.ones(vals.shape, dtype=torch.bool, device=vals.device)
    if mask.dim() == vals.dim() + 1 and _without(mask.shape, 1) == tuple(vals.shape):
        return mask.all(1)  # a class dim reduced away: a row with a missing entry is missing
    if vals.dim() == 1 and mask.shape[:1] == vals.shape:
        return mask.reshape(b, -1).all(1)  # one value per example: missing if any entry is
    if mask.dim() == vals.dim():
        try:
            return torch.broadcast_to(mask, vals.shape)
        except RuntimeError:
            pass
    raise ValueError(
        f"{name}: missing labels in a target of shape {tuple(mask.shape)} cannot be matched to its per-element "
        f"values of shape {tuple(vals.shape)}; fill the missing targets or use a lossport loss layer"
    )


def _example_weights(name: str, vals: Tensor, sample_weight: Tensor | None) -> Tensor:
    """Sample weights broadcast to the values: a scalar, one per example (B,), or the values' shape."""
    sw = _sample_weights(vals, sample_weight)
    if sample_weight is not None and sample_weight.dim() > 1 and sw.shape != vals.shape:
        raise ValueError(
            f"{name}: sample weights of shape {tuple(sw.shape)} do not fit its per-element values of shape "
            f"{tuple(vals.shape)}; give one weight per example, shape ({vals.shape[0]},)"
        )
    return sw


def _reduce_module(
    name: str, vals: Tensor, mask: Tensor, den: Tensor | None, sample_weight: Tensor | None, rule: str, reduction: str
) -> Tensor:
    """The reductions of :class:`TorchLoss` (its docstring states them)."""
    sw = _example_weights(name, vals, sample_weight)
    zero = torch.zeros((), dtype=vals.dtype, device=vals.device)
    v = torch.where(mask, vals, zero)
    a = mask.to(vals.dtype) * sw
    b = vals.shape[0]
    labelled = mask.reshape(b, -1).any(1)
    if reduction == "none":
        if rule == "mean":
            d = a if den is None else a * den
            return (v * a).reshape(b, -1).sum(1) / d.reshape(b, -1).sum(1)
        per = v.reshape(b, -1).sum(1)
        return torch.where(labelled, per, torch.full_like(per, float("nan")))
    if reduction == "sum" or rule == "sum":
        return (v * a).sum()
    if rule == "mean":
        return (v * a).sum() / (a if den is None else a * den).sum()
    if sample_weight is not None and sample_weight.dim() > 1:
        raise ValueError(f"{name}(reduction='batchmean') takes one sample weight per example, shape ({b},)")
    w = labelled.to(vals.dtype) * (sw.reshape(-1) if sw.dim() else sw)
    return (v * a).sum() / w.sum()


_FUNCTIONAL_LOSSES: dict[object, type[nn.Module]] = {
    F.cross_entropy: nn.CrossEntropyLoss,
    F.nll_loss: nn.NLLLoss,
    F.binary_cross_entropy_with_logits: nn.BCEWithLogitsLoss,
    F.binary_cross_entropy: nn.BCELoss,
    F.mse_loss: nn.MSELoss,
    F.l1_loss: nn.L1Loss,
    F.huber_loss: nn.HuberLoss,
    F.smooth_l1_loss: nn.SmoothL1Loss,
    F.kl_div: nn.KLDivLoss,
}
"""``torch.nn.functional`` losses given as specs run as their module with default arguments (same value)."""


def torch_loss(spec: object) -> TorchLoss | None:
    """The :class:`TorchLoss` for a ``torch.nn`` loss module or a known ``torch.nn.functional`` loss, else None."""
    if isinstance(spec, TorchLoss):
        return spec
    if is_torch_loss(spec):
        return TorchLoss(spec)  # type: ignore[arg-type]
    try:
        module = _FUNCTIONAL_LOSSES.get(spec)
    except TypeError:  # unhashable
        return None
    return None if module is None else TorchLoss(module())


# -- ports ----------------------------------------------------------------------------------------------------


def port_loss(
    name: str, value: Tensor, batch_size: int, sample_weight: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """The value of an output that already is a loss (Wolfram's ``"port"``), and its per-example values.

    A scalar is the loss. An array whose first dimension is the batch (size ``batch_size``) holds per-example
    losses: each example's entries are summed, then the batch is averaged (weighted by the sample weights when
    given), as Wolfram does ("when it is an array, the loss value is computed as the sum of elements", per
    example, and the batch loss is the mean over examples) and as lossport does for callables. Any other array
    (no batch dimension) is summed. Sample weights need per-example values: with a scalar they raise.
    """
    if value.dim() == 0 or value.shape[0] != batch_size:
        if sample_weight is not None:
            raise LossSpecError(
                f"part {name!r}: sample weights were given but the loss output has shape {tuple(value.shape)} "
                f"without a batch dimension of {batch_size}; return per-example losses so they can be weighted"
            )
        return (value if value.dim() == 0 else value.sum()), None
    per = value.reshape(batch_size, -1).sum(1)
    if sample_weight is None:
        return per.mean(), per
    w = sample_weight.to(per.dtype).reshape(-1)
    if w.shape[0] != batch_size:
        raise LossSpecError(f"part {name!r}: {w.shape[0]} sample weights for {batch_size} examples")
    return (per * w).sum() / w.sum(), per


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
