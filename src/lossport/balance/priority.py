"""Priority-Constrained Descent (PCD): one primary part, the others guaranteed a share of progress.

Unlike every other balancer here, PCD is not symmetric in the parts: it follows the gradient of one *primary*
part as closely as possible, subject to every *secondary* part getting at least a fraction ``tau`` of the
first-order progress a step along its own normalised gradient would give. The rule is taken from TorchJD 0.18's
``PCD`` / ``PCDWeighting`` documentation, which cites "Not All Objectives Are Born Equal: Priority-Constrained
Descent for Hierarchical Multi-Objective Optimization" (TMLR 2026, arXiv 2606.29521, reference code
github.com/DaraVaram/priority-constrained-descent); the paper itself was not read here. The QP is solved first by
a complementarity solver, with exact fallbacks: an enumeration of the active sets up to 16 parts, a dual active-set
method (Goldfarb-Idnani, written here on the Gramian) above; the tests check the weights against TorchJD's.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..result_types import Losses
from ..solvers import SolverWarning, box_qp
from .base import register
from .gramian_base import GramianBalancer
from .weighting import check_gramian

_MAX_ENUMERATED = 16  # parts; up to here the exact fallback enumerates the 2^(T-1) active sets


def _independent(A: Tensor, dependence_tol: float) -> tuple[Tensor, Tensor]:
    """Whether the gradients with Gramian ``A`` (batched) are linearly independent: every Cholesky pivot (the
    squared norm of a gradient's component orthogonal to the earlier ones) above ``dependence_tol`` times the
    gradient's squared norm. Returns ``(L, independent)``."""
    L, info = torch.linalg.cholesky_ex(A)
    diag = A.diagonal(dim1=-2, dim2=-1)
    return L, (info == 0) & (L.diagonal(dim1=-2, dim2=-1) ** 2 > dependence_tol * diag).all(-1)


def _kkt_ok(Gs: Tensor, q: Tensor, mu: Tensor, atol: float, dependence_tol: float) -> bool:
    """``mu >= 0``, every slack ``q + Gs mu >= -tol`` and the constraints with ``mu_j > 0`` active
    (``slack_j <= tol``), with linearly independent active gradients: ``mu`` solves the dual, ``g_1 + sum_j
    mu_j g_j`` the primal. ``tol`` is ``atol`` plus 100 times the rounding error of the slacks (``eps_64 |Gs|
    mu``: large multipliers on nearly dependent gradients)."""
    if not bool(torch.isfinite(mu).all()) or float(mu.min()) < 0:
        return False
    slack = q + Gs @ mu
    tol = atol + 100 * torch.finfo(torch.float64).eps * (Gs.abs() @ mu)  # + the rounding error of the slacks
    active = (mu > 0).nonzero().flatten()
    independent = bool(_independent(Gs[active][:, active], dependence_tol)[1]) if active.numel() else True
    return independent and bool((slack >= -tol).all()) and bool((slack <= tol)[mu > 0].all())


def _enumerate_active_sets(Gs: Tensor, q: Tensor, atol: float, dependence_tol: float) -> Tensor | None:
    """The multipliers of the first active set (smallest first) of linearly independent gradients whose
    equality solution ``Gs_AA mu_A = -q_A`` is a KKT point; ``None`` if none is (infeasible constraints). A KKT
    point with independent active gradients exists whenever the constraints are feasible (Caratheodory), so
    the search is exact; a gradient counts as dependent on the earlier ones of its set when its orthogonal
    component has a squared norm below ``dependence_tol`` times its own."""
    n = Gs.shape[0]
    for k in range(1, n + 1):
        idx = torch.tensor(list(itertools.combinations(range(n), k)), dtype=torch.long, device=Gs.device)
        A = Gs[idx[:, :, None], idx[:, None, :]]
        L, indep = _independent(A, dependence_tol)
        muA = torch.cholesky_solve(-q[idx].unsqueeze(-1), L).squeeze(-1)
        mu = torch.zeros(idx.shape[0], n, dtype=Gs.dtype, device=Gs.device).scatter(1, idx, muA)
        slack = q + mu @ Gs
        ok = indep & torch.isfinite(muA).all(-1) & (muA >= 0).all(-1) & (slack >= -atol).all(-1)
        if bool(ok.any()):
            return mu[int(ok.nonzero()[0])]
    return None


def _step(G: Tensor, active: list[int], p: int, dependence_tol: float) -> tuple[Tensor, float]:
    """For a candidate constraint ``p`` and the active set ``A``: ``r`` solving ``G_AA r = G_Ap`` (the
    coefficients of ``g_p`` on the active gradients) and ``||z||^2 = G_pp - G_pA r``, the squared norm of
    ``g_p``'s component ``z`` orthogonal to them; ``0.0`` when it is below ``dependence_tol * G_pp`` (``g_p``
    depends on the active gradients)."""
    if not active:
        return G.new_zeros(0), float(G[p, p])
    idx = torch.tensor(active, dtype=torch.long, device=G.device)
    r = torch.linalg.solve(G[idx][:, idx], G[idx, p])
    z2 = float(G[p, p] - G[p, idx] @ r)
    return r, (z2 if z2 > dependence_tol * float(G[p, p]) else 0.0)


def _active_set(Gs: Tensor, q: Tensor, atol: float, dependence_tol: float) -> tuple[Tensor | None, bool]:
    """The dual multipliers ``mu`` of the PCD dual by a dual active-set method (Goldfarb & Idnani, "A numerically
    stable dual method for solving strictly convex quadratic programs", Math. Programming 27, 1983) for the
    identity Hessian, written on the Gramian: ``d = g_1 + sum_j mu_j g_j`` stays the minimiser with the
    constraints of the active set ``A`` as equalities. Each iteration takes the most violated constraint ``p``
    (slack ``q_p + (Gs mu)_p < -atol``) and raises ``mu_p`` by ``t`` while moving ``mu_A`` by ``-t r``
    (``G_AA r = G_Ap``) so the active constraints stay tight: the full step ``t = -slack_p / ||z||^2`` (``z``
    the part of ``g_p`` orthogonal to the active gradients) adds ``p`` to ``A``; a shorter step at which an active
    multiplier reaches 0 drops that constraint first. When ``g_p`` depends on the active gradients (``z = 0``) only
    the dropping step exists; without one the constraints are infeasible. The active gradients stay linearly
    independent, so each solve is well posed. Returns ``(mu, True)``, ``(None, True)`` when infeasible, or
    ``(mu, False)`` after ``20 T`` iterations (a guard against cycling by rounding)."""
    n = Gs.shape[0]
    mu = torch.zeros(n, dtype=Gs.dtype, device=Gs.device)
    active: list[int] = []
    for _ in range(20 * max(n, 1)):
        slack = q + Gs @ mu
        slack[active] = math.inf  # tight by construction; only an inactive constraint can enter
        p = int(slack.argmin())
        if float(slack[p]) >= -atol:
            return mu, True
        while True:  # raise mu_p until constraint p is tight, dropping the active constraints that block it
            r, z2 = _step(Gs, active, p, dependence_tol)
            t_full = -float(q[p] + Gs[p] @ mu) / z2 if z2 > 0 else math.inf
            ratios = [(float(mu[i]) / float(ri), k) for k, (i, ri) in enumerate(zip(active, r)) if float(ri) > 0]
            t_part, k = min(ratios) if ratios else (math.inf, -1)
            if math.isinf(t_full) and math.isinf(t_part):
                return None, True  # g_p is a non-positive combination of active gradients: infeasible
            t = min(t_full, t_part)
            if active:
                mu[active] -= t * r
            mu[p] += t
            if t_full <= t_part:
                active.append(p)
                break
            mu[active[k]] = 0.0
            del active[k]
    return mu, False


def pcd_direction(G: Tensor, taus: Tensor, tol: float = 1e-9, dependence_tol: float = 1e-9) -> Tensor:
    """The weights ``w = (1, mu_2, ..., mu_T)`` of ``d = g_1 + sum_j mu_j g_j``, the solution of::

        min_d 1/2 ||d - g_1||^2   s.t.   g_j^T d >= tau_j ||g_j||^2   (j = 2..T)

    from the Gramian ``G`` of ``g_1..g_T`` (row 0 is the primary); ``mu`` are the constraints' multipliers,
    the solution of the dual ``min_{mu >= 0} 1/2 mu^T G_SS mu + mu^T (G_S1 - tau * diag G_SS)`` (``S`` the
    secondaries). First by :func:`~lossport.solvers.box_qp`; if its answer fails the KKT check (a constraint
    violated by more than ``tol * max diag G``, or a positive multiplier on an inactive constraint: singular or
    ill-conditioned ``G_SS``), exactly: up to 16 parts by enumerating the active sets
    (:func:`_enumerate_active_sets`, ``2^(T-1)`` small solves), above by the dual active-set method
    (:func:`_active_set`, about ``T`` iterations; a ``ValueError`` if rounding defeats it too). When the
    constraints cannot all hold (two anti-parallel secondaries, say) returns ``(1, 0, ..., 0)``: the primary
    gradient alone, as TorchJD. With linearly dependent gradients ``mu`` is not unique (``d`` is)."""
    G = G.detach().to(torch.float64)
    T = G.shape[0]
    w = torch.zeros(T, dtype=torch.float64, device=G.device)
    w[0] = 1.0
    Gs = G[1:, 1:]
    q = G[1:, 0] - taus.to(G) * Gs.diagonal()
    atol = tol * max(float(G.diagonal().max()), torch.finfo(torch.float64).tiny)
    if T == 1 or float(q.min()) >= -atol:  # g_1 already satisfies every constraint
        return w
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)  # a failed solve is caught by the KKT check
        qp = box_qp(Gs, q[None], torch.zeros(1, T - 1, dtype=torch.float64, device=G.device))[0]
    mu: Tensor | None = qp
    if not _kkt_ok(Gs, q, qp, atol, dependence_tol):
        if T <= _MAX_ENUMERATED:
            mu = _enumerate_active_sets(Gs, q, atol, dependence_tol)
        else:
            mu, done = _active_set(Gs, q, atol, dependence_tol)
            if not done or (mu is not None and not _kkt_ok(Gs, q, mu, atol, dependence_tol)):
                raise ValueError(
                    f"PCD: neither the dual solver nor the active-set method solved the QP of {T} parts to the "
                    f"tolerance tol={tol:g} (rounding errors on a near-singular Gramian)"
                )
    if mu is not None:
        w[1:] = mu
    return w


def pcd(G: Tensor, taus: Tensor, scales: Tensor) -> Tensor:
    """PCD weights from the Gramian ``G`` (row 0 the primary) and the per-part scales ``s_i`` (``1 /
    sqrt(EMA of ||g_i||^2 + eps)``): :func:`pcd_direction` on the normalised gradients ``s_i g_i`` (Gramian
    ``G * s s^T``), then the direction ``d~`` rescaled to the primary gradient's norm: ``w_i = mu_i s_i ||g_1||
    / ||d~||``. Zero weights when ``g_1 = 0`` or ``d~ = 0`` up to rounding (``||d~||^2 <= 10 eps_64 (sum_i
    |mu_i| s_i ||g_i||)^2``)."""
    G = G.detach().to(torch.float64)
    scales = scales.to(G)
    sq = G.diagonal()
    out = torch.zeros_like(sq)
    if not float(sq[0]) > 0:
        return out
    Gn = G * torch.outer(scales, scales)
    w = pcd_direction(Gn, taus)
    norm2 = w @ Gn @ w
    magnitude = (w.abs() @ Gn.diagonal().clamp_min(0).sqrt()) ** 2
    if float(norm2) > 10 * torch.finfo(torch.float64).eps * float(magnitude):
        out = w * scales * (sq[0] / norm2).sqrt()
    return out


@register("pcd")
class PCD(GramianBalancer):
    """Priority-Constrained Descent (:mod:`lossport.balance.priority`, :func:`pcd`): with ``g~_i = s_i g_i``
    the gradients normalised by ``s_i = 1 / sqrt(v_i + eps)``, ``v_i`` the bias-corrected moving average of
    ``||g_i||^2`` with decay ``beta``, the update is ``d~ = argmin_d 1/2 ||d - g~_1||^2`` subject to ``g~_j^T d
    >= tau ||g~_j||^2`` for every secondary part ``j``, rescaled to the norm of the primary gradient ``g_1``.

    :param primary: the name of the primary part (default: the first part of the spec present in the batch).
        A batch in which a named primary part is missing raises an error (PCD has no direction to follow).
    :param tau: the guaranteed fraction (0.02, TorchJD's default), one number for every secondary part or a
        mapping from secondary part name to its own fraction (parts not named get 0.02).
    :param beta: decay of the moving average of the squared norms (0.999, TorchJD's default).
    :param eps: added to the average before the inverse square root (1e-8).

    Factor 1 to TorchJD's weights: without conflict (``g_1`` already gives each secondary its share) ``b = (1,
    0, ..., 0)``: the primary part alone trains, and a secondary part (its head included, since lossport
    applies the weights in one backward) gets a gradient only when its constraint is active. The moving
    averages are kept per part name, with their own step counts (a part missing from a batch keeps its
    average); with every part present in every batch they equal TorchJD's. Advanced only on the calls where
    the weights are computed (``every=K``)."""

    name = "pcd"
    kind: ClassVar[str] = "gramian"

    def __init__(
        self,
        primary: str | None = None,
        tau: float | Mapping[str, float] = 0.02,
        beta: float = 0.999,
        eps: float = 1e-8,
        **engine: Any,
    ) -> None:
        super().__init__(**engine)
        taus = tau.values() if isinstance(tau, Mapping) else [tau]
        if not all(isinstance(t, (int, float)) and 0.0 <= t <= 1.0 for t in taus):
            raise ValueError(f"PCD: tau must be in [0, 1] (a number or a mapping part -> number), not {tau!r}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"PCD: beta must be in [0, 1), not {beta!r}")
        if not eps >= 0.0:
            raise ValueError(f"PCD: eps must be >= 0, not {eps!r}")
        self.primary = primary
        self.tau = dict(tau) if isinstance(tau, Mapping) else float(tau)
        self.beta, self.eps = float(beta), float(eps)
        self._ema: dict[str, float]
        self._steps: dict[str, int]
        self.add_state("_ema", {})  # moving average of ||g_i||^2, per part name
        self.add_state("_steps", {})  # its step count, per part name

    def _tau(self, name: str) -> float:
        return float(self.tau.get(name, 0.02)) if isinstance(self.tau, dict) else self.tau

    def weigh(self, G: Tensor, losses: Losses) -> Tensor:
        G = check_gramian(G, "PCD")
        names = losses.names
        if isinstance(self.tau, dict) and (unknown := sorted(set(self.tau) - set(losses.parts) - set(losses.missing))):
            raise ValueError(f"PCD: tau names {unknown}, which are not parts of this objective ({names})")
        primary = names[0] if self.primary is None else self.primary
        if primary not in names:
            raise ValueError(
                f"PCD: the primary part {primary!r} is not present in this batch (parts present: {names}, missing: "
                f"{list(losses.missing)}); PCD needs it in every batch: give primary= a part labelled in every batch"
            )
        order = [names.index(primary)] + [i for i, k in enumerate(names) if k != primary]
        Go = G.to(torch.float64)[order][:, order]
        sq = Go.diagonal().tolist()
        scales = []
        for i, s in zip(order, sq):
            k = names[i]
            n = self._steps.get(k, 0) + 1
            ema = self.beta * self._ema.get(k, 0.0) + (1 - self.beta) * s
            self._ema[k], self._steps[k] = ema, n
            den = math.sqrt(ema / (1 - self.beta**n) + self.eps)
            scales.append(1 / den if den > 0 else 0.0)
        taus = torch.tensor([self._tau(names[i]) for i in order[1:]], dtype=torch.float64, device=Go.device)
        wo = pcd(Go, taus, torch.tensor(scales, dtype=torch.float64, device=Go.device))
        w = torch.empty_like(wo)
        w[order] = wo.to(w.device)
        return w

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", primary={self.primary!r}, tau={self.tau!r}, beta={self.beta})"


__all__ = ["PCD", "pcd", "pcd_direction"]
