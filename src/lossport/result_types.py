"""`Losses`: what evaluating an objective on one batch gives.

Conventions (shared by the objective, every balancer and the trainer):

* ``parts[name]`` is the *unweighted* value of a loss part: a scalar tensor, attached to the autograd graph,
  the mean over the labelled examples of the batch (see :mod:`lossport.objective`).
* ``weights[name]`` is the weight applied to that part. The objective fills it with the static weight of the
  spec (``weights=`` times any ``Scaled`` factor); a balancer replaces it with ``static * balancer_weight``.
* ``extra`` holds terms added to the total that are not task parts: L1/L2 regularization parts and terms a
  balancer adds (the ``log sigma`` term of uncertainty weighting, for example). Their values are final.
* ``total = sum_i weights[i] * parts[i] + sum(extra)``: the scalar to backpropagate.
* ``missing`` lists the parts with no labelled example in the batch (or whose output the net did not return in
  this mode, e.g. auxiliary heads that exist only in training); they are not in ``parts``.

**The total's key.** In every flat record (``Losses.as_dict()``, history rows, tables) the key
:data:`TOTAL_KEY` (``"loss"``, Keras's) is the weighted total and nothing else. No part or extra term may be
named ``loss``: the objective names the parts of an output called ``loss`` (a Hugging Face model's)
``loss/<loss>``, e.g. ``loss/port`` (:func:`lossport.spec.compile_spec`), and :class:`Losses` refuses a part named
``loss``. Use :func:`part_key` when writing a part into a record keyed like the history.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

TOTAL_KEY = "loss"
"""The key of the weighted total in every flat record (``as_dict``, history rows, tables)."""


def part_key(name: str) -> str:
    """The record key of part (or extra term) ``name``: the name itself, which is never :data:`TOTAL_KEY`.

    Raises ``ValueError`` for a part named ``"loss"`` (it would overwrite or be read as the total); objectives
    never produce one (an output named ``loss`` gives parts ``loss/<loss>``)."""
    if name == TOTAL_KEY:
        raise ValueError(
            f"a part may not be named {TOTAL_KEY!r}: that key is the weighted total in every record; name it "
            f"'{TOTAL_KEY}/<something>' (lossport.Objective names the part of an output 'loss' 'loss/port')"
        )
    return name


def weighted_total(
    parts: Mapping[str, Tensor], weights: Mapping[str, Tensor | float], extra: Mapping[str, Tensor]
) -> Tensor:
    """``sum_i weights[i] * parts[i] + sum(extra)`` as a scalar tensor. With many parts and plain-number
    weights (or scalar tensor weights of the parts' dtype and device) the parts are stacked and dotted with the
    weights: two autograd nodes instead of ``2 T``."""
    ws = [weights[k] for k in parts]
    ps = list(parts.values())
    same = len(ps) > 4 and len({(p.dtype, p.device, p.dim()) for p in ps}) == 1
    if same and all(type(w) is float for w in ws):
        stacked = torch.stack(ps)
        plain = all(w == 1.0 for w in ws)  # the plain sum (equal weighting): no weight vector to build
        total = stacked.sum(0) if plain else stacked @ torch.tensor(ws, dtype=ps[0].dtype, device=ps[0].device)
        terms = [total, *extra.values()]
    elif (
        same
        and ps[0].dim() == 0
        and all(isinstance(w, Tensor) and w.dim() == 0 for w in ws)
        and (
            len({(w.dtype, w.device) for w in ws} | {(ps[0].dtype, ps[0].device)}) == 1  # type: ignore[union-attr]
        )
    ):  # scalar tensor weights of the parts' dtype (tensor static weights, say): a dot product too, gradient to both
        terms = [torch.stack(ps) @ torch.stack(ws), *extra.values()]  # type: ignore[arg-type]
    else:
        terms = [_times(p, w) for p, w in zip(ps, ws)] + list(extra.values())
    if not terms:
        raise ValueError("no loss part to sum: every part is missing from this batch and there is no extra term")
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def vector_total(parts: Mapping[str, Tensor], vector: Tensor, extra: Mapping[str, Tensor]) -> Tensor:
    """``vector . (parts in order) + sum(extra)``: :func:`weighted_total` with the weights as one tensor (learned
    weights attached to their parameters: one dot product, one autograd node for all of them)."""
    ps = list(parts.values())
    if not ps:
        return weighted_total(parts, {}, extra)
    stacked = _stack_scalars(ps)
    if stacked is not None:
        dt = torch.promote_types(stacked.dtype, vector.dtype)
        total = stacked.to(dt) @ vector.to(device=stacked.device, dtype=dt)
    else:
        terms = [p * w for p, w in zip(ps, vector.unbind(0), strict=True)]
        total = terms[0]
        for t in terms[1:]:
            total = total + t
    for t in extra.values():
        total = total + t
    return total


def _stack_scalars(ps: list[Tensor]) -> Tensor | None:
    """The scalar tensors ``ps`` as one vector (dtypes promoted), or ``None`` when they are not all scalars on one
    device."""
    if any(p.dim() for p in ps):
        return None
    try:
        return torch.stack(ps)
    except RuntimeError:  # parts on several devices
        return None


def _times(part: Tensor, w: Tensor | float) -> Tensor:
    return part if isinstance(w, float) and w == 1.0 else part * w


@dataclass
class Losses:
    """The loss parts of one batch, their weights and their weighted total."""

    parts: dict[str, Tensor]
    weights: dict[str, Tensor | float]
    extra: dict[str, Tensor] = field(default_factory=dict)
    missing: tuple[str, ...] = ()
    counts: dict[str, int] = field(default_factory=dict)
    """Number of labelled examples behind each part (for averaging over batches)."""
    outputs: Any = None
    """The net's outputs for this batch (by output name), for balancers that need the representation."""
    per_example: dict[str, Tensor] = field(default_factory=dict)
    """Per-example loss values of each part (NaN where unlabelled), detached."""
    _total: Tensor | None = None

    def __post_init__(self) -> None:
        for name in [*self.parts, *self.extra]:
            part_key(name)

    @property
    def total(self) -> Tensor:
        """The scalar to backpropagate: weighted parts plus the extra terms."""
        if self._total is None:
            self._total = weighted_total(self.parts, self.weights, self.extra)
        return self._total

    @property
    def names(self) -> list[str]:
        """Names of the parts present in this batch, in declaration order."""
        return list(self.parts)

    def stacked(self) -> Tensor:
        """The parts as one vector (declaration order), still attached to the graph."""
        return torch.stack([self.parts[k] for k in self.parts])

    def reweighted(
        self,
        weights: Mapping[str, Tensor | float],
        extra: Mapping[str, Tensor] | None = None,
        *,
        vector: Tensor | None = None,
    ) -> Losses:
        """A copy with new weights (and extra terms added to the existing ones); the total is recomputed.
        ``vector``: the same weights as one tensor over the parts in order, attached to the graph where a
        method trains through them (learned weights); the total is then ``vector . parts + extra``."""
        missing_w = [k for k in self.parts if k not in weights]
        if missing_w:
            raise ValueError(f"reweighted: no weight given for parts {missing_w}")
        new_extra = dict(self.extra)
        for k in extra or {}:
            part_key(k)
        new_extra.update(extra or {})
        out = object.__new__(type(self))  # the same parts (already checked), new weights, extra terms and total
        out.__dict__.update(self.__dict__)
        out.weights = {k: weights[k] for k in self.parts}
        out.extra = new_extra
        out._total = None if vector is None else vector_total(self.parts, vector, new_extra)
        return out

    def as_dict(self) -> dict[str, float]:
        """Floats: ``loss`` (:data:`TOTAL_KEY`, the weighted total), every part (unweighted), every extra term,
        and ``weight/<part>``."""
        out: dict[str, float] = {TOTAL_KEY: float(self.total.detach())}
        for k, v in self.parts.items():
            out[part_key(k)] = float(v.detach())
        for k, v in self.extra.items():
            out[part_key(k)] = float(v.detach())
        for k, w in self.weights.items():
            out[f"weight/{k}"] = float(w.detach()) if isinstance(w, Tensor) else float(w)
        return out
