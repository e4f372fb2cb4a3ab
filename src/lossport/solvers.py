"""Small convex problems on T x T Gramians, solved in torch (float64, batched, on the tensors' device).

No external solver: the problems have at most a few hundred variables, and the methods used here are exact
(finite active-set pivoting, Newton) rather than first-order approximations. A solver that does not reach its
tolerance warns with the residual (``SolverWarning``); it never falls back silently to another answer.

* :func:`box_qp`: ``min 1/2 v^T G v + q^T v  s.t.  v >= lower``, many right-hand sides at once (UPGrad's ``T``
  dual-cone projections, DualProj, MGDA), by block principal pivoting, started from a float32 ADMM guess of
  the active sets when there are many problems per matrix, itself started from the solution of nearby problems
  when one is given (``start``: the previous training step's, a warm start).
* :func:`min_norm_simplex`: MGDA's min-norm point of the convex hull (closed form for ``T = 2``).
* :func:`newton_positive`: the positive root of ``G x = x^(-p)`` (Nash-MTL, FairGrad).
* :func:`simplex_minimize`: a smooth convex function on the simplex (CAGrad's dual problem).
* :func:`interior_qp`: a small convex QP with linear constraints (FORUM's), by a primal-dual interior-point method.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor


class SolverWarning(RuntimeWarning):
    """A solver stopped before its optimality conditions held to tolerance."""


def _solve_psd(A: Tensor, b: Tensor) -> Tensor:
    """``A x = b`` for symmetric PSD ``A`` (batched over leading dimensions): Cholesky where it succeeds,
    minimum-norm least squares (pseudo-inverse) for the matrices that are numerically singular."""
    L, info = torch.linalg.cholesky_ex(A)
    z = torch.linalg.solve_triangular(L, b.unsqueeze(-1), upper=False)
    x = torch.linalg.solve_triangular(L.mT, z, upper=True).squeeze(-1)
    bad = info != 0
    if bool(bad.any()):
        if A.dim() == 2:
            return (torch.linalg.pinv(A, hermitian=True) @ b.unsqueeze(-1)).squeeze(-1)
        x[bad] = (torch.linalg.pinv(A[bad], hermitian=True) @ b[bad].unsqueeze(-1)).squeeze(-1)
    return x


def _face_solve(
    Ga: Tensor, gi: Tensor | None, F: Tensor, nca: Tensor, pad: Tensor | float, ws: list[Tensor], chunk: int = 0
) -> Tensor:
    """``x_F = -G_FF^{-1} c_F`` and ``x_A = 0`` for each problem (row ``p`` of the mask ``F``, ``b x n``, with
    the matrix ``G[gi[p]]``; ``gi = None``: one matrix for all). ``Ga`` (``g x (n+1) x (n+1)``) is ``G``
    bordered by zeros (a dummy variable ``n``) and ``nca`` (``b x (n+1)``) is ``-c`` bordered by 0. Problems
    are sorted by the size of their free set and solved in chunks (``chunk`` problems; ``0``: 8 to 32, about
    1 MB of matrices), each padded to its largest free set with copies of the dummy (decoupled, diagonal
    ``pad``: one value for all when ``gi = None``, else one per problem), so that one gather (int32 flat
    indices) builds the chunk's matrices, which are factorised in place. ``ws`` holds the work buffers
    (indices, matrices, info), grown on demand and kept by the caller across iterations: fresh memory is
    expensive (page faults). Returns ``x`` bordered."""
    b, n = F.shape
    N = n + 1
    cs, idx = torch.sort(F.sum(-1))  # problems by the size of their free set
    counts = cs.tolist()
    if chunk <= 0:  # about 1 MB of matrices per chunk
        chunk = max(8, min(32, 2**17 // max(1, counts[-1] ** 2)))
    # per (sorted) problem: its free variables (in index order), then the dummy: free variable j goes to column
    # (its rank among the free ones), the others to a spare column n that is dropped (a scatter: 3x faster than a
    # stable argsort of the mask at n = 128)
    Fs = F[idx]
    perm = torch.full((b, N), n, dtype=torch.long, device=F.device)
    ar = torch.arange(n, device=F.device)
    perm.scatter_(-1, torch.where(Fs, Fs.cumsum(-1) - 1, n), ar.expand(b, n))
    perm = perm[:, :n]
    ncs = nca[idx]
    pads = pad if isinstance(pad, float) else pad[idx]
    gis = None if gi is None else gi[idx] * N
    flat = Ga.reshape(-1)
    idt = torch.int32 if flat.numel() < 2**31 else torch.long
    size, nbmax = min(chunk, b) * counts[-1] ** 2, min(chunk, b)
    if not ws or ws[0].numel() < size or ws[2].numel() < nbmax:
        size, nbmax = (size, nbmax) if not ws else (max(size, ws[0].numel()), max(nbmax, ws[2].numel()))
        ws[:] = [
            torch.empty(size, dtype=idt, device=F.device),
            torch.empty(size, dtype=nca.dtype, device=F.device),
            torch.empty(nbmax, dtype=torch.int32, device=F.device),
        ]
    xs = torch.zeros(b, N, dtype=nca.dtype, device=nca.device)
    for s in range(0, b, chunk):
        e = min(s + chunk, b)
        k, nb = counts[e - 1], e - s
        if k == 0:
            continue
        order = perm[s:e, :k]
        rows = order if gis is None else order + gis[s:e, None]
        ix = torch.add((rows * N)[:, :, None], order[:, None, :], out=ws[0][: nb * k * k].view(nb, k, k))
        sub = torch.index_select(flat, 0, ix.view(-1), out=ws[1][: nb * k * k]).view(nb, k, k)
        dummy = order == n  # their diagonal entries are 0 (the border of Ga): set them to pad
        dpad = pads if isinstance(pads, float) else torch.where(dummy, pads[s:e, None], 0.0)
        if isinstance(dpad, float):
            sub.diagonal(dim1=-2, dim2=-1).masked_fill_(dummy, dpad)
        else:
            sub.diagonal(dim1=-2, dim2=-1).add_(dpad)
        rhs = ncs[s:e].gather(-1, order).unsqueeze(-1)
        info = ws[2][:nb]
        torch.linalg.cholesky_ex(sub, out=(sub, info))  # in place (out aliases the input): sub holds L
        z = torch.linalg.solve_triangular(sub, rhs, upper=False)
        sol = torch.linalg.solve_triangular(sub.mT, z, upper=True).squeeze(-1)
        if bool(info.any()):  # numerically singular faces: minimum-norm least squares
            bad = (info != 0).nonzero().squeeze(-1)
            A = flat[ix[bad].long()]
            A.diagonal(dim1=-2, dim2=-1).add_(dummy[bad] * dpad if isinstance(dpad, float) else dpad[bad])
            sol[bad] = (torch.linalg.pinv(A, hermitian=True) @ rhs[bad]).squeeze(-1)
        xs[s:e].scatter_(-1, order, sol)  # the dummies' entries (column n) are 0
    return torch.empty_like(xs).index_copy_(0, idx, xs)


def _admm_support(G: Tensor, c: Tensor, max_iter: int, rho: float = 1.0, x0: Tensor | None = None) -> Tensor:
    """A guess of the free sets of the LCPs of :func:`_lcp_bpp` (``G``: ``g x n x n``, ``c``: ``g x r x n``)
    from ADMM (Boyd et al. 2011) on ``min 1/2 x^T G x + c^T x, x >= 0`` with the split ``x = z``, ``z >= 0``,
    over-relaxed with factor 2 (Peaceman-Rachford; linear convergence for positive definite ``G``), in
    float32. The ``r`` problems of a matrix share one inverse ``P = (G + rho_g I)^{-1}`` (``rho_g = rho *
    trace(G) / n``; computed on ``G`` and ``c`` scaled by ``n / trace(G)``). With ``w = 2 x - z + u`` (so
    that ``z = max(w, 0)`` and ``u = min(w, 0)``) a step is ``w <- -2 c P + |w| (2 rho_g P - I)``: one matrix
    product. Its fixed points are ``w = x - y / rho_g`` with ``(x, y = G x + c)`` the solution of the LCP (on the
    scaled problem), so a start ``x0`` (``g x r x n``, e.g. the solution of the previous training step's problems)
    starts from ``w = x0 - (G x0 + c) / rho_g``, a fixed point when ``x0`` solves these problems; else from ``w =
    0``. Stops when the support of ``z`` is the one of three steps before, or after ``max_iter`` steps.
    Returns the mask ``z > 0``. Only a starting point: the exact pivoting that follows decides (a singular
    ``G`` just gives a worse start). ``rho = 1`` (was 0.3): on Gramians replayed from a training run
    (``benchmarks/replay.py``) it needs about half the steps, on random Gramians the same."""
    n = G.shape[-1]
    # scaled to mean diagonal 1 (same minimiser; no float32 under- or overflow), then rho_g = rho
    s = G.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)[:, None, None]
    eye = torch.eye(n, dtype=torch.float32, device=G.device)
    L, info = torch.linalg.cholesky_ex((G / s).to(torch.float32) + rho * eye)
    if bool(info.any()):
        return c < 0 if x0 is None else x0 > 0
    P = torch.cholesky_inverse(L)
    e = ((c / s).to(torch.float32) @ P).mul_(-2.0)
    Q = P.mul_(2 * rho).sub_(eye)
    if x0 is None:
        w = e.clone()  # the step from w = 0 (z = u = 0)
    else:  # the step from w = x0 - y0 / rho_g, y0 = G x0 + c on the scaled problem (G symmetric: rows x0 G)
        w0 = x0 - torch.baddbmm(c, x0, G).div_(s * rho)
        w = torch.baddbmm(e, w0.abs_().to(torch.float32), Q)
    a = torch.empty_like(w)
    prev = w > 0
    for it in range(2, max_iter + 1):
        torch.baddbmm(e, torch.abs(w, out=a), Q, out=w)
        if it % 3 == 0:
            now = w > 0
            if torch.equal(now, prev):
                break
            prev = now
    return w > 0


def _lcp_bpp(
    G: Tensor, c: Tensor, tol: float, max_iter: int, F0: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The linear complementarity problem ``x >= 0, y = G x + c >= 0, x^T y = 0`` for PSD ``G`` (``g x n x
    n``) and ``c`` (``g x r x n``: ``r`` problems per matrix), by block principal pivoting (Júdice & Pires
    1994; the NNLS form of Kim & Park, SIAM J. Sci. Comput. 2011).

    Each iteration fixes a free set ``F`` per problem (the first one: ``F0``, ``g x r x n``, e.g. from
    :func:`_admm_support`, or ``c < 0``), solves ``G_FF x_F = -c_F`` exactly (all unfinished problems at once,
    in chunks sorted by the size of the free set: see :func:`_face_solve`) and swaps every variable that
    violates ``x_F >= 0`` or ``y_A >= 0`` between the sets. When a problem's count of violations has not decreased for
    three iterations it swaps only its largest-index violator (Murty's rule), which makes the method finite for positive
    definite ``G``. Problems leave the batch as soon as they satisfy the conditions. Returns ``(x, y, converged)``."""
    g, r, n = c.shape
    dev, dt = c.device, c.dtype
    B = g * r
    dmax = G.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp_min(1e-300)  # (g,)
    Ga = torch.zeros(g, n + 1, n + 1, dtype=dt, device=dev)
    Ga[:, :n, :n] = G
    cf = c.reshape(B, n)
    nca = torch.cat([-cf, torch.zeros(B, 1, dtype=dt, device=dev)], -1)
    X, Y = torch.zeros(B, n, dtype=dt, device=dev), cf  # (max_iter = 0)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    ar = torch.arange(n, device=dev)
    # state of the unfinished problems, aligned with ``act``
    act = torch.arange(B, device=dev)
    gi = None if g == 1 else torch.arange(g, device=dev).repeat_interleave(r)
    pad: Tensor | float = float(dmax[0]) if g == 1 else dmax[gi]
    ncb = nca
    cscale = cf.abs().amax(-1)
    F = cf < 0 if F0 is None else F0.reshape(B, n)  # cold start from x = 0, y = c: free every y < 0
    best = budget = cscale  # (set in the first iteration: every count of violations is an improvement)
    ws: list[Tensor] = []  # work buffers of the face solves
    for it in range(max_iter):
        x = _face_solve(Ga, gi, F, ncb, pad, ws)[:, :n]
        if gi is None:
            y = torch.addmm(ncb[:, :n], x, G[0], beta=-1)  # G symmetric: rows of X G are (G x)^T
        else:
            y = torch.baddbmm(ncb[:, None, :n], x.unsqueeze(-2), G[gi], beta=-1).squeeze(-2)
        xs = x.abs().amax(-1)
        lim = torch.where(F, xs[:, None], torch.maximum(cscale, xs * pad)[:, None]).mul_(-tol)
        viol = torch.where(F, x, y) < lim
        nv = viol.sum(-1)
        if it == 0:
            X, Y = x, y
        else:
            X[act], Y[act] = x, y
        fin = nv == 0
        if bool(fin.any()):
            done[act[fin]] = True
            keep = (~fin).nonzero().squeeze(-1)
            if keep.numel() == 0:
                break
            act, F, viol, nv, ncb, cscale = act[keep], F[keep], viol[keep], nv[keep], ncb[keep], cscale[keep]
            if it > 0:
                best, budget = best[keep], budget[keep]
            if gi is not None:
                gi, pad = gi[keep], pad[keep] if isinstance(pad, Tensor) else pad
        if it == 0:
            best, budget = nv, torch.full_like(nv, 3)
        else:
            improved = nv < best
            best = torch.minimum(best, nv)
            budget = torch.where(improved, 3, budget - 1)
        if it >= 3:  # budgets start at 3: only from the fifth iteration can one be negative
            last = torch.where(viol, ar, -1).amax(-1, keepdim=True)
            single = torch.zeros_like(viol).scatter_(-1, last.clamp_min(0), True) & viol
            viol = torch.where((budget >= 0)[:, None], viol, single)
        F = F ^ viol
    return X.clamp_min(0).view(g, r, n), Y.view(g, r, n), done.view(g, r)


def box_qp(
    G: Tensor,
    q: Tensor | None,
    lower: Tensor,
    *,
    ridge: float = 0.0,
    tol: float = 1e-10,
    max_iter: int = 100,
    warm: int | None = None,
    start: Tensor | None = None,
) -> Tensor:
    """``argmin_v 1/2 v^T G v + q^T v  s.t.  v >= lower``, exactly, for many problems at once.

    Shapes: ``G`` is ``(*batch, n, n)`` (symmetric PSD), ``lower`` is ``(*batch, k, n)`` (``k`` problems per
    matrix: UPGrad projects ``k = n`` vectors on the dual cone of the same ``G``), ``q`` is ``None`` (zero) or
    shaped as ``lower``. Returns ``v`` shaped as ``lower``, float64.

    With ``x = v - lower`` the KKT conditions are the linear complementarity problem ``x >= 0``, ``y = G x + q
    + G lower >= 0``, ``x^T y = 0`` (``y`` is the multiplier of the bound), solved by block principal pivoting
    (:func:`_lcp_bpp`); the answer is exact up to the rounding of one Cholesky solve. ``ridge`` adds ``ridge *
    max(diag G) * I`` first (singular ``G``: more parts than independent gradients). ``warm``: at most that many
    float32 ADMM steps (:func:`_admm_support`, one shared matrix inverse and one matrix product per step for
    all problems of a matrix) guess the free sets the pivoting starts from; ``None``: 200 when there are at
    least 4 problems per matrix and ``n >= 16`` (UPGrad: then usually one exact pivoting step), else 0 (cold
    start). ``start``: a solution of nearby problems, shaped as ``lower`` (the previous training step's, for a
    warm start): the ADMM steps start from it (see :func:`_admm_support`), or, without them, the pivoting starts
    from its free set ``start > lower``; if some problem has not converged from there after ``max_iter``
    pivoting steps (a start far from the answer can leave the pivoting to Murty's one-variable steps), all
    are solved again from the cold start. The guess and the start only change the path, not the answer (the
    last pivoting step solves the final free set exactly). Warns (``SolverWarning``) with the KKT residual if
    some problem has not converged after ``max_iter`` pivoting steps."""
    G = G.to(torch.float64)
    lower = lower.to(torch.float64)
    n = G.shape[-1]
    if lower.dim() < 2 or lower.shape[-1] != n:
        raise ValueError(f"box_qp: lower must be (*batch, k, {n}) for G of shape {tuple(G.shape)}")
    batch = torch.broadcast_shapes(G.shape[:-2], lower.shape[:-2])
    k = lower.shape[-2]
    if ridge > 0:
        dmax = G.diagonal(dim1=-2, dim2=-1).abs().amax(-1)[..., None, None]
        G = G + ridge * dmax * torch.eye(n, dtype=torch.float64, device=G.device)
    Gb = G.expand((*batch, n, n)).reshape(-1, n, n)
    low = lower.expand((*batch, k, n)).reshape(-1, k, n)
    c = low @ Gb  # (G lower)^T per problem
    if q is not None:
        c = c + q.to(torch.float64).expand((*batch, k, n)).reshape(-1, k, n)
    if warm is None:  # many problems per matrix: start the pivoting from an ADMM guess of the free sets
        warm = 200 if n >= 16 and k >= 4 else 0
    x0 = None
    if start is not None:
        if start.shape[-2:] != (k, n):
            raise ValueError(f"box_qp: start must be shaped as lower (*batch, {k}, {n}), not {tuple(start.shape)}")
        x0 = (start.to(torch.float64).expand((*batch, k, n)).reshape(-1, k, n) - low).clamp_min_(0)
    F0 = _admm_support(Gb, c, warm, x0=x0) if warm > 0 else None if x0 is None else x0 > 0
    x, y, ok = _lcp_bpp(Gb, c, tol, max_iter, F0)
    if x0 is not None and not bool(ok.all()):  # a start the pivoting did not finish from: again from the cold start
        x, y, ok = _lcp_bpp(Gb, c, tol, max_iter, _admm_support(Gb, c, warm) if warm > 0 else None)
    if not bool(ok.all()):
        res = kkt_residual(x, y)
        warnings.warn(
            f"box_qp: {int((~ok).sum())} of {ok.numel()} problems not converged after {max_iter} "
            f"pivoting steps; KKT residual {float(res.max()):.3g}",
            SolverWarning,
            stacklevel=2,
        )
    return (low + x).reshape((*batch, k, n))


def kkt_residual(x: Tensor, y: Tensor) -> Tensor:
    """Relative KKT residual of a complementarity pair (``x >= 0``, ``y >= 0``, ``x_i y_i = 0``) per problem:
    ``max(max(-x)/|x|, max(-y)/|y|, max |x_i y_i| / (|x| |y|))`` with max-norms."""
    xs = x.abs().amax(-1).clamp_min(1e-300)
    ys = y.abs().amax(-1).clamp_min(1e-300)
    return torch.stack(
        [(-x).clamp_min(0).amax(-1) / xs, (-y).clamp_min(0).amax(-1) / ys, (x * y).abs().amax(-1) / (xs * ys)]
    ).amax(0)


def min_norm_simplex(G: Tensor, *, tol: float = 1e-10) -> Tensor:
    """``argmin_{w in simplex} w^T G w`` (the MGDA min-norm point; Sener & Koltun 2018), batched over the
    leading dimensions of ``G`` (``(*batch, T, T)`` -> ``(*batch, T)``).

    ``T = 2``: ``w_1 = clip((G_22 - G_12) / (G_11 + G_22 - 2 G_12), 0, 1)`` (their Eq. 4). Otherwise through
    the equivalent ``min_{u >= 0} 1/2 u^T G u - 1^T u`` with ``w = u / sum(u)`` (its KKT conditions ``G u = 1
    + y`` are those of the simplex problem scaled by ``1 / sum(u)``), solved exactly by :func:`box_qp`. ``G``
    is scaled by its trace and gets a ridge of ``1e-9`` so that the problem stays bounded when the convex hull
    contains 0 (linearly dependent gradients: then the min-norm value is ~0 and ``w`` is one minimiser)."""
    G = G.to(torch.float64)
    T = G.shape[-1]
    if T == 1:
        return torch.ones(G.shape[:-1], dtype=torch.float64, device=G.device)
    if T == 2:
        den = G[..., 0, 0] + G[..., 1, 1] - 2 * G[..., 0, 1]
        a = ((G[..., 1, 1] - G[..., 0, 1]) / den.clamp_min(1e-300)).clamp(0, 1)
        a = torch.where(den > 1e-300, a, torch.full_like(a, 0.5))
        return torch.stack([a, 1 - a], -1)
    tr = G.diagonal(dim1=-2, dim2=-1).sum(-1)
    Gn = G / tr.clamp_min(1e-300)[..., None, None]
    zeros = torch.zeros((*G.shape[:-2], 1, T), dtype=torch.float64, device=G.device)
    u = box_qp(Gn, zeros - 1.0, zeros, ridge=1e-9, tol=tol).squeeze(-2)
    w = u / u.sum(-1, keepdim=True)
    return torch.where((tr > 0)[..., None], w, torch.full_like(w, 1.0 / T))


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


def _check_finite(G: Tensor, what: str) -> None:
    if not bool(torch.isfinite(G).all()):
        raise FloatingPointError(
            f"{what}: the matrix has NaN or inf entries (non-finite gradients, or gradients so large that their "
            "inner products overflow float64); nothing to solve"
        )


def _newton_core(
    G: Tensor, power: float, x: Tensor, tol: float, max_iter: int, diverge: float
) -> tuple[Tensor, Tensor]:
    """Damped Newton for ``G x = x^(-power)`` from ``x`` (``G`` float64 with diagonal of order 1). Returns
    ``(x, residual)``. Batched; each problem stops on its own once converged, once some ``x_i
    d_i^(1/(1+power))`` exceeds ``diverge`` (no root: a nonnegative null combination of the gradients, the
    iterates grow without bound), or once no step decreases ``f`` (stalled at rounding level)."""
    is_log = abs(power - 1.0) < 1e-15
    scale = G.diagonal(dim1=-2, dim2=-1).clamp_min(0) ** (1.0 / (1.0 + power))

    def f(z: Tensor) -> Tensor:
        h = torch.log(z) if is_log else z ** (1 - power) / (1 - power)
        return 0.5 * ((z.unsqueeze(-2) @ G).squeeze(-2) * z).sum(-1) - h.sum(-1)

    def residual(z: Tensor) -> tuple[Tensor, Tensor]:
        grad = (G @ z.unsqueeze(-1)).squeeze(-1) - z ** (-power)
        return grad, grad.abs().amax(-1) / (z ** (-power)).abs().amax(-1)

    absG = G.abs()
    ulp = G.shape[-1] * torch.finfo(torch.float64).eps

    def floor(z: Tensor) -> Tensor:
        """The rounding level of the residual at ``z``: ``T eps max_i (|G| z)_i / max_i z_i^-p``."""
        return ulp * (absG @ z.unsqueeze(-1)).squeeze(-1).amax(-1) / (z ** (-power)).amax(-1)

    grad, res = residual(x)
    active = torch.ones_like(res, dtype=torch.bool)
    for _ in range(max_iter):
        # each problem stops on its own: converged (to tol, or to the rounding level of G x near a singular G,
        # where the residual only bounces), diverging (no root), or stalled (no step decreases f)
        active &= (res >= tol) & (res > floor(x)) & ((x * scale).amax(-1) <= diverge)
        if not bool(active.any()):
            break
        H = G + torch.diag_embed(power * x ** (-power - 1))
        step = -_solve_psd(H, grad)
        # largest step keeping x > 0 (x + t step >= 0.01 x), then halve until Armijo holds
        ratio = torch.where(step < 0, -x / step.clamp_max(-1e-300), torch.full_like(x, float("inf")))
        t = torch.where(active, (0.99 * ratio.amin(-1)).clamp(max=1.0), torch.zeros_like(res))
        fx = f(x)
        slope = (grad * step).sum(-1)
        ok = ~active
        for _ in range(40):  # Armijo on f, or (near the optimum, where f is flat to rounding) a residual decrease
            cand = x + t[..., None] * step
            ok = ok | (f(cand) <= fx + 1e-4 * t * slope) | (residual(cand)[1] <= 0.5 * res)
            if bool(ok.all()):
                break
            t = torch.where(ok, t, 0.5 * t)
        active &= ok  # a failed line search: f is flat to rounding along the step, nothing more to gain
        x = x + torch.where(ok, t, torch.zeros_like(t))[..., None] * step
        grad, res = residual(x)
    return x, res


def newton_positive(
    G: Tensor,
    power: float,
    *,
    x0: Tensor | None = None,
    tol: float = 1e-12,
    max_iter: int = 100,
    diverge: float = 1e12,
) -> Tensor:
    """Positive solution of ``G x = x^(-power)`` (element-wise power), for PSD ``G`` with positive diagonal;
    batched over the leading dimensions of ``G``.

    It is the minimiser of the strictly convex ``f(x) = 1/2 x^T G x - sum_i h(x_i)`` with ``h'(x) = x^-power``
    (``h = log`` for ``power = 1``: Nash-MTL's ``G a = 1/a``, Navon et al. 2022; ``power = 1/alpha``:
    FairGrad, Ban & Ji 2024). Damped Newton with a positivity-preserving Armijo backtracking line search; warm
    start ``x0``. Stops when ``max |G x - x^-p| <= tol max |x^-p|`` in every problem; warns with that residual
    if it, or ``max_i |x_i^p (G x)_i - 1|``, is still above ``1e-6`` after ``max_iter`` steps.

    Scale: the root of ``c G`` is ``c^(-1/(1+p))`` times that of ``G``; the problem is solved on ``G / s``
    (``s`` the largest diagonal entry) and the root rescaled exactly, so Gramians of any finite scale (1e-300 to
    1e300) take the same steps. A root need not exist: when a nonnegative combination of the gradients is 0
    (e.g. exactly opposite gradients, or a zero gradient) ``f`` is unbounded below and the iterates grow without
    bound; Newton stops once some ``x_i sqrt[1+p](G_ii / s)`` exceeds ``diverge`` and warns. Non-finite ``G``:
    ``FloatingPointError``."""
    if power <= 0:
        raise ValueError(f"newton_positive: power must be > 0, not {power}")
    G = G.to(torch.float64)
    _check_finite(G, "newton_positive")
    s = G.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(1e-300)
    k = s ** (1.0 / (1.0 + power))  # x(G) = x(G / s) / k
    Gn = G / s[..., None, None]
    d = Gn.diagonal(dim1=-2, dim2=-1).clamp_min(1e-300)
    x = d ** (-1.0 / (1.0 + power)) if x0 is None else (x0.to(torch.float64) * k[..., None]).expand_as(d)
    x = x.clamp_min(1e-12).clone()
    x, res = _newton_core(Gn, power, x, tol, max_iter, diverge)
    # per component, x_i^p (G x)_i = 1 at the root: a diverging pair (x_i -> inf, (G x)_i ~ 0) fails it even when
    # the max-norm residual, relative to the largest x_j^-p, looks small
    comp = float(((Gn @ x.unsqueeze(-1)).squeeze(-1) * x**power - 1).abs().max())
    if not bool((res < 1e-6).all()) or comp > 1e-6:
        warnings.warn(
            f"newton_positive: residual {float(res.max()):.3g} (largest |x_i^p (G x)_i - 1| {comp:.3g}) after at "
            f"most {max_iter} iterations (no positive root when a nonnegative combination of the gradients "
            "vanishes: the iterates grow without bound)",
            SolverWarning,
            stacklevel=2,
        )
    return x / k[..., None]


def simplex_minimize(
    fun: Callable[[Tensor], Tensor],
    grad: Callable[[Tensor], Tensor],
    T: int,
    *,
    device: torch.device | None = None,
    iters: int = 1000,
    tol: float = 1e-8,
    max_backtrack: int = 80,
) -> Tensor:
    """``argmin_{w in simplex} fun(w)`` for a smooth convex ``fun`` with gradient ``grad``: accelerated
    projected gradient (FISTA) with backtracking on the Lipschitz estimate and adaptive restarts (O'Donoghue &
    Candès 2015); stops when an iteration moves ``w`` by less than ``tol`` (max-norm), warns otherwise.

    Bounded: at most ``iters`` iterations of at most ``max_backtrack`` doublings of the Lipschitz estimate
    (starting from 1: the caller scales ``fun`` to order 1); a non-finite value or gradient raises
    ``FloatingPointError``, and a backtracking that does not find a decrease warns and returns the best point."""
    w = torch.full((T,), 1.0 / T, dtype=torch.float64, device=device)
    y, k, L = w.clone(), 1.0, 1.0
    fw = _finite_value(fun(w), w)
    step = float("inf")
    for _ in range(iters):
        g = grad(y)
        fy = _finite_value(fun(y), y)
        if not bool(torch.isfinite(g).all()):
            raise FloatingPointError(f"simplex_minimize: non-finite gradient {g.tolist()} at {y.tolist()}")
        for _ in range(max_backtrack):
            w_new = project_simplex(y - g / L)
            diff = w_new - y
            f_new = _finite_value(fun(w_new), w_new)
            if f_new <= fy + float(g @ diff) + 0.5 * L * float(diff @ diff) + 1e-15 * (1 + abs(fy)):
                break
            L *= 2.0
        else:
            warnings.warn(
                f"simplex_minimize: no decrease after {max_backtrack} halvings of the step (Lipschitz estimate "
                f"{L:.3g}); returning the best point",
                SolverWarning,
                stacklevel=2,
            )
            return w
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
    warnings.warn(f"simplex_minimize: last step {step:.3g} after {iters} iterations", SolverWarning, stacklevel=2)
    return w


def _finite_value(v: Tensor, at: Tensor) -> float:
    f = float(v)
    if not math.isfinite(f):
        raise FloatingPointError(f"simplex_minimize: the objective is {f} at {at.tolist()}")
    return f


def interior_qp(
    Q: Tensor,
    q: Tensor,
    C: Tensor,
    d: Tensor,
    E: Tensor,
    e: Tensor,
    *,
    tol: float = 1e-9,
    max_iter: int = 60,
) -> Tensor:
    """``argmin_x 1/2 x^T Q x + q^T x  s.t.  C x >= d,  E x = e`` for small dense convex problems (``Q`` PSD),
    batched over leading dimensions, float64, on the tensors' device: a primal-dual interior-point method
    (Nocedal & Wright, *Numerical Optimization*, 2nd ed., §16.6) with Mehrotra's adaptive centring
    ``sigma = (mu_aff / mu)^3`` from an affine predictor step, but without his second-order corrector term (with
    it the iterates oscillated between two vertices on some of FORUM's problems), which converges in a few tens
    of Newton steps to the tolerance. A numerically singular system is solved by least squares. Each step
    solves the reduced KKT system
    ``[[Q + C^T (Z/S) C, -E^T], [E, 0]]`` (``Z``, ``S``: the inequality multipliers and slacks), so ``Q`` may be
    singular when ``C`` bounds every variable (FORUM's problem). Shapes: ``Q`` ``(*b, n, n)``, ``q`` ``(*b, n)``,
    ``C`` ``(*b, m, n)``, ``d`` ``(*b, m)``, ``E`` ``(*b, k, n)``, ``e`` ``(*b, k)`` (``E`` of full row rank).
    Polishing: once the residual (relative residuals and mean complementarity) is below ``1e-6``, the
    constraints whose slack is below their multiplier are taken as active and the KKT system of that face is
    solved directly; where that point is feasible with non-negative multipliers it satisfies the KKT conditions
    (the exact optimum, inactive bounds' variables exactly zero, not ``mu / z``) and is returned. Otherwise the
    iterations go on to the tolerance ``tol``; warns (``SolverWarning``) with the residual if neither the
    polishing nor the tolerance is reached after ``max_iter`` steps. The constraint rows are scaled to unit
    length and each KKT residual is measured relative to the size of its own terms, so that an objective whose
    terms span many orders of magnitude (FORUM's ``||g_q||^2`` of 1e24 beside unit Gramian entries, when the
    inner steps diverge) still converges; the variables are not rescaled (FORUM's are all of order 1, and
    rescaling them to a unit diagonal of ``Q`` there put 1e11 beside 1 in the iterates and stalled them)."""
    Q, q, C, d, E, e = (t.to(torch.float64) for t in (Q, q, C, d, E, e))
    rc, re = C.norm(dim=-1).clamp_min(1e-300), E.norm(dim=-1).clamp_min(1e-300)  # unit rows
    return _interior(Q, q, C / rc[..., None], d / rc, E / re[..., None], e / re, tol, max_iter)


def _interior(Q: Tensor, q: Tensor, C: Tensor, d: Tensor, E: Tensor, e: Tensor, tol: float, max_iter: int) -> Tensor:
    """:func:`interior_qp` with unit constraint rows."""
    n, m, k = Q.shape[-1], C.shape[-2], E.shape[-2]
    batch = torch.broadcast_shapes(Q.shape[:-2], q.shape[:-1], C.shape[:-2], E.shape[:-2])
    x = torch.zeros((*batch, n), dtype=torch.float64, device=Q.device)
    y = torch.zeros((*batch, k), dtype=torch.float64, device=Q.device)
    s = torch.ones((*batch, m), dtype=torch.float64, device=Q.device)
    z = torch.ones_like(s)
    res = torch.full(batch, float("inf"), dtype=torch.float64, device=Q.device)
    for _ in range(max_iter):
        rd = _mv(Q, x) + q - _mv(E.mT, y) - _mv(C.mT, z)
        rp = _mv(E, x) - e
        rs = _mv(C, x) - d - s
        mu = (s * z).mean(-1)
        res = _relative_residual(Q, q, C, d, E, e, x, y, s, z, rd, rp, rs, mu)
        if bool((res <= 1e-6).all()):  # near: try the face the iterates point to
            polished, ok = _polish(Q, q, C, d, E, e, x, s, z, tol)
            if all(ok) or bool((res <= tol).all()):
                return polished
        K, D = _kkt_matrix(Q, C, E, s, z)
        _, _, dsa, dza = _newton(K, D, C, rd, rp, rs, s, z, -s * z, n)
        a_aff = torch.minimum(_step_to_boundary(s, dsa), _step_to_boundary(z, dza)).clamp(max=1.0)
        mu_aff = ((s + a_aff[..., None] * dsa) * (z + a_aff[..., None] * dza)).mean(-1)
        sigma = (mu_aff / mu.clamp_min(1e-300)).clamp(1e-3, 1) ** 3  # Mehrotra's centring
        comp = -s * z + (sigma * mu)[..., None]  # without his second-order term: it made FORUM's steps oscillate
        dx, dy, ds, dz = _newton(K, D, C, rd, rp, rs, s, z, comp, n)
        a = (0.995 * torch.minimum(_step_to_boundary(s, ds), _step_to_boundary(z, dz))).clamp(max=1.0)
        a = a[..., None]
        x, y, s, z = x + a * dx, y + a * dy, s + a * ds, z + a * dz
    polished, ok = _polish(Q, q, C, d, E, e, x, s, z, tol)
    if all(ok):
        return polished
    warnings.warn(
        f"interior_qp: residual {float(res.max()):.3g} after {max_iter} steps (tolerance {tol:.1g})",
        SolverWarning,
        stacklevel=3,
    )
    return polished


def _relative_residual(
    Q: Tensor,
    q: Tensor,
    C: Tensor,
    d: Tensor,
    E: Tensor,
    e: Tensor,
    x: Tensor,
    y: Tensor,
    s: Tensor,
    z: Tensor,
    rd: Tensor,
    rp: Tensor,
    rs: Tensor,
    mu: Tensor,
) -> Tensor:
    """The largest residual of the KKT conditions, each row relative to the size of its own terms (a variable
    whose terms are 1e24 does not hide the others' residuals, nor theirs its rounding)."""
    ax, az = x.abs().unsqueeze(-1), z.abs().unsqueeze(-1)
    sd = 1 + (Q.abs() @ ax).squeeze(-1) + q.abs() + (E.mT.abs() @ y.abs().unsqueeze(-1)).squeeze(-1)
    sd = sd + (C.mT.abs() @ az).squeeze(-1)
    sp = 1 + (E.abs() @ ax).squeeze(-1) + e.abs()
    ss = 1 + (C.abs() @ ax).squeeze(-1) + d.abs() + s
    obj = 1 + (x * _mv(Q, x)).sum(-1).abs() + (q * x).sum(-1).abs()
    parts = [(rd.abs() / sd).amax(-1), (rp.abs() / sp).amax(-1), (rs.abs() / ss).amax(-1), mu * s.shape[-1] / obj]
    return torch.stack(parts).amax(0)


def _polish(
    Q: Tensor, q: Tensor, C: Tensor, d: Tensor, E: Tensor, e: Tensor, x: Tensor, s: Tensor, z: Tensor, tol: float
) -> tuple[Tensor, list[bool]]:
    """The solution of the KKT system of the face guessed from ``s < z`` (see :func:`interior_qp`), problem by
    problem, where it is feasible with non-negative multipliers (then it satisfies the KKT conditions: the
    optimum); else ``x``. Also returns which problems were polished."""
    n, k = x.shape[-1], E.shape[-2]
    batch = x.shape[:-1]
    parts = [t.expand((*batch, *t.shape[-2:])) for t in (Q, C, E)]
    vecs = [t.expand((*batch, t.shape[-1])) for t in (q, d, e)]
    out = x.reshape(-1, n).clone()
    flat = [t.reshape(-1, *t.shape[-2:]) for t in parts] + [t.reshape(-1, t.shape[-1]) for t in vecs]
    act = (s < z).reshape(-1, s.shape[-1])
    ok = [False] * out.shape[0]
    for b in range(out.shape[0]):
        Qb, Cb, Eb, qb, db, eb = (t[b] for t in flat)
        Ca, da = Cb[act[b]], db[act[b]]
        a = Ca.shape[0]
        K = torch.zeros(n + a + k, n + a + k, dtype=x.dtype, device=x.device)
        K[:n, :n], K[:n, n : n + a], K[:n, n + a :] = Qb, -Ca.T, -Eb.T
        K[n : n + a, :n], K[n + a :, :n] = Ca, Eb
        rhs = torch.cat([-qb, da, eb])
        sol, info = torch.linalg.solve_ex(K, rhs)
        if int(info) != 0 or not bool(torch.isfinite(sol).all()):
            continue
        sol = sol + torch.linalg.solve_ex(K, rhs - K @ sol)[0]  # one step of iterative refinement
        xb, lam = sol[:n], sol[n : n + a]
        scale = 1.0 + float(sol.abs().max())
        worst = float(torch.cat([Cb @ xb - db, lam, xb.new_zeros(1)]).min())
        if worst >= -max(tol, 1e-9) * scale:
            out[b], ok[b] = xb, True
    return out.reshape(x.shape), ok


def _mv(A: Tensor, v: Tensor) -> Tensor:
    return (A @ v.unsqueeze(-1)).squeeze(-1)


def _kkt_matrix(Q: Tensor, C: Tensor, E: Tensor, s: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """The reduced KKT matrix ``[[Q + C^T D C, -E^T], [E, 0]]`` and ``D = z / s``."""
    D = z / s
    H = Q + C.mT @ (D.unsqueeze(-1) * C)
    k = E.shape[-2]
    top = torch.cat([H, -E.mT.expand((*H.shape[:-2], *E.mT.shape[-2:]))], -1)
    zeros = torch.zeros((*H.shape[:-2], k, k), dtype=H.dtype, device=H.device)
    bottom = torch.cat([E.expand((*H.shape[:-2], *E.shape[-2:])), zeros], -1)
    return torch.cat([top, bottom], -2), D


def _newton(
    K: Tensor, D: Tensor, C: Tensor, rd: Tensor, rp: Tensor, rs: Tensor, s: Tensor, z: Tensor, comp: Tensor, n: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One Newton direction ``(dx, dy, ds, dz)`` for the complementarity target ``s dz + z ds = comp``."""
    rhs1 = -rd + _mv(C.mT, comp / s - D * rs)
    rhs = torch.cat([rhs1, -rp], -1)
    sol, info = torch.linalg.solve_ex(K, rhs)
    bad = info != 0  # numerically singular (multipliers or slacks at 1e-30 of each other): least squares
    if bool(bad.any()):
        if K.dim() == 2:
            sol = torch.linalg.pinv(K) @ rhs
        else:
            sol[bad] = (torch.linalg.pinv(K[bad]) @ rhs[bad].unsqueeze(-1)).squeeze(-1)
    dx, dy = sol[..., :n], sol[..., n:]
    ds = _mv(C, dx) + rs
    dz = (comp - z * ds) / s
    return dx, dy, ds, dz


def _step_to_boundary(v: Tensor, dv: Tensor) -> Tensor:
    """The largest ``a`` with ``v + a dv >= 0`` (``v > 0``; ``inf`` where no ``dv`` is negative)."""
    ratio = torch.where(dv < 0, -v / dv.clamp(max=-1e-300), torch.full_like(v, float("inf")))
    return ratio.amin(-1)


__all__ = [
    "SolverWarning",
    "box_qp",
    "interior_qp",
    "kkt_residual",
    "min_norm_simplex",
    "newton_positive",
    "project_simplex",
    "simplex_minimize",
]
