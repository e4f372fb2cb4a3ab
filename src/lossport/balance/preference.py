"""Preference-ray scalarizations: weights from the gradient of a scalarization of the loss vector along a ray.

A scalarization ``S(L)`` of the vector ``L = (L_1, ..., L_T)`` of the parts present is minimised by one backward
of ``sum_i b_i L_i`` with ``b_i = c * dS/dL_i`` (detached): the gradient of ``S`` with respect to the net is
``sum_i dS/dL_i grad L_i``. The factor ``c`` maps the scalarization to lossport's convention (equal weighting is
``b = 1``) and is stated per method. Both methods here take a *preference ray* ``r`` (one positive number per
part; default: the same for every part): the trade-off the scalarization aims for.

* :class:`COSMOS` (Ruchte & Grabocka, "Scalable Pareto Front Approximation for Deep Multi-Objective Learning",
  ICDM 2021): ``S = r^T L - lambda cos(r, L)``.
* :class:`PBI` (penalty-based boundary intersection; Zhang & Li, "MOEA/D: A Multiobjective Evolutionary
  Algorithm Based on Decomposition", IEEE TEVC 2007): ``S = d_1 + theta d_2``, the distance along the ray plus
  ``theta`` times the distance to it.

Both are TorchJD 0.18's ``torchjd.scalarization.COSMOS`` and ``PBI`` (their weights are the gradients of those
scalarizers times ``c``; tested). The ray is fixed: a balancer weighs the losses of a given net, so the rays that
COSMOS draws from a Dirichlet distribution at each batch *and feeds to the net as an input* (which is what lets one
COSMOS net cover the Pareto front) are outside what a balancer can do; one ray gives one trade-off.

A part missing from a batch is left out: the ray of the parts present is used (renormalised where the method
normalises it), and ``T`` counts the parts present. The weights are numbers computed from detached values; each
costs one forward and one backward per step, like the plain sum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..result_types import Losses
from .base import Balancer, register
from .loss_level import _floats


def _check_ray(method: str, ray: Mapping[str, float] | None) -> dict[str, float] | None:
    """The ray as floats, checked: every entry finite and > 0 (a direction in the positive orthant)."""
    if ray is None:
        return None
    if not isinstance(ray, Mapping) or not ray:
        raise ValueError(f"{method}: ray must be a non-empty dict {{part: r_i}} or None (the same for every part)")
    out = {str(k): float(v) for k, v in ray.items()}
    for k, v in out.items():
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{method}: ray entry of part {k!r} is {v}; every entry of the ray must be finite and > 0")
    return out


def _ray_of(method: str, ray: dict[str, float] | None, names: list[str]) -> list[float]:
    """The ray entries of the parts present, in ``names`` order (all ones without a ray)."""
    if ray is None:
        return [1.0] * len(names)
    absent = [k for k in names if k not in ray]
    if absent:
        raise ValueError(
            f"{method}: the ray has no entry for the parts {absent} (it has {sorted(ray)}); give ray= an entry for "
            "every part of the objective"
        )
    return [ray[k] for k in names]


def _finite_values(method: str, losses: Losses) -> list[float]:
    vals = _floats(losses)
    bad = [k for k, v in zip(losses.names, vals) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{method}: the parts {bad} are not finite; no scalarization weights can be computed")
    return vals


# ------------------------------------------------------------------------------------------------------
@register("cosmos")
class COSMOS(Balancer):
    """COSMOS's scalarization (Ruchte & Grabocka, ICDM 2021): ``S(L) = r^T L - lambda cos(r, L)`` with
    ``cos(r, L) = r^T L / (||r|| ||L||)`` and the ray ``r`` on the simplex (the paper draws it from a Dirichlet
    distribution). The cosine term pulls the loss vector towards the ray, which is what places the solution on
    the ray's part of the Pareto front.

    Gradient (closed form): ``dS/dL_i = r_i - lambda (r_i / (||r|| ||L||) - (r^T L) L_i / (||r|| ||L||^3))``;
    ``b_i = T dS/dL_i``. Factor ``T``: with ``lambda = 0`` and the uniform ray (``r_i = 1/T``) this is equal
    weighting, ``b = 1``. With a large ``lambda`` a weight can be negative: the penalty then asks that part's loss
    to *grow* towards the ray (that is the method, not an error). When every part is exactly 0 the cosine is
    undefined and only ``r`` is used. TorchJD's ``scalarization.COSMOS(lambda_, weights=r)``: our weights are
    ``T`` times its gradient (tested).

    :param lambda_: the weight of the cosine penalty (``>= 0``; ``0`` is linear scalarization along ``r``).
        The paper tunes it per data set (TorchJD, which has no default, reports values from 0.01 to 8); the default
        here is 1.
    :param ray: ``{part: r_i}``, positive; normalised to sum 1 over the parts present (the paper's rays lie on
        the simplex). ``None``: the uniform ray.

    COSMOS proper also feeds the ray to the net as an input and draws a new ray per batch, so that one net covers
    the whole front; a balancer cannot condition the net, so this is the scalarization with one fixed ray (see
    the module docstring). No state.
    """

    name = "cosmos"
    kind = "loss"

    def __init__(self, lambda_: float = 1.0, ray: Mapping[str, float] | None = None) -> None:
        super().__init__()
        if not (lambda_ >= 0 and math.isfinite(lambda_)):
            raise ValueError(f"COSMOS: lambda_ (the cosine penalty) must be finite and >= 0, not {lambda_!r}")
        self.lambda_ = float(lambda_)
        self.ray = _check_ray("COSMOS", ray)

    def balance(self, losses: Losses) -> dict[str, float]:
        names = losses.names
        L = _finite_values("COSMOS", losses)
        raw = _ray_of("COSMOS", self.ray, names)
        r = [v / sum(raw) for v in raw]
        T = len(names)
        norm_r = math.sqrt(sum(v * v for v in r))
        norm_L = math.sqrt(sum(v * v for v in L))
        self.info = {}
        if self.lambda_ == 0 or norm_L == 0:
            grad = r
        else:
            rl = sum(a * b for a, b in zip(r, L))
            cos = rl / (norm_r * norm_L)
            self.info["cosmos/cos"] = cos
            grad = [
                ri - self.lambda_ * (ri / (norm_r * norm_L) - rl * li / (norm_r * norm_L**3)) for ri, li in zip(r, L)
            ]
        return {k: T * g for k, g in zip(names, grad, strict=True)}

    def __repr__(self) -> str:
        return f"COSMOS(lambda_={self.lambda_}, ray={self.ray})"


# ------------------------------------------------------------------------------------------------------
_PBI_EPS = 1e-12
"""Added under the square root of ``d_2`` (as TorchJD): the gradient stays finite on the ray itself."""


@register("pbi", "penalty_boundary_intersection")
class PBI(Balancer):
    """Penalty-based boundary intersection (Zhang & Li, MOEA/D, IEEE TEVC 2007): with ``f = L - z*`` (``z*`` the
    reference, ideal point) and the unit ray ``w = r / ||r||``,
    ``d_1 = f^T w`` (the distance along the ray), ``d_2 = ||f - d_1 w||`` (the distance to it),
    ``S = d_1 + theta d_2`` (MOEA/D writes ``d_1 = |f^T w|``; the same wherever ``f^T w >= 0``, e.g. for
    ``L >= z*``, as with the ideal point; TorchJD and lossport use ``f^T w``).

    Gradient (closed form): ``dS/dL = w + theta p / sqrt(||p||^2 + eps)`` with ``p = f - d_1 w`` and
    ``eps = 1e-12`` (as TorchJD, so that the gradient is finite on the ray); ``b_i = sqrt(T) dS/dL_i``.
    Factor ``sqrt(T)``: with ``theta = 0`` and the uniform ray this is equal weighting, ``b = 1``. The penalty
    term can make a weight negative (the part's loss is asked to grow back onto the ray). TorchJD's
    ``scalarization.PBI(theta, weights=r, reference=z*)``: our weights are ``sqrt(T)`` times its gradient
    (tested).

    :param theta: the penalty on the distance to the ray (``>= 0``; 5, the MOEA/D paper's value).
    :param ray: ``{part: r_i}``, positive (only its direction matters); ``None``: the uniform ray.
    :param reference: ``None`` (the origin, TorchJD's default: fits losses ``>= 0``), ``{part: z*_i}``, or
        ``"ideal"``: MOEA/D's running ideal point, the smallest value of each part seen on training calls so
        far (including the current one), kept per part name in the state dict.
    """

    name = "pbi"
    kind = "loss"

    def __init__(
        self,
        theta: float = 5.0,
        ray: Mapping[str, float] | None = None,
        reference: Mapping[str, float] | str | None = None,
    ) -> None:
        super().__init__()
        if not (theta >= 0 and math.isfinite(theta)):
            raise ValueError(
                f"PBI: theta (the penalty on the distance to the ray) must be finite and >= 0, not {theta!r}"
            )
        self.theta = float(theta)
        self.ray = _check_ray("PBI", ray)
        if isinstance(reference, str):
            if reference != "ideal":
                raise ValueError(f"PBI: reference must be None, a dict {{part: z*_i}} or 'ideal', not {reference!r}")
            self.reference: dict[str, float] | str | None = "ideal"
        elif reference is None:
            self.reference = None
        else:
            self.reference = {str(k): float(v) for k, v in reference.items()}
            bad = [k for k, v in self.reference.items() if not math.isfinite(v)]
            if bad:
                raise ValueError(f"PBI: the reference of the parts {bad} is not finite")
        self._ideal: dict[str, float]
        self.add_state("_ideal", {})  # reference="ideal": the smallest value of each part seen in training

    def _reference(self, names: list[str], L: list[float]) -> list[float]:
        if self.reference is None:
            return [0.0] * len(names)
        if self.reference == "ideal":
            ideal = {k: min(self._ideal.get(k, v), v) for k, v in zip(names, L)}
            if torch.is_grad_enabled():  # training calls move the ideal point; evaluations read it
                self._ideal.update(ideal)
            return [ideal[k] for k in names]
        assert isinstance(self.reference, dict)
        absent = [k for k in names if k not in self.reference]
        if absent:
            raise ValueError(
                f"PBI: the reference has no entry for the parts {absent} (it has {sorted(self.reference)}); give "
                "reference= an entry for every part, or reference='ideal'"
            )
        return [self.reference[k] for k in names]

    def balance(self, losses: Losses) -> dict[str, float]:
        names = losses.names
        L = _finite_values("PBI", losses)
        r = _ray_of("PBI", self.ray, names)
        nr = math.sqrt(sum(v * v for v in r))
        w = [v / nr for v in r]
        f = [a - b for a, b in zip(L, self._reference(names, L))]
        d1 = sum(a * b for a, b in zip(f, w))
        p = [fi - d1 * wi for fi, wi in zip(f, w)]
        d2 = math.sqrt(sum(v * v for v in p) + _PBI_EPS)
        self.info = {"pbi/d1": d1, "pbi/d2": d2}
        c = math.sqrt(len(names))
        return {k: c * (wi + self.theta * pi / d2) for k, wi, pi in zip(names, w, p, strict=True)}

    @property
    def ideal(self) -> dict[str, float]:
        """``reference="ideal"``: the ideal point so far, per part (empty before the first training call)."""
        return dict(self._ideal)

    def __repr__(self) -> str:
        return f"PBI(theta={self.theta}, ray={self.ray}, reference={self.reference!r})"


__all__ = ["COSMOS", "PBI"]
