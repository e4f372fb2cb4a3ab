"""GO4Align: group risk minimisation, a loss-level method that balances groups of similar parts.

Shen, Wang, Xiao, Van Noord, Worring, "GO4Align: Group Optimization for Multi-Task Alignment" (NeurIPS 2024,
arXiv 2404.06486); the update rule below is that of the authors' code (github.com/autumn9999/GO4Align,
``methods/cluster_methods.py``, class ``GO4ALIGN``), read for this module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import ClassVar

from ..result_types import Losses
from .base import Balancer, register
from .loss_level import _positive, _training, _values


def kmeans_1d(values: Sequence[float], k: int) -> list[float]:
    """The exact K-means clustering of numbers: each value replaced by the mean of its cluster, for the
    partition into at most ``k`` clusters of least total squared distance to the cluster means.

    In one dimension the optimal clusters are runs of the sorted values, so dynamic programming over the sorted
    values finds the global optimum (Wang & Song, "Ckmeans.1d.dp", The R Journal 2011) in ``O(k n^2)``. Ties
    between equally good partitions go to the one whose last cluster starts earliest."""
    n = len(values)
    if n == 0:
        return []
    k = max(1, min(k, n))
    order = sorted(range(n), key=lambda i: values[i])
    v = [float(values[i]) for i in order]
    s1, s2 = [0.0], [0.0]
    for x in v:
        s1.append(s1[-1] + x)
        s2.append(s2[-1] + x * x)

    def sse(a: int, b: int) -> float:  # values v[a:b]
        m = b - a
        return max(s2[b] - s2[a] - (s1[b] - s1[a]) ** 2 / m, 0.0)

    inf = math.inf
    cost = [[inf] * (n + 1) for _ in range(k + 1)]
    start = [[0] * (n + 1) for _ in range(k + 1)]
    cost[0][0] = 0.0
    for c in range(1, k + 1):
        for b in range(1, n + 1):
            for a in range(c - 1, b):
                val = cost[c - 1][a] + sse(a, b)
                if val < cost[c][b] - 1e-15 * (1.0 + abs(val)):
                    cost[c][b], start[c][b] = val, a
    best = min(range(1, k + 1), key=lambda c: cost[c][n])
    out = [0.0] * n
    b, c = n, best
    while c > 0:
        a = start[c][b]
        mean = (s1[b] - s1[a]) / (b - a)
        for j in range(a, b):
            out[order[j]] = mean
        b, c = a, c - 1
    return out


@register("go4align")
class GO4Align(Balancer):
    """GO4Align (Shen et al., NeurIPS 2024): adaptive group risk minimisation.

    At every training step, with ``L_i`` the parts present:

    1. Risk-guided probabilities (the authors' code): ``p_i <- p_i exp(-robust_step_size * L_i)``, renormalised
       to sum to 1 (``p = 1/T`` at the start).
    2. Indicators ``w_i = p_i * (sum_j L_j) / L_i``: with ``p`` uniform each weighted part is ``mean_j L_j``, the
       parts' scales are equalised.
    3. Dynamic group assignment: the indicators are clustered into ``num_groups`` groups by K-means and every
       part gets its group's mean indicator, ``b_i = center(group(i))`` (``num_groups = 1``: the mean of all).

    :param num_groups: ``K``, the number of groups (the paper: 2 on NYUv2, 5 on QM9; the authors' NYUv2 script
        defaults to 1). ``K >= T`` leaves every indicator as it is.
    :param robust_step_size: the step of the exponentiated update of ``p`` (1e-4, the authors' default).
    :param eps: floor of a part's value in the division (a part at 0 gets ``eps``).

    Factor 1 to the authors' weights (not normalised: with ``p`` uniform and one group the total has the value of
    the plain sum ``sum_i L_i``). K-means here is exact (:func:`kmeans_1d`, deterministic): the authors call a
    Lloyd-style K-means from random centres, which can stop at a worse partition. Missing parts: ``p`` is kept
    per part name; the parts present share the probability mass they had (renormalised among themselves for
    the indicators), an absent part's ``p`` is left unchanged. Calls under ``torch.no_grad()`` read ``p`` without
    updating it. Losses must be ``>= 0``."""

    name = "go4align"
    kind: ClassVar[str] = "loss"

    def __init__(self, num_groups: int = 2, robust_step_size: float = 1e-4, eps: float = 1e-12) -> None:
        super().__init__()
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"GO4Align: num_groups must be an integer >= 1, not {num_groups!r}")
        if not robust_step_size >= 0:
            raise ValueError(f"GO4Align: robust_step_size must be >= 0, not {robust_step_size!r}")
        if not eps > 0:
            raise ValueError(f"GO4Align: eps must be > 0, not {eps!r}")
        self.num_groups = num_groups
        self.robust_step_size = float(robust_step_size)
        self.eps = float(eps)
        self._p: dict[str, float]
        self.add_state("_p", {})  # probability per part name (floats: host numbers)

    def _probabilities(self, vals: Mapping[str, float], names: list[str], known: list[str]) -> dict[str, float]:
        """``p`` after this step's exponentiated update of the parts ``names`` present. ``known``: every part of
        the objective in this batch (present or missing). At the first call every part starts at ``1 / N``;
        a part first seen later enters with the mean probability of the others, and all are renormalised."""
        p = dict(self._p)
        new = [k for k in known if k not in p]
        start = sum(p.values()) / len(p) if p else 1.0 / len(known)
        for k in new:
            p[k] = start
        if new:
            total = sum(p.values())
            p = {k: v / total for k, v in p.items()}
        mass = sum(p[k] for k in names)
        low = min(vals[k] for k in names)  # shifted exponent: the same ratios, no underflow
        upd = {k: p[k] * math.exp(-self.robust_step_size * (vals[k] - low)) for k in names}
        norm = sum(upd.values())
        p.update({k: mass * v / norm for k, v in upd.items()})
        return p

    def balance(self, losses: Losses) -> dict[str, float]:
        vals = _values(losses)
        names = losses.names
        for k in names:
            _positive("GO4Align", k, vals[k])
        if not names:
            return {}
        p = self._probabilities(vals, names, names + [k for k in losses.missing if k not in losses.parts])
        if _training():
            self._p = p
        present = sum(p[k] for k in names)
        total = sum(vals.values())
        indicators = [p[k] / present * total / max(vals[k], self.eps) for k in names]
        weights = kmeans_1d(indicators, self.num_groups)
        for k, ind in zip(names, indicators):
            self.info[f"go4align/indicator/{k}"] = ind
            self.info[f"go4align/p/{k}"] = p[k]
        return dict(zip(names, weights))

    def __repr__(self) -> str:
        return f"GO4Align(num_groups={self.num_groups}, robust_step_size={self.robust_step_size})"


__all__ = ["GO4Align", "kmeans_1d"]
