"""Static balancers: weights that never change.

* :class:`EqualWeights` (``"ew"``, ``"equal"``): ``b_i = 1``, the plain sum of the (statically weighted) parts,
  as Keras, LibMTL's EW and the "LS" baseline of Nash-MTL / FAMO.
* :class:`Static` (``"static"``): fixed factors ``c_i`` on top of the spec's weights (a scalarization, the
  grid-searched baseline of Sener & Koltun 2018, Kurin et al. 2022, Xin et al. 2022).

Neither keeps state; a part missing from a batch simply has no term.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..result_types import Losses
from .base import Balancer, Context, register


@register("ew", "sum", "equal", "equal_weights")
class EqualWeights(Balancer):
    """Equal weighting: ``b_i = 1``, so the total is ``sum_i s_i L_i`` with the spec's static weights ``s_i``.

    LibMTL's EW docstring says ``1/T`` but its code sums with weight 1, as here (factor 1 to LibMTL's code,
    ``T`` to the mean). Cost: nothing beyond the one backward of the total.
    """

    name = "ew"
    kind = "static"

    def __call__(self, losses: Losses, context: Context | None = None) -> Losses:
        """``losses`` itself: with ``b_i = 1`` the applied weights are the static ones, already in place."""
        self.check_context(context)
        return losses

    def balance(self, losses: Losses) -> dict[str, float]:
        return dict.fromkeys(losses.parts, 1.0)


@register("static")
class Static(Balancer):
    """Fixed balancer weights ``b_i = c_i`` on top of the spec's static weights (``w_i = s_i c_i``).

    Args:
        weights: ``{part: c_i}``; parts not named get ``c_i = 1`` (so ``Static()`` is :class:`EqualWeights`).
            Every factor must be a finite number ``>= 0``; a name that is not a part of the objective raises
            an error at the first call (listing the parts).

    Usually the spec's ``weights=`` is the place for fixed weights; ``Static`` is there to put a
    scalarization in the ``balance=`` slot (for example to compare it with adaptive methods in one loop).
    """

    name = "static"
    kind = "static"

    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.weights: dict[str, float] = {}
        for k, v in (weights or {}).items():
            f = float(v)
            if not f >= 0 or f == float("inf"):
                raise ValueError(f"Static: weight of {k!r} must be a finite number >= 0, not {v!r}")
            self.weights[k] = f
        self._checked = False

    def balance(self, losses: Losses) -> dict[str, float]:
        if not self._checked:
            known = set(losses.parts) | set(losses.missing)
            unknown = sorted(k for k in self.weights if k not in known)
            if unknown:
                raise ValueError(
                    f"Static: weights given for {unknown}, which are not loss parts; the parts are {sorted(known)}"
                )
            self._checked = True
        return {k: self.weights.get(k, 1.0) for k in losses.parts}

    def __repr__(self) -> str:
        return f"Static(weights={self.weights})"
