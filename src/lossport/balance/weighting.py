"""Gradient-level methods as functions ``G -> w`` of the Gramian ``G = J J^T`` of the parts' gradients.

Each returns weights ``w`` such that the method's update of the shared parameters is ``J^T w``. Every function
here returns the *paper's* weights; :mod:`lossport.balance.gradient` rescales them to the lossport convention
(equal weighting = 1; normalised weights sum to ``T``) and says by which factor. Notation: ``T`` parts,
``g_i`` the gradient of part ``i``, ``G_ij = <g_i, g_j>``."""

from __future__ import annotations

import torch
from torch import Tensor

from ..solvers import box_qp, min_norm_simplex, newton_positive, simplex_minimize


def _f64(G: Tensor) -> Tensor:
    return G.detach().to(torch.float64)


def _ones(G: Tensor) -> Tensor:
    return torch.ones(G.shape[:-1], dtype=torch.float64, device=G.device)


def mgda(G: Tensor) -> Tensor:
    """MGDA (Désidéri 2012; Sener & Koltun, NeurIPS 2018): ``w = argmin_{w in simplex} w^T G w``, the min-norm
    point of the convex hull of the gradients, solved exactly (:func:`~lossport.solvers.min_norm_simplex`).
    Sums to 1. Batched over leading dimensions."""
    return min_norm_simplex(_f64(G))


def pcgrad(G: Tensor, order: list[list[int]]) -> Tensor:
    """PCGrad (Yu et al., NeurIPS 2020) from the Gramian: ``g_i^PC`` starts at ``g_i`` and, for ``j`` in the
    random order ``order[i]``, loses its component along ``g_j`` when ``<g_i^PC, g_j> < 0``. Every ``g_i^PC``
    is ``J^T c_i`` and each inner product is ``c_i^T G e_j``; ``w = sum_i c_i`` (sum reduction). For ``T = 2``
    with ``G_12 < 0``: ``w = (1 - G_12/G_11, 1 - G_12/G_22)``."""
    G = _f64(G)
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
    and ``u_2``). Zero weights where that sum vanishes, as TorchJD. Batched over leading dimensions."""
    G = _f64(G)
    d = G.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    w = (torch.linalg.pinv(G, hermitian=True) @ d.unsqueeze(-1)).squeeze(-1)
    s = w.sum(-1, keepdim=True)
    ok = s.abs() >= 1e-12
    return torch.where(ok, w / torch.where(ok, s, torch.ones_like(s)), torch.zeros_like(w))


def cagrad(G: Tensor, c: float = 0.4) -> Tensor:
    """CAGrad (Liu et al., NeurIPS 2021). With ``g_0 = mean_i g_i`` and ``phi = c^2 ||g_0||^2``: ``w* =
    argmin_{w in simplex} w^T G 1/T + sqrt(phi) sqrt(w^T G w)`` and ``d = g_0 + sqrt(phi)/||g_w*|| g_w*``,
    divided by ``1 + c^2`` (the authors' code). Returns the weights of ``d`` on the parts (sum ~1)."""
    G = _f64(G)
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
    gw = float((w @ G @ w).clamp_min(1e-30).sqrt())
    return (avg + (sphi / gw) * w) / (1 + c * c)


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
    2`` and ``eps = 0`` it equals PCGrad with mean reduction. Batched over leading dimensions."""
    G = _f64(G)
    T = G.shape[-1]
    Gn, pos = _normalized_gramian(G, eps)
    U = torch.eye(T, dtype=torch.float64, device=G.device) / T
    w = box_qp(Gn, None, U.expand(G.shape[:-2] + (T, T))).sum(-2)
    return torch.where(pos[..., None], w, _ones(G) / T)


def dualproj(G: Tensor, eps: float = 1e-4) -> Tensor:
    """DualProj (Quinton & Rey 2024): the projection of the mean gradient onto the dual cone: ``w = argmin_{v
    >= 1/T} v^T G v`` (``G`` normalised as in :func:`upgrad`). Batched over leading dimensions."""
    G = _f64(G)
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
    G = _f64(G)
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


def nash_mtl(G: Tensor, x0: Tensor | None = None) -> Tensor:
    """Nash-MTL (Navon et al., ICML 2022): the Nash bargaining solution ``d = J^T a`` with ``G a = 1/a``, ``a
    > 0`` (their Claim 3.1), solved exactly by damped Newton on the strictly convex ``1/2 a^T G a - sum log
    a`` (:func:`~lossport.solvers.newton_positive`) instead of the authors' sequence of at most 20 linearised
    cvxpy problems (which stops at a residual of 1e-3). For ``T = 2``, closed form: ``a_i = 1 / (||g_i||
    sqrt(1 + cos(g_1, g_2)))``, i.e. ``d = (u_1 + u_2) / sqrt(1 + cos)``. Batched."""
    G = _f64(G)
    if G.shape[-1] == 2:
        n = G.diagonal(dim1=-2, dim2=-1).clamp_min(1e-300).sqrt()
        cos = (G[..., 0, 1] / (n[..., 0] * n[..., 1])).clamp(-1 + 1e-12, 1.0)
        return 1.0 / (n * torch.sqrt(1 + cos).unsqueeze(-1))
    return newton_positive(G, 1.0, x0=x0)


def fairgrad(G: Tensor, alpha: float = 2.0, x0: Tensor | None = None) -> Tensor:
    """FairGrad (Ban & Ji, ICML 2024): alpha-fair allocation, ``G w = w^(-1/alpha)``, ``w > 0`` (their Eq. 4);
    ``alpha = 1`` is Nash-MTL's condition. Solved exactly as :func:`nash_mtl` (the authors and TorchJD use
    scipy's ``least_squares``). Batched."""
    if alpha <= 0:
        raise ValueError(f"fairgrad: alpha must be > 0, not {alpha}")
    return newton_positive(_f64(G), 1.0 / alpha, x0=x0)


def config(G: Tensor) -> Tensor:
    """ConFIG (Liu et al., ICLR 2025, arXiv 2408.11104) from the Gramian. With unit gradients ``u_i =
    g_i/||g_i||`` (rows of ``U = D^{-1/2} J``, ``D = diag G``) the direction is ``v = U^+ 1``, the
    minimum-norm solution of ``U v = 1`` (equal cosine with every gradient). It lies in the row space of
    ``J``: ``U^+ = U^T (U U^T)^+`` gives ``v = J^T D^{-1/2} a`` with ``a = G_n^+ 1``, ``G_n = D^{-1/2} G
    D^{-1/2}``. The update ``d = (sum_i g_i^T v_hat) v_hat`` (``v_hat = v/||v||``, ``||v||^2 = a^T G_n a``) is
    ``J^T w`` with ``w = (1^T G D^{-1/2} a / (a^T G_n a)) D^{-1/2} a``. A zero gradient gets weight 0 (as
    TorchJD's ``nan_to_num``). Batched over leading dimensions."""
    G = _f64(G)
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
    phi_bar_ij + beta phi`` (whole-model grouping). Returns ``(w, new targets)``."""
    G = _f64(G)
    T = G.shape[0]
    tgt = targets.to(torch.float64).clone()
    C = torch.eye(T, dtype=torch.float64, device=G.device)
    for i in range(T):
        c = C[i].clone()
        for j in order[i]:
            nj = float(G[j, j].clamp_min(0).sqrt())
            ni = float((c @ G @ c).clamp_min(0).sqrt())
            if nj == 0 or ni == 0:
                continue
            phi = float(c @ G[:, j]) / (ni * nj)
            pb = float(tgt[i, j])
            if phi < pb:
                coef = ni * (pb * (1 - phi**2) ** 0.5 - phi * (1 - pb**2) ** 0.5) / (nj * (1 - pb**2) ** 0.5)
                c[j] += coef
            tgt[i, j] = (1 - beta) * pb + beta * phi
        C[i] = c
    return C.sum(0), tgt


__all__ = [
    "mgda",
    "pcgrad",
    "imtl_g",
    "cagrad",
    "upgrad",
    "dualproj",
    "aligned_mtl",
    "nash_mtl",
    "fairgrad",
    "config",
    "gradvac",
]
