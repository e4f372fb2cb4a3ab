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
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .balance import Balancer, Context, resolve
from .result_types import Losses

LOWER = 5e-6
STARTS: tuple[tuple[float, float], ...] = ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))
"""The five starting points of the Nash-MTL and FAMO code."""
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
    cross it: ``tests/test_toy.py`` compares the protocols from the five starts."""
    x = torch.tensor([float(start[0]), float(start[1])], dtype=torch.float64, requires_grad=True)
    name = balancer if isinstance(balancer, str) else type(balancer).__name__ if balancer is not None else "sum"
    if isinstance(balancer, str):
        made = resolve(balancer)
        assert made is not None  # a name always gives a balancer
        cls = type(made)
        kw = dict(balancer_kwargs)
        if cls.kind in ("gramian", "surgery"):
            kw.setdefault("params", [x])
        sig = inspect.signature(cls).parameters
        if "floor" in sig:  # a loss lower bound l* (FAMO), and the authors' toy regularisation gamma = 0
            kw.setdefault("floor", {"f1": -21.0 * scale, "f2": -21.0})
            if "gamma" in sig:
                kw.setdefault("gamma", 0.0)
        balancer = resolve(balancer, **kw)
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


def _context(balancer: Balancer | None, evaluate: Callable[[], Losses], opt: torch.optim.Optimizer) -> Context | None:
    """The toy's :class:`~lossport.balance.Context`: its losses are deterministic functions of ``x`` (no data), so
    every extra batch and the meta batch are the same two losses; SDMGrad's and MoDo's cross matrix is then the
    Gramian, and Auto-Lambda's meta loss is the sum of the two losses."""
    if balancer is None or not balancer.needs_context:
        return None
    extra = (evaluate,) * (balancer.batches - 1)
    return Context(extra=extra, meta=evaluate, train=evaluate, optimizer=opt)


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


__all__ = ["LOWER", "PARETO_X2", "STARTS", "Trajectory", "losses", "pareto_residual", "plot", "run", "run_all"]
