"""The standard two-task toy problem of CAGrad (Liu et al. 2021), Nash-MTL (Navon et al. 2022) and FAMO (Liu et al.
2023), exactly as their released code defines it, and a runner for any lossport balancer.

With ``x = (x1, x2)`` and ``LOWER = 5e-6``::

    f1 = log(max(|0.5 (-x1 - 7) - tanh(-x2)|, LOWER)) + 6
    f2 = log(max(|0.5 (-x1 + 3) + tanh(-x2) + 2|, LOWER)) + 6        (the code's "+ tanh"; the papers print "-")
    g1 = ((-x1 + 7)^2 + 0.1 (-x2 - 8)^2) / 10 - 20
    g2 = ((-x1 - 7)^2 + 0.1 (-x2 - 8)^2) / 10 - 20
    c1 = max(tanh(0.5 x2), 0),  c2 = max(tanh(-0.5 x2), 0)
    L1 = scale * (c1 f1 + c2 g1),  L2 = c1 f2 + c2 g2

``scale = 0.1`` in Nash-MTL and FAMO (the losses on different scales), 1 in CAGrad. The clamps pass the gradient
at their boundary (as ``torch.clamp`` in the authors' code), so the start (0, 0) moves. The Pareto set is the
curve ``x2 = x2*(x1)`` for ``x1`` in [-7, 7], ``x2*`` between -8.3551 and -8.4345; :func:`pareto_residual` is the
norm of the min-norm convex combination of the two gradients (0 exactly at Pareto-stationary points).

:func:`run` optimises one start with any balancer through autograd. The authors' protocols (35,000-100,000
Adam steps) are run by :func:`run_batched` (every method x start in one array: closed-form gradients,
:func:`losses_and_jacobian`, and lossport's weighting functions, :func:`batched_weighting`) and
:func:`run_loss_level` (FAMO's balancers through their public API), which take the steps of :func:`run` with
the registered balancer (``tests/test_toy.py``).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .balance import Balancer, Context, resolve
from .result_types import Losses

LOWER = 5e-6
STARTS: tuple[tuple[float, float], ...] = ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))
"""The five starting points of the Nash-MTL and FAMO code."""
PAPER_METHODS: tuple[str, ...] = ("ew", "mgda", "pcgrad", "cagrad", "nash_mtl", "famo", "fairgrad")
"""The methods whose papers show this toy problem (CAGrad, Nash-MTL, FAMO and FairGrad figures)."""
PARETO_X2 = -8.3552
"""The x2 of the Pareto segment as the authors' plots draw it (``x1`` in [-7, 7])."""


def losses(x: Tensor, scale: float = 0.1) -> tuple[Tensor, Tensor]:
    """``(L1, L2)`` at ``x`` (shape (2,), or (2, ...) for a grid of points), differentiable."""
    x1, x2 = x[0], x[1]
    f1 = torch.log(torch.clamp(torch.abs(0.5 * (-x1 - 7) - torch.tanh(-x2)), min=LOWER)) + 6
    f2 = torch.log(torch.clamp(torch.abs(0.5 * (-x1 + 3) + torch.tanh(-x2) + 2), min=LOWER)) + 6
    g1 = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    g2 = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    c1 = torch.clamp(torch.tanh(0.5 * x2), min=0)
    c2 = torch.clamp(torch.tanh(-0.5 * x2), min=0)
    return scale * (c1 * f1 + c2 * g1), c1 * f2 + c2 * g2


def losses_and_jacobian(x: Tensor, scale: float = 0.1) -> tuple[Tensor, Tensor]:
    """The losses ``(..., 2)`` and their Jacobian ``J`` (``(..., 2, 2)``, ``J[..., i, j] = dL_i/dx_j``) at the
    points ``x`` (``(..., 2)``, float64), in closed form without autograd (:func:`_closed_form`): the gradient
    of :func:`losses` as autograd gives it, clamps included."""
    L, J = _closed_form(x.detach().to(torch.float64).cpu().numpy(), scale)
    return torch.from_numpy(L), torch.from_numpy(J)


def _closed_form(x: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`losses_and_jacobian` on NumPy arrays (``x``: ``(..., 2)``). With ``t = tanh(-x2)``, ``u1 = -x1/2 -
    7/2 - t``, ``u2 = -x1/2 + 7/2 + t``: ``df_i/du_i = sign(u_i) [|u_i| >= LOWER] / max(|u_i|, LOWER)`` (as
    ``torch.clamp(v, min=m)`` passes the gradient where ``v >= m`` and ``abs`` has gradient ``sign``, 0 at 0),
    ``du_1 = (-1/2, 1 - t^2)``, ``du_2 = (-1/2, -(1 - t^2))``, ``dg_1 = ((x1 - 7)/5, (x2 + 8)/50)``, ``dg_2 =
    ((x1 + 7)/5, (x2 + 8)/50)``, and with ``h = tanh(x2/2)``: ``dc_1/dx2 = [h >= 0] (1 - h^2)/2``, ``dc_2/dx2 =
    -[-h >= 0] (1 - h^2)/2`` (both sides pass at ``x2 = 0``, as the clamps do)."""
    x1, x2 = x[..., 0], x[..., 1]
    t = np.tanh(-x2)
    u1 = 0.5 * (-x1 - 7) - t
    u2 = 0.5 * (-x1 + 3) + t + 2
    a1, a2 = np.abs(u1), np.abs(u2)
    m1, m2 = np.maximum(a1, LOWER), np.maximum(a2, LOWER)
    f1, f2 = np.log(m1) + 6, np.log(m2) + 6
    g1 = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    g2 = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    th, tl = np.tanh(0.5 * x2), np.tanh(-0.5 * x2)
    c1, c2 = np.maximum(th, 0.0), np.maximum(tl, 0.0)
    df1 = np.where(a1 >= LOWER, np.sign(u1) / m1, 0.0)  # d f1 / d u1
    df2 = np.where(a2 >= LOWER, np.sign(u2) / m2, 0.0)
    sech = 1 - t * t  # d tanh(-x2) / d(-x2)
    dc1 = np.where(th >= 0, 0.5 * (1 - th * th), 0.0)
    dc2 = np.where(tl >= 0, -0.5 * (1 - tl * tl), 0.0)
    dg2 = (x2 + 8) / 50
    L = np.stack([scale * (c1 * f1 + c2 * g1), c1 * f2 + c2 * g2], -1)
    d11 = scale * (c1 * (-0.5 * df1) + c2 * ((x1 - 7) / 5))
    d12 = scale * (dc1 * f1 + c1 * (sech * df1) + dc2 * g1 + c2 * dg2)
    d21 = c1 * (-0.5 * df2) + c2 * ((x1 + 7) / 5)
    d22 = dc1 * f2 + c1 * (-sech * df2) + dc2 * g2 + c2 * dg2
    return L, np.stack([np.stack([d11, d12], -1), np.stack([d21, d22], -1)], -2)


def pareto_residual(x: Tensor, scale: float = 0.1) -> float:
    """``min_{a in [0, 1]} ||a grad L1 + (1 - a) grad L2||`` at ``x``: 0 at Pareto-stationary points."""
    from .solvers import min_norm_simplex

    x = x.detach().clone().to(torch.float64).requires_grad_(True)
    l1, l2 = losses(x, scale)
    (g1,) = torch.autograd.grad(l1, x, retain_graph=True)
    (g2,) = torch.autograd.grad(l2, x)
    J = torch.stack([g1, g2])
    w = min_norm_simplex(J @ J.T)
    return float((J.T @ w).norm())


@dataclass
class Trajectory:
    """Points visited (``xs``: steps+1 x 2) and the losses there (``ls``: steps+1 x 2)."""

    method: str
    start: tuple[float, float]
    xs: Tensor
    ls: Tensor

    @property
    def end(self) -> Tensor:
        return self.xs[-1]


def run(
    balancer: Balancer | str | None,
    start: Sequence[float],
    *,
    steps: int = 5000,
    lr: float = 1e-2,
    scale: float = 0.1,
    **balancer_kwargs: Any,
) -> Trajectory:
    """Optimise ``x`` from ``start`` with Adam (``lr``) on the two losses balanced by ``balancer`` (a name, an
    instance, or ``None`` for the plain sum). Gradient-level balancers get ``params=[x]``; FAMO its loss floors
    ``-21 scale`` and ``-21`` (the authors' ``l*``) and ``gamma = 0`` (their toy script: the objective does not
    change, so no regularisation of the logits) unless given. The authors use lr 1e-3 for 35,000-50,000 steps;
    the default here, lr 1e-2 for 5,000 steps, covers a similar distance (lr x steps). With larger steps the
    runs drift along the front differently once there (end points up to 1 apart in x1 for Nash-MTL), and
    methods whose steps shrink in the flat region below the x-axis (MGDA, PCGrad) need the authors' longer run to
    cross it: :func:`run_batched` runs that one fast."""
    x = torch.tensor([float(start[0]), float(start[1])], dtype=torch.float64, requires_grad=True)
    name = balancer if isinstance(balancer, str) else type(balancer).__name__ if balancer is not None else "sum"
    if isinstance(balancer, str):
        balancer = _resolve(balancer, x, scale, balancer_kwargs)
    opt = torch.optim.Adam([x], lr=lr)

    def evaluate() -> Losses:
        l1, l2 = losses(x, scale)
        return Losses(parts={"f1": l1, "f2": l2}, weights={"f1": 1.0, "f2": 1.0})

    def recompute() -> Losses:
        with torch.no_grad():
            return evaluate()

    context = _context(balancer, evaluate, opt)
    xs, ls = [x.detach().clone()], []
    for _ in range(steps):
        out = evaluate()
        ls.append(torch.stack([out.parts["f1"].detach(), out.parts["f2"].detach()]))
        if balancer is not None:
            out = balancer(out, context)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        if balancer is not None:
            balancer.step(recompute)
        xs.append(x.detach().clone())
    last = evaluate()
    ls.append(torch.stack([last.parts["f1"].detach(), last.parts["f2"].detach()]))
    return Trajectory(str(name), (float(start[0]), float(start[1])), torch.stack(xs), torch.stack(ls))


def _resolve(name: str, x: Tensor, scale: float, kwargs: dict[str, Any]) -> Balancer:
    """The registered balancer ``name`` for the toy: ``params=[x]`` for the gradient-level kinds; FAMO's floors
    ``l* = -21 scale, -21`` and its authors' toy regularisation ``gamma = 0`` unless given."""
    made = resolve(name)
    assert made is not None  # a name always gives a balancer
    cls = type(made)
    kw = dict(kwargs)
    if cls.kind in ("gramian", "surgery"):
        kw.setdefault("params", [x])
    sig = inspect.signature(cls).parameters
    if "floor" in sig:  # a loss lower bound l* (FAMO), and the authors' toy regularisation gamma = 0
        kw.setdefault("floor", {"f1": -21.0 * scale, "f2": -21.0})
        if "gamma" in sig:
            kw.setdefault("gamma", 0.0)
    out = resolve(name, **kw)
    assert out is not None
    return out


def _context(balancer: Balancer | None, evaluate: Callable[[], Losses], opt: torch.optim.Optimizer) -> Context | None:
    """The toy's :class:`~lossport.balance.Context`: its losses are deterministic functions of ``x`` (no data), so
    every extra batch and the meta batch are the same two losses; SDMGrad's and MoDo's cross matrix is then the
    Gramian, and Auto-Lambda's meta loss is the sum of the two losses."""
    if balancer is None or not balancer.needs_context:
        return None
    extra = (evaluate,) * (balancer.batches - 1)
    return Context(extra=extra, meta=evaluate, train=evaluate, optimizer=opt)


Weigh = Callable[[Tensor, "Tensor | None"], Tensor]
"""Weights ``(B, 2)`` from the Gramians ``(B, 2, 2)`` of ``B`` points and the previous step's weights there
(``None`` at the first step)."""

BATCHED = ("ew", "mgda", "pcgrad", "cagrad", "nash_mtl", "fairgrad")
"""The methods :func:`batched_weighting` gives (their balancers are functions of the Gramian and of the previous
weights only); loss-level methods with state (FAMO) run through :func:`run_loss_level`."""


def batched_weighting(method: str, **kwargs: Any) -> Weigh:
    """The weights that the registered balancer ``method`` (built with ``kwargs``: ``c`` for CAGrad, ``alpha``
    for FairGrad) applies on the toy, for many points at once: lossport's own functions of
    :mod:`lossport.balance.weighting`, times the balancer's factor (MGDA, CAGrad: ``T = 2``), warm-started as
    the balancer does (Nash-MTL, FairGrad). PCGrad: two parts have the only orders ``[[1], [0]]``."""
    from .balance import weighting as W

    if method in ("ew", "sum"):
        return lambda G, prev: torch.ones(G.shape[:-1], dtype=torch.float64)
    if method not in BATCHED:
        raise ValueError(f"toy.batched_weighting: {method!r} is not batched here; one of {BATCHED}, or use toy.run")
    b: Any = resolve(method, **kwargs)
    if method == "mgda":
        if b.normalization != "none":
            raise ValueError("toy.batched_weighting: MGDA is batched with normalization='none' only; use toy.run")
        return lambda G, prev: 2 * W.mgda(G)
    if method == "pcgrad":
        return lambda G, prev: W.pcgrad(G, [[1], [0]])
    if method == "cagrad":
        return lambda G, prev: 2 * W.cagrad(G, b.c)
    if method == "nash_mtl":
        return lambda G, prev: W.nash_mtl(G, prev)
    return lambda G, prev: W.fairgrad(G, b.alpha, prev)


@dataclass
class Batch:
    """Runs of one method from several starts: ``xs`` (``K x S x 2``: the points every ``every`` steps, the
    start first and the end last), ``warned`` the number of steps on which the weighting warned."""

    method: str
    starts: list[tuple[float, float]]
    xs: Tensor
    warned: int

    @property
    def ends(self) -> Tensor:
        return self.xs[-1]

    def trajectories(self, scale: float = 0.1) -> list[Trajectory]:
        """One :class:`Trajectory` a start (for :func:`plot`)."""
        return [
            Trajectory(self.method, s, self.xs[:, i], losses_and_jacobian(self.xs[:, i], scale)[0])
            for i, s in enumerate(self.starts)
        ]


def _same(losses: Losses) -> Losses:
    """The recompute closure of :func:`run_loss_level` (the losses after the step, computed once)."""
    return losses


class _Adam:
    """``torch.optim.Adam`` (betas 0.9, 0.999, eps 1e-8, no weight decay) on a NumPy array, with the arithmetic
    of its single-tensor CPU step (``m.lerp_(g, 0.1)``, ``v.mul_(0.999).addcmul_(g, g, value=0.001)``, ``x +=
    -lr / (1 - 0.9^k) m / (sqrt(v) / sqrt(1 - 0.999^k) + eps)``); element-wise, so one over many points is one
    per point. ``tests/test_toy.py`` checks the runs against :func:`run` with ``torch.optim.Adam``."""

    def __init__(self, x: np.ndarray, lr: float) -> None:
        self.x, self.lr, self.k = x, float(lr), 0
        self.m, self.v = np.zeros_like(x), np.zeros_like(x)

    def step(self, g: np.ndarray) -> None:
        self.k += 1
        b1, b2 = 0.9, 0.999
        self.m += (1 - b1) * (g - self.m)
        self.v *= b2
        self.v += ((1 - b2) * g) * g
        step = self.lr / (1 - b1**self.k)
        denom = np.sqrt(self.v) / (1 - b2**self.k) ** 0.5 + 1e-8
        self.x += -step * (self.m / denom)


def run_batched(
    methods: Sequence[str] | dict[str, Weigh],
    starts: Sequence[Sequence[float]] = STARTS,
    *,
    steps: int = 35_000,
    lr: float = 1e-3,
    scale: float = 0.1,
    every: int = 0,
) -> dict[str, Batch]:
    """Every method from every start as one array of points (``M x S``), the steps of :func:`run` with the
    registered balancer: closed-form gradients (:func:`_closed_form`), the Gramians ``J J^T``, the method's
    weights ``w`` (:func:`batched_weighting`: lossport's functions; or the given ones), the update ``J^T w``
    and Adam (:class:`_Adam`). Defaults: the Nash-MTL / FAMO protocol (first loss x 0.1, Adam lr 1e-3, 35,000
    steps). ``every``: keep the points every ``every`` steps (0: the start and the end only)."""
    weigh = {m: batched_weighting(m) for m in methods} if not isinstance(methods, dict) else dict(methods)
    S = len(starts)
    pts = [(float(s[0]), float(s[1])) for s in starts]
    x = np.tile(np.array(pts, dtype=np.float64), (len(weigh), 1))
    opt = _Adam(x, lr)
    prev: dict[str, Tensor | None] = dict.fromkeys(weigh)
    warned = dict.fromkeys(weigh, 0)
    path = [x.copy()]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for step in range(1, steps + 1):
            J = _closed_form(x, scale)[1]
            G = torch.from_numpy(J @ J.swapaxes(-1, -2))
            ws = []
            for m, (name, f) in enumerate(weigh.items()):
                w = f(G[m * S : (m + 1) * S], prev[name])
                if rec:  # the steps on which the weighting warned
                    warned[name] += 1
                    rec.clear()
                prev[name] = w
                ws.append(w)
            opt.step((torch.cat(ws).numpy()[:, None, :] @ J)[:, 0])
            if (every and step % every == 0) or step == steps:
                path.append(x.copy())
    xs = torch.from_numpy(np.stack(path)).reshape(len(path), len(weigh), S, 2)
    return {name: Batch(name, pts, xs[:, m], warned[name]) for m, name in enumerate(weigh)}


def run_loss_level(
    method: str,
    starts: Sequence[Sequence[float]] = STARTS,
    *,
    steps: int = 50_000,
    lr: float = 1e-3,
    scale: float = 0.1,
    every: int = 0,
    **balancer_kwargs: Any,
) -> Batch:
    """:func:`run` for a loss-level balancer (weights from the loss values, e.g. FAMO) from several starts at
    once: one registered balancer a start (its own state), called through its public API on the losses without
    a graph (``balancer(losses)`` for the weights ``b``, ``balancer.step(recompute)`` after the step), the
    update ``J^T b`` in closed form, Adam as :func:`run_batched`. Defaults: FAMO's own toy protocol (50,000
    steps, lr 1e-3; FAMO gets ``gamma = 0`` and its floors as in :func:`run`)."""
    pts = [(float(s[0]), float(s[1])) for s in starts]
    x = np.array(pts, dtype=np.float64)
    bals = [_resolve(method, torch.zeros(2, dtype=torch.float64), scale, balancer_kwargs) for _ in pts]
    if any(b.kind in ("gramian", "surgery") or b.needs_context for b in bals):
        raise ValueError(f"toy.run_loss_level: {method!r} needs gradients or a context; use toy.run_batched or run")
    opt = _Adam(x, lr)

    def parts(L: np.ndarray) -> Losses:
        return Losses(parts={"f1": torch.tensor(L[0]), "f2": torch.tensor(L[1])}, weights={"f1": 1.0, "f2": 1.0})

    path, warned = [x.copy()], 0
    for step in range(1, steps + 1):
        L, J = _closed_form(x, scale)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            outs = [b(parts(L[i])) for i, b in enumerate(bals)]
        warned += bool(rec)
        w = np.array([[float(o.weights["f1"]), float(o.weights["f2"])] for o in outs])
        opt.step((w[:, None, :] @ J)[:, 0])
        after = [parts(v) for v in _closed_form(x, scale)[0]]
        for b, a in zip(bals, after):
            b.step(functools.partial(_same, a))
        if (every and step % every == 0) or step == steps:
            path.append(x.copy())
    return Batch(method, pts, torch.from_numpy(np.stack(path)), warned)


def plot(
    trajectories: dict[str, list[Trajectory]], *, scale: float = 0.1, path: str | None = None, cols: int = 0
) -> Any:
    """One panel per method: the trajectories over the contours of ``L1 + L2``, the Pareto segment in grey;
    ``cols`` panels a row (0: all in one row). Needs matplotlib (``pip install lossport[plot]``)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover
        raise ImportError("lossport.toy.plot needs matplotlib: pip install 'lossport[plot]'") from e
    g = torch.linspace(-10, 10, 161, dtype=torch.float64)
    X1, X2 = torch.meshgrid(g, g, indexing="xy")
    l1, l2 = losses(torch.stack([X1, X2]), scale)  # element-wise over the grid
    z = l1 + l2
    n = len(trajectories)
    c = n if cols <= 0 else min(cols, n)
    r = -(-n // c)
    fig = Figure(figsize=(3.4 * c, 3.4 * r), layout="constrained")
    axes = fig.subplots(r, c, squeeze=False).flatten()
    for ax in axes[n:]:
        ax.set_axis_off()
    for ax, (method, trajs) in zip(axes, trajectories.items()):
        ax.contour(X1.numpy(), X2.numpy(), z.numpy(), levels=25, cmap="Greys", linewidths=0.5)
        ax.plot([-7, 7], [PARETO_X2, PARETO_X2], color="grey", lw=4, alpha=0.5)
        for t in trajs:
            ax.plot(t.xs[:, 0].numpy(), t.xs[:, 1].numpy(), lw=1.2)
            ax.scatter([t.start[0]], [t.start[1]], s=12, color="k", zorder=3)
            ax.scatter([float(t.end[0])], [float(t.end[1])], s=20, marker="*", zorder=3)
        ax.set_title(method)
        ax.set_xlim(-10, 10)
        ax.set_ylim(-10, 10)
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def run_all(methods: Sequence[str | None], **kwargs: Any) -> dict[str, list[Trajectory]]:
    """:func:`run` from each of the five :data:`STARTS` for each method."""
    return {str(m or "sum"): [run(m, s, **kwargs) for s in STARTS] for m in methods}


__all__ = [
    "BATCHED",
    "LOWER",
    "PAPER_METHODS",
    "PARETO_X2",
    "STARTS",
    "Batch",
    "Trajectory",
    "Weigh",
    "batched_weighting",
    "losses",
    "losses_and_jacobian",
    "pareto_residual",
    "plot",
    "run",
    "run_all",
    "run_batched",
    "run_loss_level",
]
