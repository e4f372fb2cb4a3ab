"""Small convex problems on T x T Gramians, solved in torch (float64, batched, on the tensors' device).

No external solver: the problems have at most a few dozen variables, so exact Newton-type methods with an
active set converge in a handful of iterations. A solver that does not reach its tolerance warns with the
residual (``SolverWarning``); it never falls back silently to another answer.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor


class SolverWarning(RuntimeWarning):
    """A solver stopped before its optimality conditions held to tolerance."""


def _solve_psd(A: Tensor, b: Tensor) -> Tensor:
    """``A x = b`` for symmetric PSD ``A`` (batched); minimum-norm least squares where ``A`` is singular."""
    try:
        L, info = torch.linalg.cholesky_ex(A)
        if bool((info == 0).all()):
            return torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)
    except RuntimeError:
        pass
    return (torch.linalg.pinv(A, hermitian=True) @ b.unsqueeze(-1)).squeeze(-1)


def box_qp(
    G: Tensor, q: Tensor, lower: Tensor, *, ridge: float = 1e-10, tol: float = 1e-10, max_iter: int = 100
) -> Tensor:
    """``argmin_v 1/2 v^T G v + q^T v  s.t.  v >= lower`` for PSD ``G``; batched over leading dimensions of
    ``q`` and ``lower`` (``G`` is shared or batched alike).

    Primal active-set method: fix the variables at their bound whose gradient pushes outward, take the exact
    Newton (equality-constrained) step on the free ones, and if that step crosses a bound, stop at the first
    bound crossed and fix it. Each iteration either adds a bound or ends at the optimum of the current face,
    after which bounds with negative multipliers are released; this terminates in finitely many steps (Nocedal
    & Wright, Numerical Optimization, Alg. 16.3). Returns ``v`` with the KKT conditions checked to ``tol``
    (relative to the scale of ``G``). ``ridge`` adds ``ridge * max(diag G) * I`` so that every face problem is
    strictly convex (singular ``G``, e.g. more parts than independent gradients, has faces with no minimiser).
    """
    G = G.to(torch.float64)
    n0 = G.shape[-1]
    dmax = G.diagonal(dim1=-2, dim2=-1).abs().amax(-1, keepdim=True).unsqueeze(-1).clamp_min(1e-300)
    G = G + ridge * dmax * torch.eye(n0, dtype=torch.float64, device=G.device)
    q = q.to(torch.float64)
    lower = lower.to(torch.float64)
    batch = torch.broadcast_shapes(q.shape, lower.shape)
    q = q.expand(batch).clone()
    lower = lower.expand(batch).clone()
    Gb = G.expand(batch[:-1] + G.shape[-2:]) if G.dim() == 2 else G.expand(batch[:-1] + G.shape[-2:])
    n = batch[-1]
    eye = torch.eye(n, dtype=torch.float64, device=G.device)
    scale = float(G.diagonal(dim1=-2, dim2=-1).abs().max().clamp_min(1e-300))
    atol = tol * max(scale, float(q.abs().max()) if q.numel() else 0.0, 1e-300)
    v = lower.clone()
    active = torch.ones(batch, dtype=torch.bool, device=G.device)
    # start: free every variable whose gradient at the lower bound is negative
    grad = (Gb @ v.unsqueeze(-1)).squeeze(-1) + q
    active = grad >= 0
    for _ in range(max_iter * n):
        free = ~active
        # Newton step on the free variables with the active ones fixed at their bounds
        Ff = free.unsqueeze(-1) & free.unsqueeze(-2)
        A = torch.where(Ff, Gb, eye.expand_as(Gb))
        grad = (Gb @ v.unsqueeze(-1)).squeeze(-1) + q
        rhs = torch.where(free, -grad, torch.zeros_like(grad))
        step = _solve_psd(A, rhs)
        step = torch.where(free, step, torch.zeros_like(step))
        # longest feasible fraction of the step
        decreasing = step < -1e-300
        room = torch.where(
            decreasing,
            (lower - v) / torch.where(decreasing, step, -torch.ones_like(step)),
            torch.full_like(v, float("inf")),
        )
        alpha = room.min(dim=-1, keepdim=True).values.clamp(max=1.0)
        v = torch.maximum(v + alpha * step, lower)
        blocking = decreasing & (room <= alpha + 1e-15) & (alpha < 1.0)
        active = active | blocking
        full = alpha.squeeze(-1) >= 1.0
        grad = (Gb @ v.unsqueeze(-1)).squeeze(-1) + q
        # at the optimum of the current face: release the bound with the most negative multiplier
        mult = torch.where(active, grad, torch.full_like(grad, float("inf")))
        worst = mult.min(dim=-1)
        release = full & (worst.values < -atol)
        if not bool(release.any()) and bool(full.all()):
            break
        idx = worst.indices.unsqueeze(-1)
        rel = torch.zeros_like(active).scatter(-1, idx, release.unsqueeze(-1))
        active = active & ~rel
    grad = (Gb @ v.unsqueeze(-1)).squeeze(-1) + q
    at_bound = v <= lower + 1e-12 * (1 + lower.abs())
    residual = torch.where(at_bound, (-grad).clamp_min(0), grad.abs()).max()
    if float(residual) > 100 * atol:
        warnings.warn(
            f"box_qp: KKT residual {float(residual):.3g} after the iteration limit", SolverWarning, stacklevel=2
        )
    return v


def min_norm_simplex(G: Tensor, *, tol: float = 1e-10) -> Tensor:
    """``argmin_{w in simplex} w^T G w`` (the MGDA min-norm point; Sener & Koltun 2018).

    ``T = 2``: ``w_1 = clip((G_22 - G_12) / (G_11 + G_22 - 2 G_12), 0, 1)`` (their Eq. 4). Otherwise through the
    equivalent problem ``min_{u >= 0} 1/2 u^T G u - 1^T u`` with ``w = u / sum(u)``: its KKT conditions
    ``G u = 1 + lambda`` are those of the simplex problem scaled by ``1 / sum(u)``. ``G`` gets a relative ridge
    of ``1e-9`` so that the problem stays bounded when the gradients are linearly dependent (then the min-norm
    value is ~0 and ``w`` is one of the minimisers).
    """
    G = G.to(torch.float64)
    T = G.shape[-1]
    if T == 1:
        return torch.ones(1, dtype=torch.float64, device=G.device)
    if T == 2:
        den = G[0, 0] + G[1, 1] - 2 * G[0, 1]
        if float(den) <= 1e-300:
            return torch.full((2,), 0.5, dtype=torch.float64, device=G.device)
        a = ((G[1, 1] - G[0, 1]) / den).clamp(0, 1)
        return torch.stack([a, 1 - a])
    tr = float(G.diagonal().sum())
    if tr <= 0:
        return torch.full((T,), 1.0 / T, dtype=torch.float64, device=G.device)
    zeros = torch.zeros(T, dtype=torch.float64, device=G.device)
    u = box_qp(G / tr, zeros - 1.0, zeros, ridge=1e-9, tol=max(tol, 1e-6))
    return u / u.sum()


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row of ``v`` onto the probability simplex (sort-based, exact)."""
    n = v.shape[-1]
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    k = torch.arange(1, n + 1, dtype=v.dtype, device=v.device)
    cond = u - css / k > 0
    rho = cond.to(v.dtype).cumsum(-1).argmax(-1, keepdim=True)
    theta = css.gather(-1, rho) / (rho + 1).to(v.dtype)
    return (v - theta).clamp_min(0)


def newton_positive(
    G: Tensor, power: float, *, x0: Tensor | None = None, tol: float = 1e-9, max_iter: int = 100
) -> Tensor:
    """Positive solution of ``G x = x^(-power)`` (element-wise power), for PSD ``G`` with positive diagonal.

    It is the minimiser of the strictly convex ``f(x) = 1/2 x^T G x - sum_i h(x_i)`` with ``h' (x) = x^-power``
    (``h = log`` for ``power = 1``: Nash-MTL's ``G a = 1/a``, Navon et al. 2022; ``power = 1/alpha``: FairGrad,
    Ban & Ji 2024). Damped Newton with a positivity-preserving backtracking line search; warm start ``x0``.
    """
    G = G.to(torch.float64)
    d = G.diagonal().clamp_min(1e-300)
    x = (d ** (-1.0 / (1.0 + power))).clone() if x0 is None else x0.to(torch.float64).clamp_min(1e-12).clone()

    def h(z: Tensor) -> Tensor:
        return torch.log(z) if abs(power - 1.0) < 1e-15 else z ** (1 - power) / (1 - power)

    def f(z: Tensor) -> Tensor:
        return 0.5 * z @ G @ z - h(z).sum()

    res = float("inf")
    for _ in range(max_iter):
        grad = G @ x - x ** (-power)
        res = float(grad.abs().max() / (x ** (-power)).abs().max())
        if res < tol:
            return x
        H = G + torch.diag(power * x ** (-power - 1))
        step = -_solve_psd(H, grad)
        t = 1.0
        neg = step < 0
        if bool(neg.any()):
            t = min(1.0, 0.99 * float((-x[neg] / step[neg]).min()))
        fx = f(x)
        slope = float(grad @ step)
        while t > 1e-12 and float(f(x + t * step)) > float(fx) + 1e-4 * t * slope:
            t *= 0.5
        if t <= 1e-12:  # no decrease representable in float64: at the optimum up to rounding
            break
        x = x + t * step
    grad = G @ x - x ** (-power)
    res = float(grad.abs().max() / (x ** (-power)).abs().max())
    if res < 1e-6:
        return x
    warnings.warn(f"newton_positive: residual {res:.3g} after {max_iter} iterations", SolverWarning, stacklevel=2)
    return x


def simplex_minimize(
    fun: Callable[[Tensor], Tensor],
    grad: Callable[[Tensor], Tensor],
    T: int,
    *,
    device: torch.device | None = None,
    iters: int = 1000,
    tol: float = 1e-8,
) -> Tensor:
    """``argmin_{w in simplex} fun(w)`` for a smooth convex ``fun`` with gradient ``grad``: accelerated projected
    gradient (FISTA) with backtracking on the Lipschitz estimate and adaptive restarts (O'Donoghue & Candès
    2015); stops when an iteration moves ``w`` by less than ``tol`` (max-norm)."""
    w = torch.full((T,), 1.0 / T, dtype=torch.float64, device=device)
    y, k, L = w.clone(), 1.0, 1.0
    fw = float(fun(w))
    step = float("inf")
    for _ in range(iters):
        g = grad(y)
        fy = float(fun(y))
        while True:
            w_new = project_simplex(y - g / L)
            diff = w_new - y
            f_new = float(fun(w_new))
            if f_new <= fy + float(g @ diff) + 0.5 * L * float(diff @ diff) + 1e-15 * (1 + abs(fy)):
                break
            L *= 2.0
        step = float((w_new - w).abs().max())
        k_new = (1 + (1 + 4 * k * k) ** 0.5) / 2
        if f_new > fw:  # restart the momentum
            y, k_new = w_new.clone(), 1.0
        else:
            y = w_new + ((k - 1) / k_new) * (w_new - w)
        w, fw, k = w_new, f_new, k_new
        L = max(L / 1.2, 1e-12)
        if step < tol:
            return w
    if step > 1e-6:
        warnings.warn(f"simplex_minimize: last step {step:.3g} after {iters} iterations", SolverWarning, stacklevel=2)
    return w


__all__ = ["SolverWarning", "box_qp", "min_norm_simplex", "project_simplex", "newton_positive", "simplex_minimize"]
