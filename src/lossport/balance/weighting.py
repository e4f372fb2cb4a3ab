"""Gradient-level methods as functions ``G -> w`` of the Gramian ``G = J J^T`` of the parts' gradients.

Each returns weights ``w`` such that the method's update of the shared parameters is ``J^T w``. Every function
here returns the *paper's* weights; :mod:`lossport.balance.gradient` rescales them to the lossport convention
(equal weighting = 1; normalised weights sum to ``T``) and says by which factor. Notation: ``T`` parts,
``g_i`` the gradient of part ``i``, ``G_ij = <g_i, g_j>``."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from ..solvers import SolverWarning, _newton_core, box_qp, min_norm_simplex, simplex_minimize

BOUND = 1e4
"""Nash-MTL and FairGrad: the exact root ``w`` of ``G w = w^-p`` is accepted while its weighted gradients cancel
by at most this factor, ``||J^T w|| >= sqrt(sum_i ||w_i g_i||^2) / BOUND`` (:func:`_cancellation`), else the
bounded (ridge) problem replaces it (see :func:`nash_mtl`). For ``T = 2`` Nash-MTL the ratio is ``1 + cos`` at the
root: the bound is reached at ``1 + cos = 1e-8``, opposite to float32 rounding. FairGrad's root near a Pareto
front of gradients of very different norms (the toy problem: ``1 + cos ~ 1e-6``, norms 1e3 apart) is accepted."""
RIDGE_BOUND = 100.0
"""The scale-free weight of an exactly opposite pair in the bounded problem: ``mu = RIDGE_BOUND^-(1+p)``."""


def _f64(G: Tensor) -> Tensor:
    return G.detach().to(torch.float64)


def check_gramian(G: Tensor, what: str) -> Tensor:
    """``G`` in float64, checked: ``FloatingPointError`` for NaN/inf entries, ``ValueError`` for a matrix that is
    not square or has a negative diagonal entry (a Gramian's diagonal holds squared norms). Every weighting, and
    every balancer's ``weigh``, starts here."""
    G = _f64(G)
    if G.dim() < 2 or G.shape[-1] != G.shape[-2]:
        raise ValueError(f"{what}: the Gramian must be (*batch, T, T), not {tuple(G.shape)}")
    if not bool(torch.isfinite(G).all()):
        raise FloatingPointError(
            f"{what}: the Gramian has NaN or inf entries (non-finite gradients, or gradients so large that their "
            "inner products overflow float64); no weights can be computed from it"
        )
    if bool((G.diagonal(dim1=-2, dim2=-1) < 0).any()):
        raise ValueError(f"{what}: negative diagonal entries: not a Gramian (G_ii = ||g_i||^2 >= 0)")
    return G


def _gram(G: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """``(G / s, s)`` in float64 with ``s = max_ij |G_ij|`` per matrix (``s = 1`` for a zero matrix), after
    :func:`check_gramian`: every weighting solves on a Gramian of largest entry 1, so gradients of any finite scale
    give the same steps."""
    G = check_gramian(G, what)
    s = G.abs().amax((-2, -1))
    s = torch.where(s > 0, s, torch.ones_like(s))
    return G / s[..., None, None], s


def _labels(names: Sequence[str] | None, T: int) -> list[str]:
    return list(names) if names is not None and len(names) == T else [f"part {i}" for i in range(T)]


def _ones(G: Tensor) -> Tensor:
    return torch.ones(G.shape[:-1], dtype=torch.float64, device=G.device)


def mgda(G: Tensor) -> Tensor:
    """MGDA (Désidéri 2012; Sener & Koltun, NeurIPS 2018): ``w = argmin_{w in simplex} w^T G w``, the min-norm
    point of the convex hull of the gradients, solved exactly (:func:`~lossport.solvers.min_norm_simplex`).
    Sums to 1. Batched over leading dimensions."""
    return min_norm_simplex(_gram(G, "mgda")[0])


def pcgrad(G: Tensor, order: list[list[int]]) -> Tensor:
    """PCGrad (Yu et al., NeurIPS 2020) from the Gramian: ``g_i^PC`` starts at ``g_i`` and, for ``j`` in the
    random order ``order[i]``, loses its component along ``g_j`` when ``<g_i^PC, g_j> < 0``. Every ``g_i^PC``
    is ``J^T c_i`` and each inner product is ``c_i^T G e_j``; ``w = sum_i c_i`` (sum reduction). For ``T = 2``
    with ``G_12 < 0``: ``w = (1 - G_12/G_11, 1 - G_12/G_22)``. Scale-invariant (solved on ``G / max |G_ij|``).
    Exactly opposite ``g, -g``: each is projected onto the normal plane of the other, to 0: ``w = (1, 1)``.
    Batched over leading dimensions for ``T = 2`` (whose only orders are ``[[1], [0]]``), by that formula."""
    G = _gram(G, "pcgrad")[0]
    if G.dim() > 2:
        if G.shape[-1] != 2 or [list(o) for o in order] != [[1], [0]]:
            raise ValueError(f"pcgrad: batched Gramians are solved for T = 2 only, not {tuple(G.shape)}")
        g01, d = G[..., 0, 1], G.diagonal(dim1=-2, dim2=-1)
        proj = (g01[..., None] < 0) & (d > 0)  # w_i = 1 - G_12/G_ii: from the other part's projection on g_i
        return torch.where(proj, 1 - g01[..., None] / torch.where(proj, d, 1.0), 1.0)
    T = G.shape[0]
    C = torch.eye(T, dtype=torch.float64, device=G.device)
    for i in range(T):
        c = C[i].clone()
        for j in order[i]:
            dot = c @ G[:, j]
            if float(dot) < 0 and float(G[j, j]) > 0:
                c[j] -= dot / G[j, j]
        C[i] = c
    return C.sum(0)


def imtl_g(G: Tensor) -> Tensor:
    """IMTL-G (Liu et al., ICLR 2021): the update ``d = J^T w`` with equal projections on every unit gradient
    ``u_i`` and ``sum w = 1``. In Gramian form ``w ∝ G^+ sqrt(diag G)``, normalised to sum 1 (the form of
    Quinton & Rey 2024, which also covers linearly dependent gradients; for ``T = 2``, ``d`` bisects ``u_1``
    and ``u_2``). Zero weights where that sum vanishes, as TorchJD. Scale-invariant. Batched over leading
    dimensions."""
    G = _gram(G, "imtl_g")[0]
    d = G.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    w = (torch.linalg.pinv(G, hermitian=True) @ d.unsqueeze(-1)).squeeze(-1)
    s = w.sum(-1, keepdim=True)
    ok = s.abs() >= 1e-12
    return torch.where(ok, w / torch.where(ok, s, torch.ones_like(s)), torch.zeros_like(w))


def cagrad(G: Tensor, c: float = 0.4, *, names: Sequence[str] | None = None, bound: float = BOUND) -> Tensor:
    """CAGrad (Liu et al., NeurIPS 2021). With ``g_0 = mean_i g_i`` and ``phi = c^2 ||g_0||^2``: ``w* =
    argmin_{w in simplex} w^T G 1/T + sqrt(phi) sqrt(w^T G w)`` and ``d = g_0 + k g_w*`` with ``k =
    sqrt(phi)/||g_w*||``, divided by ``1 + c^2`` (the authors' code). Returns the weights of ``d`` on the parts
    (``(1/T + k w*) / (1 + c^2)``, sum ~1).

    Scale-invariant (``w*`` and ``k`` are unchanged by ``G -> c G``): solved on ``G / max |G_ij|``. When the
    convex hull of the gradients (nearly) contains 0 (e.g. ``g, -g, g_3``), ``||g_w*|| -> 0`` while ``k w*``
    blows up (the authors divide by ``||g_w|| + 1e-8``: weights ~1e8 whose update ``k g_w*`` is ~0 but whose
    heads get 1e8 times their gradients). Here ``k`` is capped at ``bound`` (1e4; on the toy problem of
    :mod:`lossport.toy` regular steps reach ``k ~ 1e3``, which a cap of 100 would change) with a ``SolverWarning``
    naming the parts and the weights: the update is ``g_0 + bound g_w*``, continuous in ``G`` and equal to the
    authors' ``g_0`` in the limit ``g_w* = 0``."""
    G, _ = _gram(G, "cagrad")
    if G.shape[-1] == 2:
        return _cagrad2(G, c, names, bound)
    if G.dim() != 2:
        raise ValueError(f"cagrad: batched Gramians (*batch, T, T) are solved for T = 2 only, not {tuple(G.shape)}")
    T = G.shape[0]
    avg = torch.full((T,), 1.0 / T, dtype=torch.float64, device=G.device)
    g0 = float((avg @ G @ avg).clamp_min(0).sqrt())
    if g0 == 0.0:
        return avg
    sphi = c * g0
    b = G @ avg

    def fun(w: Tensor) -> Tensor:
        return w @ b + sphi * torch.sqrt((w @ G @ w).clamp_min(1e-30))

    def grad(w: Tensor) -> Tensor:
        return b + sphi * (G @ w) / torch.sqrt((w @ G @ w).clamp_min(1e-30))

    w = simplex_minimize(fun, grad, T, device=G.device)
    gw = float((w @ G @ w).clamp_min(0).sqrt())
    k = sphi / gw if gw > 0 else float("inf")
    if k > bound:
        out = (avg + bound * w) / (1 + c * c)
        warnings.warn(
            f"cagrad: the convex hull of the gradients of {_labels(names, T)} (nearly) contains 0 (||g_w|| = "
            f"{gw:.3g} max_ij |G_ij|^1/2, e.g. exactly opposite gradients): the coefficient sqrt(phi)/||g_w|| = "
            f"{k:.3g} is capped at {bound:g}; weights {[float(f'{v:.6g}') for v in out.tolist()]}",
            SolverWarning,
            stacklevel=2,
        )
        return out
    return (avg + k * w) / (1 + c * c)


def _cagrad2(G: Tensor, c: float, names: Sequence[str] | None, bound: float) -> Tensor:
    """:func:`cagrad` for two parts in closed form, batched over leading dimensions (``G`` already scaled). With
    ``w = (x, 1 - x)``: ``w^T G w = q(x) = a x^2 + 2 beta x + G_22`` (``a = G_11 + G_22 - 2 G_12``, ``beta = G_12 -
    G_22``) and the objective's derivative is ``delta + sqrt(phi) y / sqrt(q)`` with ``y = a x + beta``, ``delta
    = (G_11 - G_22) / 2``. Since ``a q = y^2 + D`` (``D = det G``), the stationary point has ``y^2 (phi a -
    delta^2) = delta^2 D`` and ``sign y = -sign delta``; when ``phi a <= delta^2`` the derivative has the sign of
    ``delta`` everywhere and the minimum is the end ``x = 0`` or 1. The objective is convex: ``x`` clipped to
    [0, 1] is the minimiser."""
    G11, G22, G12 = G[..., 0, 0], G[..., 1, 1], G[..., 0, 1]
    g0 = (0.25 * (G11 + G22 + 2 * G12)).clamp_min(0).sqrt()
    sphi = c * g0
    a = G11 + G22 - 2 * G12
    beta = G12 - G22
    delta = 0.5 * (G11 - G22)
    D = (G11 * G22 - G12 * G12).clamp_min(0)
    den = sphi * sphi * a - delta * delta
    inside = den > 0
    y = -torch.sign(delta) * (delta * delta * D / torch.where(inside, den, torch.ones_like(den))).sqrt()
    pos = a > 0
    x = torch.where(pos, (y - beta) / torch.where(pos, a, torch.ones_like(a)), torch.full_like(a, 0.5))
    x = torch.where(inside | ~pos, x, torch.where(delta > 0, torch.zeros_like(x), torch.ones_like(x)))
    x = x.clamp(0.0, 1.0)
    w = torch.stack([x, 1 - x], -1)
    gw = (a * x * x + 2 * beta * x + G22).clamp_min(0).sqrt()
    k = sphi / torch.where(gw > 0, gw, torch.ones_like(gw))
    capped = (g0 > 0) & ((gw == 0) | (k > bound))
    k = torch.where(capped, torch.full_like(k, bound), torch.where(g0 > 0, k, torch.zeros_like(k)))
    out = (0.5 + k[..., None] * w) / torch.where(g0 > 0, 1 + c * c, 1.0)[..., None]
    if bool(capped.any()):
        first = out[capped][0]
        warnings.warn(
            f"cagrad: the convex hull of the gradients of {_labels(names, 2)} (nearly) contains 0 (e.g. exactly "
            f"opposite gradients) in {int(capped.sum())} of {capped.numel()} Gramians: the coefficient "
            f"sqrt(phi)/||g_w|| is capped at {bound:g}; weights {[float(f'{v:.6g}') for v in first.tolist()]}",
            SolverWarning,
            stacklevel=3,
        )
    return out


def _normalized_gramian(G: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``G / trace(G) + eps I`` (TorchJD's normalisation of the dual-cone projections) and the mask of the
    matrices with a positive trace."""
    tr = G.diagonal(dim1=-2, dim2=-1).sum(-1)
    pos = tr > 0
    Gn = G / torch.where(pos, tr, torch.ones_like(tr))[..., None, None]
    return Gn + eps * torch.eye(G.shape[-1], dtype=torch.float64, device=G.device), pos


def upgrad(G: Tensor, eps: float = 1e-4) -> Tensor:
    """UPGrad (Quinton & Rey 2024): project each ``g_i`` onto the dual cone ``{x : J x >= 0}`` and average.
    The projection of ``J^T u`` is ``J^T v`` with ``v = argmin_{v >= u} v^T G v`` (their Prop. 1); with ``u =
    e_i / T`` for every ``i`` the ``T`` problems are solved together and exactly
    (:func:`~lossport.solvers.box_qp`: block principal pivoting from a shared-factorisation ADMM guess of the
    active sets, usually one exact pivoting step); ``w = sum_i v_i``. As TorchJD, ``G`` is normalised to ``G /
    trace(G) + eps I`` (unlike TorchJD, also when ``trace(G) < 1e-4``: TorchJD then returns the mean). For ``T =
    2`` and ``eps = 0`` it equals PCGrad with mean reduction. Batched over leading dimensions. Cold start; see
    :func:`upgrad_warm` for a start from the previous step's projections."""
    return upgrad_warm(G, None, eps)[0]


def upgrad_warm(G: Tensor, start: Tensor | None = None, eps: float = 1e-4) -> tuple[Tensor, Tensor]:
    """:func:`upgrad` started from ``start``, the projections ``V`` (rows ``v_i``, ``(*batch, T, T)``) that an
    earlier call returned, e.g. on the previous training step's Gramian (``None``: cold start). Returns ``(w,
    V)``. The start only changes the solver's path (the ADMM guess of the active sets starts from it), not the
    answer: ``w`` equals the cold :func:`upgrad` to the solver's tolerance (each ``v_i`` is the exact solution on
    its final free set). On Gramians replayed from a training run it halves the ADMM steps, which saves 8-15%
    of the time at ``T = 128`` and nothing measurable at ``T <= 64`` (``benchmarks/replay.py``, docs/scaling.md)."""
    G = _gram(G, "upgrad")[0]
    T = G.shape[-1]
    Gn, pos = _normalized_gramian(G, eps)
    U = torch.eye(T, dtype=torch.float64, device=G.device) / T
    V = box_qp(Gn, None, U.expand((*G.shape[:-2], T, T)), start=_start(start, G, "upgrad_warm"))
    return torch.where(pos[..., None], V.sum(-2), _ones(G) / T), V


def _start(start: Tensor | None, G: Tensor, what: str) -> Tensor | None:
    """``start`` in float64 on the device of the Gramian ``G``, checked: its last dimension must be ``T``."""
    if start is None:
        return None
    if start.shape[-1] != G.shape[-1]:
        raise ValueError(f"{what}: start has {start.shape[-1]} columns for a Gramian of {G.shape[-1]} parts")
    return start.detach().to(G.device, torch.float64)


def dualproj(G: Tensor, eps: float = 1e-4) -> Tensor:
    """DualProj (Quinton & Rey 2024): the projection of the mean gradient onto the dual cone: ``w = argmin_{v
    >= 1/T} v^T G v`` (``G`` normalised as in :func:`upgrad`). Batched over leading dimensions."""
    G = _gram(G, "dualproj")[0]
    T = G.shape[-1]
    Gn, pos = _normalized_gramian(G, eps)
    avg = (_ones(G) / T).unsqueeze(-2)
    w = box_qp(Gn, None, avg).squeeze(-2)
    return torch.where(pos[..., None], w, _ones(G) / T)


def aligned_mtl(G: Tensor, scale: str = "min", rtol: float | None = None) -> Tensor:
    """Aligned-MTL (Senushkin et al., CVPR 2023): with ``G = V diag(lambda) V^T`` (rank-``r`` part kept:
    eigenvalues above ``rtol lambda_max``, by default ``rtol = T eps_float64`` as TorchJD; Gramians of float32
    gradients with fewer independent directions than parts need ``rtol ~ 1e-6`` to discard their roundoff
    eigenvalues), ``w = sigma V diag(lambda)^{-1/2} V^T 1/T``: the aligned gradients have condition number 1.
    ``sigma`` is ``sqrt(lambda_min)`` (``"min"``, the paper and LibMTL), ``sqrt(median lambda)``
    (``"median"``, lower median) or ``sqrt(mean lambda)`` (``"rmse"``, the official code); eigenvalues of the
    kept part. Batched over leading dimensions."""
    if scale not in ("min", "median", "rmse"):
        raise ValueError(f"aligned_mtl scale must be 'min', 'median' or 'rmse', not {scale!r}")
    G = _gram(G, "aligned_mtl")[0]  # scale-invariant: sigma and lambda^(-1/2) cancel
    T = G.shape[-1]
    lam, V = torch.linalg.eigh(G)
    tol = T * torch.finfo(torch.float64).eps if rtol is None else rtol
    keep = lam > lam.amax(-1, keepdim=True).clamp_min(0) * tol
    nk = keep.sum(-1)
    safe = torch.where(keep, lam, torch.ones_like(lam))
    inv_sqrt = torch.where(keep, safe.rsqrt(), torch.zeros_like(lam))
    if scale == "min":
        sig2 = torch.where(keep, lam, torch.full_like(lam, float("inf"))).amin(-1)
    elif scale == "rmse":
        sig2 = torch.where(keep, lam, torch.zeros_like(lam)).sum(-1) / nk.clamp_min(1)
    else:  # eigh sorts ascending: the kept ones are the last nk; lower median = index T - nk + (nk - 1) // 2
        idx = (T - nk + (nk - 1).clamp_min(0) // 2).clamp(0, T - 1)
        sig2 = lam.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    pref = _ones(G) / T
    w = sig2.clamp_min(0).sqrt()[..., None] * (
        V @ ((V.mT @ pref.unsqueeze(-1)).squeeze(-1) * inv_sqrt).unsqueeze(-1)
    ).squeeze(-1)
    return torch.where((nk > 0)[..., None], w, pref)


def _cancellation(G: Tensor, x: Tensor) -> Tensor:
    """``||J^T x||^2 / sum_i ||x_i g_i||^2 = x^T G x / sum_i x_i^2 G_ii`` (batched): 1 for orthogonal gradients,
    0 when the weighted gradients cancel exactly. Invariant to the scale of ``G``."""
    num = ((G @ x.unsqueeze(-1)).squeeze(-1) * x).sum(-1)
    den = (x * x * G.diagonal(dim1=-2, dim2=-1)).sum(-1)
    return num / den.clamp_min(1e-300)


def _alpha_fair_one(
    G: Tensor, power: float, x0: Tensor | None, names: Sequence[str] | None, method: str, bound: float
) -> Tensor:
    """The positive root of ``G x = x^(-p)`` for one Gramian (see :func:`nash_mtl`)."""
    T = G.shape[-1]
    d = G.diagonal()
    s = float(d.max())
    if s <= 0:  # every gradient is 0: the update is 0 whatever the weights
        return torch.ones(T, dtype=torch.float64, device=G.device)
    e = 1.0 / (1.0 + power)
    k = s**e  # x(G) = x(G / s) / k
    Gn = G / s
    dn = Gn.diagonal()
    keep = dn > 1e-24  # gradients above 1e-12 of the largest norm
    Gk, dk = Gn[keep][:, keep], dn[keep]
    x = x_init = (x0.to(torch.float64)[keep] * k).clamp_min(1e-12) if x0 is not None else dk ** (-e)
    ok = False
    if Gk.shape[0] == 2 and power == 1.0:  # closed form: a_i = 1 / (||g_i|| sqrt(1 + cos))
        n = dk.sqrt()
        cos = float((Gk[0, 1] / (n[0] * n[1])).clamp(-1.0, 1.0))
        if 1 + cos >= bound ** (-2):
            x, ok = 1.0 / (n * (1 + cos) ** 0.5), True
    else:
        x, res = _newton_core(Gk, power, x, 1e-12, 100, bound * bound)
        ok = bool(res < 1e-6) and float(_cancellation(Gk, x)) >= bound ** (-2)
    mu = RIDGE_BOUND ** (-(1.0 + power))
    if not ok:  # no root, or one with weights beyond the bound: the ridge problem (strongly convex, coercive)
        Gr = Gk + mu * torch.diag(dk)
        if Gk.shape[0] == 2 and power == 1.0:  # the closed form holds for any positive definite 2 x 2 matrix
            n = Gr.diagonal().sqrt()
            x = 1.0 / (n * (1 + float((Gr[0, 1] / (n[0] * n[1])).clamp(-1.0, 1.0))) ** 0.5)
        else:
            # from the previous step's weights (a bounded solution when that step was bounded too)
            x, _ = _newton_core(Gr, power, x_init, 1e-12, 200, float("inf"))
    out = torch.empty(T, dtype=torch.float64, device=G.device)
    out[keep] = x
    if not bool(keep.all()):
        out[~keep] = x.max() if x.numel() else 1.0
    out = out / k
    if not ok or not bool(keep.all()):
        labels = _labels(names, T)
        zero = [labels[i] for i in range(T) if not bool(keep[i])]
        warnings.warn(
            f"{method}: G w = w^(-{power:g}) has no bounded positive root for the parts {labels}: a nonnegative "
            "combination of their gradients is (nearly) 0 (e.g. exactly opposite gradients"
            + (f"; zero gradients: {zero}, given the largest weight" if zero else "")
            + f"). Weights bounded by solving (G + {mu:.3g} diag G) w = w^(-{power:g}): "
            f"{[float(f'{v:.6g}') for v in out.tolist()]}",
            SolverWarning,
            stacklevel=4,
        )
    return out


def _alpha_fair(
    G: Tensor, power: float, x0: Tensor | None, names: Sequence[str] | None, method: str, bound: float
) -> Tensor:
    _gram(G, method)  # the checks; _alpha_fair_one scales by the largest diagonal entry itself
    G = _f64(G)
    if G.dim() == 2:
        return _alpha_fair_one(G, power, x0, names, method, bound)
    T = G.shape[-1]
    flat = G.reshape(-1, T, T)
    x0s = None if x0 is None else x0.to(torch.float64).expand(G.shape[:-1]).reshape(flat.shape[:-1])
    out, ok = _alpha_fair_batch(flat, power, x0s, bound)
    for i in (~ok).nonzero().flatten().tolist():  # degenerate matrices, one by one (bounded, warned)
        out[i] = _alpha_fair_one(flat[i], power, None if x0s is None else x0s[i], names, method, bound)
    return out.reshape(G.shape[:-1])


def _alpha_fair_batch(G: Tensor, power: float, x0: Tensor | None, bound: float) -> tuple[Tensor, Tensor]:
    """All matrices at once (``B x T x T``): the exact roots and the mask of those accepted (no zero gradient,
    converged, cancellation within ``bound``); :func:`_alpha_fair_one` redoes the others."""
    d = G.diagonal(dim1=-2, dim2=-1)
    s = d.amax(-1)
    good = s > 0
    s = torch.where(good, s, torch.ones_like(s))
    e = 1.0 / (1.0 + power)
    Gn = G / s[:, None, None]
    dn = Gn.diagonal(dim1=-2, dim2=-1)
    good &= (dn > 1e-24).all(-1)
    dn = torch.where(good[:, None], dn, torch.ones_like(dn))
    if G.shape[-1] == 2 and power == 1.0:
        n = dn.sqrt()
        cos = (Gn[:, 0, 1] / (n[:, 0] * n[:, 1])).clamp(-1.0, 1.0)
        x = 1.0 / (n * (1 + cos).clamp_min(bound ** (-2))[:, None].sqrt())
        good &= 1 + cos >= bound ** (-2)
    else:
        x = dn ** (-e) if x0 is None else (x0 * (s**e)[:, None]).clamp_min(1e-12)
        Gs = torch.where(good[:, None, None], Gn, torch.diag_embed(dn))  # placeholders: solved one by one
        x, res = _newton_core(Gs, power, x, 1e-12, 100, bound * bound)
        good &= (res < 1e-6) & (_cancellation(Gs, x) >= bound ** (-2))
    return x / (s**e)[:, None], good


def nash_mtl(
    G: Tensor, x0: Tensor | None = None, *, names: Sequence[str] | None = None, bound: float = BOUND
) -> Tensor:
    """Nash-MTL (Navon et al., ICML 2022): the Nash bargaining solution ``d = J^T a`` with ``G a = 1/a``, ``a >
    0`` (their Claim 3.1) on the raw Gramian, as the authors' code (which solves on ``G / ||G||_F`` but puts
    the factor back in its constraint ``a_i ||G||_F (G_n a)_i >= 1``). Solved exactly by damped Newton on the
    strictly convex ``1/2 a^T G a - sum log a`` (:func:`~lossport.solvers.newton_positive`) instead of the
    authors' sequence of at most 20 linearised cvxpy problems (which stops at a residual of 1e-3); for ``T =
    2``, closed form ``a_i = 1 / (||g_i|| sqrt(1 + cos(g_1, g_2)))``. Warm start ``x0`` (raw scale).

    Scale: ``a(c G) = a(G) / sqrt(c)``; solved on ``G / max_i G_ii`` and rescaled exactly.

    Degenerate Gramians: the root exists iff no nonnegative combination of the gradients is 0. At exactly
    opposite gradients (``g, -g``) or a zero gradient there is none (the objective is unbounded below and ``a``
    grows without bound; for ``T = 2``, ``a ~ 1/sqrt(1 + cos)``), and near them the root is huge. Whenever the
    exact root does not exist or its weighted gradients cancel beyond ``bound`` (``||J^T a||^2 < sum_i ||a_i
    g_i||^2 / bound^2``, :data:`BOUND` 1e4; ``T = 2``: ``1 + cos < 1e-8``), lossport solves ``(G + mu diag
    G) a = 1/a`` with ``mu = 100^-2`` instead (then ``a_i ||g_i|| <= 100 sqrt(T)``: the pair ``g, -g`` gets
    ``a ~ 100 / ||g||``, its update cancels exactly and the other parts keep about their Nash weights) and warns
    (``SolverWarning``) with the part names and weights; a zero gradient (below 1e-12 of the largest norm) gets
    the largest weight of the others. All gradients zero: weights 1. Batched (a loop over the matrices)."""
    return _alpha_fair(G, 1.0, x0, names, "nash_mtl", bound)


def fairgrad(
    G: Tensor,
    alpha: float = 2.0,
    x0: Tensor | None = None,
    *,
    names: Sequence[str] | None = None,
    bound: float = BOUND,
) -> Tensor:
    """FairGrad (Ban & Ji, ICML 2024): alpha-fair allocation, ``G w = w^(-1/alpha)``, ``w > 0`` (their Eq. 4)
    on the raw Gramian, as the authors' code (scipy ``least_squares`` on ``G w - w^(-1/alpha)``, no
    normalisation) and TorchJD; ``alpha = 1`` is Nash-MTL's condition. Solved exactly by Newton as
    :func:`nash_mtl`. Scale: ``w(c G) = c^(-alpha/(1+alpha)) w(G)``, solved on ``G / max_i G_ii`` and rescaled
    exactly. Degenerate Gramians as :func:`nash_mtl`: when no root exists or its weighted gradients
    cancel beyond ``bound`` it solves ``(G + mu diag G) w = w^(-1/alpha)`` with ``mu = 100^-(1+1/alpha)`` and
    warns (``SolverWarning``).

    Near a Pareto-stationary point the root is large (the toy problem of :mod:`lossport.toy`, 0.01 above its
    front: weights ~1e6, ``1 + cos ~ 1e-7``): Newton reaches it to the rounding level of ``G w`` in about 10
    steps cold, about 4 from the previous step's weights, where the authors' ``least_squares`` stops early on
    its default tolerances (relative residual 0.1-0.7 there; with tolerances 1e-15 it reaches the same root).
    Batched: all matrices in one Newton, the rejected ones redone one by one."""
    if alpha <= 0:
        raise ValueError(f"fairgrad: alpha must be > 0, not {alpha}")
    return _alpha_fair(G, 1.0 / alpha, x0, names, "fairgrad", bound)


def config(G: Tensor) -> Tensor:
    """ConFIG (Liu et al., ICLR 2025, arXiv 2408.11104) from the Gramian. With unit gradients ``u_i =
    g_i/||g_i||`` (rows of ``U = D^{-1/2} J``, ``D = diag G``) the direction is ``v = U^+ 1``, the
    minimum-norm solution of ``U v = 1`` (equal cosine with every gradient). It lies in the row space of
    ``J``: ``U^+ = U^T (U U^T)^+`` gives ``v = J^T D^{-1/2} a`` with ``a = G_n^+ 1``, ``G_n = D^{-1/2} G
    D^{-1/2}``. The update ``d = (sum_i g_i^T v_hat) v_hat`` (``v_hat = v/||v||``, ``||v||^2 = a^T G_n a``) is
    ``J^T w`` with ``w = (1^T G D^{-1/2} a / (a^T G_n a)) D^{-1/2} a``. A zero gradient gets weight 0 (as
    TorchJD's ``nan_to_num``). Scale-invariant. Batched over leading dimensions."""
    G = _gram(G, "config")[0]
    d = G.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    inv = torch.where(d > 0, 1.0 / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(d))
    Gn = inv.unsqueeze(-1) * G * inv.unsqueeze(-2)
    ones = _ones(G)
    a = (torch.linalg.pinv(Gn, hermitian=True) @ ones.unsqueeze(-1)).squeeze(-1)
    vv = (a * (Gn @ a.unsqueeze(-1)).squeeze(-1)).sum(-1, keepdim=True)
    k = (G.sum(-2) * inv * a).sum(-1, keepdim=True) / vv.clamp_min(1e-300)
    return torch.where(vv > 1e-300, k * inv * a, torch.zeros_like(a))


def gradvac(G: Tensor, order: list[list[int]], targets: Tensor, beta: float = 0.5) -> tuple[Tensor, Tensor]:
    """GradVac (Wang et al., ICLR 2021) from the Gramian: for each ``i`` and ``j`` in random order, with ``phi
    = cos(g_i^PC, g_j)`` below the EMA target ``phi_bar_ij``, add ``g_j ||g_i^PC|| (phi_bar sqrt(1 - phi^2) -
    phi sqrt(1 - phi_bar^2)) / (||g_j|| sqrt(1 - phi_bar^2))`` to ``g_i^PC``; then ``phi_bar_ij <- (1 - beta)
    phi_bar_ij + beta phi`` (whole-model grouping). Returns ``(w, new targets)``.

    Scale-invariant (solved on ``G / max |G_ij|``). Cosines are clamped to ``[-1, 1]`` (rounding makes the
    cosine of identical gradients ``1 + 1e-16``, whose ``sqrt(1 - phi^2)`` is complex); the target used in the
    formula is capped at ``1 - 1e-6``: the coefficient is ``||g_i^PC|| sin(theta - theta_bar) / (||g_j|| sin
    theta_bar)``, and a target of exactly 1 (reached after identical gradients) would need an infinite one;
    so ``|coefficient| <= 708 ||g_i^PC|| / ||g_j||``."""
    G = _gram(G, "gradvac")[0]
    T = G.shape[0]
    tgt = targets.to(torch.float64).clamp(-1.0, 1.0)
    C = torch.eye(T, dtype=torch.float64, device=G.device)
    for i in range(T):
        c = C[i].clone()
        for j in order[i]:
            nj = float(G[j, j].clamp_min(0).sqrt())
            ni = float((c @ G @ c).clamp_min(0).sqrt())
            if nj == 0 or ni == 0:
                continue
            phi = min(max(float(c @ G[:, j]) / (ni * nj), -1.0), 1.0)
            pb = float(tgt[i, j])
            pe = min(pb, 1.0 - 1e-6)
            if phi < pe:
                coef = ni * (pe * (1 - phi**2) ** 0.5 - phi * (1 - pe**2) ** 0.5) / (nj * (1 - pe**2) ** 0.5)
                c[j] += coef
            tgt[i, j] = (1 - beta) * pb + beta * phi
        C[i] = c
    return C.sum(0), tgt


__all__ = [
    "aligned_mtl",
    "cagrad",
    "config",
    "dualproj",
    "fairgrad",
    "gradvac",
    "imtl_g",
    "mgda",
    "nash_mtl",
    "pcgrad",
    "upgrad",
    "upgrad_warm",
]
