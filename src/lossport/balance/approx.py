"""Opt-in approximations of the Gramian balancers for many parts (``subset=k``, ``sketch=d``).

Both are **approximations**: the weights they give are not those of the exact method. Their randomness comes
from a host generator seeded by ``approx_seed`` and kept in the balancer's state, so a resumed run draws the
same subsets and sketches as an uninterrupted one.

**Random subset of parts** (``subset=k``): each time the weights are computed, ``k`` of the ``T`` parts present
are drawn uniformly without replacement; the method runs on those ``k`` parts only (their ``k x k`` Gramian,
their weighting) and gives them its weights, and every part not drawn gets the mean of the drawn parts' weights
(it is treated as a typical part: its head and its share of the trunk still train at every step). Exact when
``k >= T``, and whenever the method gives the same weight to every part of every subset (UPGrad without
conflicts: all ``1``); otherwise an approximation whose error the benchmark measures (docs/scaling.md: UPGrad's
update at ``T = 128``, ``k = 32``: 0.41 relative error against the exact update, no part conflicting with it;
the plain sum's update is 0.55 off). The alternative that keeps only the drawn parts, scaled by ``T / k``
(stochastic sub-Jacobian descent, Quinton & Rey 2024, "Jacobian Descent for Multi-Objective Optimization"),
measured 1.1 off with 39% of the parts conflicting with each update, and trains each head at one step in
``T / k``. Every part is drawn with probability ``k / T`` per computation. Cost: the Gramian of ``k`` parts
(``k`` vector-Jacobian products in ``params`` mode, ``k`` heads in ``features`` mode) and a weighting of size
``k`` (UPGrad: ``k`` problems of ``k`` variables instead of ``T`` of ``T``).

**Sketched Gramian** (``sketch=d``, ``gramian="params"``): ``G ~ (J S)(J S)^T`` with ``S`` a ``P x d`` matrix
of independent random signs ``+-1 / sqrt(d)`` drawn afresh at each computation (a Johnson-Lindenstrauss
projection, Achlioptas 2003; as a matrix sketch: Woodruff 2014, "Sketching as a Tool for Numerical Linear
Algebra", section 2). Unbiased entry by entry, ``E[G~] = G``, with variance ``Var[G~_ts] = (G_tt G_ss + G_ts^2
- 2 sum_p J_tp^2 J_sp^2) / d <= (G_tt G_ss + G_ts^2) / d``: a cosine's error is about ``sqrt((1 + cos^2) /
d)`` whatever ``T`` and ``P`` (0.13-0.18 at ``d = 64``), and the relative Frobenius error ``sqrt((tr(G)^2 +
||G||_F^2) / d) / ||G||_F`` grows with the number of independent gradient directions. ``J S`` (``T x d``) is
obtained without the ``T`` per-part backward passes of the exact Gramian: one backward of ``sum_t L_t`` gives
each part's gradient where the heads meet the trunk (:func:`lossport.gramian._split`), and the ``d``
directional derivatives of those frontier tensors along ``S`` are double-backward passes through the trunk
(``(dz/dtheta) s = d/dU <(dz/dtheta)^T U, s>``), batched into one where ``vmap`` can run them. Cost: about
``d`` double-backward passes of the trunk (instead of ``T`` backward passes), ``d P`` random signs per
computation and ``T d`` products per frontier entry; memory ``d x P`` for ``S``; every op of the trunk must be
twice differentiable. **Measured (docs/scaling.md): not worth it for the min-norm weightings.** ``G~`` has rank
at most ``d``: with ``d < T`` UPGrad and MGDA find combinations of the parts of (nearly) zero sketched norm and
their weights blow up (UPGrad at ``T = 128``, ``d = 64``: weights up to 86, the update 6.5x off), so the
balancers refuse ``sketch < T``; with ``d >= T`` the ``d`` double-backward passes cost more than the exact
Gramian's ``T`` batched backward passes, and the error stays larger than that of the plain sum's update until
``d ~ 8 T``. :func:`sketched_gramian` itself takes any ``d``, for reading a Gramian's entries (norms, cosines)
with the error above.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from ..gramian import _split, _var, _vjps
from ..graph import retained_grad
from ..result_types import Losses

__all__ = ["check_options", "random_signs", "restrict", "sketch_jacobian", "sketched_gramian", "subset_indices"]


def check_options(subset: int | None, sketch: int | None, mode: str, approx_seed: int) -> None:
    """Raise ``ValueError`` for a bad ``subset=``, ``sketch=`` or ``approx_seed=``, naming the option."""
    for name, v in (("subset", subset), ("sketch", sketch)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (2 if name == "subset" else 1)):
            least = "2 (the method needs two parts to balance)" if name == "subset" else "1"
            raise ValueError(f"{name}= must be an integer of at least {least} or None (exact), not {v!r}")
    if sketch is not None and mode != "params":
        raise ValueError(
            "sketch= sketches the parameter gradients and needs gramian='params'; in gramian='features' mode the "
            "Gramian is already computed without the trunk (use subset= to bound the cost of many parts)"
        )
    if isinstance(approx_seed, bool) or not isinstance(approx_seed, int):
        raise ValueError(f"approx_seed= must be an integer, not {approx_seed!r}")


def subset_indices(T: int, k: int, generator: torch.Generator) -> list[int]:
    """``k`` distinct indices out of ``range(T)``, uniformly at random from the host ``generator``, sorted
    (all of them when ``k >= T``)."""
    if k >= T:
        return list(range(T))
    return sorted(torch.randperm(T, generator=generator)[:k].tolist())


def restrict(losses: Losses, names: Sequence[str]) -> Losses:
    """``losses`` with only the parts ``names`` (their weights, counts and per-example values); the outputs,
    extra terms and missing parts are kept."""
    keep = list(names)
    return replace(
        losses,
        parts={k: losses.parts[k] for k in keep},
        weights={k: losses.weights[k] for k in keep},
        counts={k: v for k, v in losses.counts.items() if k in keep},
        per_example={k: v for k, v in losses.per_example.items() if k in keep},
        _total=None,
    )


def sketched_gramian(parts: Sequence[Tensor], params: Sequence[Tensor], d: int, generator: torch.Generator) -> Tensor:
    """``(J S)(J S)^T`` (float64, ``T x T``): the Gramian of the parts' gradients on ``params`` sketched to
    ``d`` random directions (see the module docstring). The graph is retained."""
    JS = sketch_jacobian(parts, params, d, generator).to(torch.float64)
    return JS @ JS.T


def random_signs(params: Sequence[Tensor], d: int, generator: torch.Generator) -> list[Tensor]:
    """``S``: per parameter a ``d x shape`` block of independent ``+-1 / sqrt(d)`` entries (Rademacher),
    drawn on the host from ``generator`` and moved to the parameter's device and dtype."""
    out = []
    for p in params:
        r = torch.randint(0, 2, (d, *p.shape), generator=generator, dtype=p.dtype)  # 0 / 1, in place from here
        out.append(r.mul_(2 / math.sqrt(d)).sub_(1 / math.sqrt(d)).to(p.device))
    return out


def sketch_jacobian(parts: Sequence[Tensor], params: Sequence[Tensor], d: int, generator: torch.Generator) -> Tensor:
    """``J S`` (``T x d``, the parts' dtype): the parts' directional derivatives along the ``d`` columns of
    ``S`` (:func:`random_signs`). When the parts' own graphs (heads) meet the shared trunk at a frontier
    (:func:`lossport.gramian._split`: one backward of ``sum_t L_t`` gives each part's gradient ``a_{t,k}`` at
    each frontier tensor ``z_k``), ``J_t s = sum_k <a_{t,k}, (dz_k/dtheta) s>`` and the ``d`` directional
    derivatives of the ``z_k`` are double-backward passes through the trunk only; otherwise through the
    heads as well (``J s = d/du <J^T u, s>``)."""
    T = len(parts)
    first = parts[0]
    out = torch.zeros(T, d, dtype=first.dtype, device=first.device)
    S = random_signs(params, d, generator)
    live = [t for t, p in enumerate(parts) if p.requires_grad]
    if not live:
        return out
    sp = _split(parts) if len(live) > 1 else None
    if sp is None:
        u = torch.zeros(len(live), dtype=first.dtype, device=first.device, requires_grad=True)
        JS = _directional([torch.stack([parts[t].reshape(()) for t in live])], [u], params, S)[0]
        if JS is not None:
            out[live] = JS.T.detach()
        return out
    where = {id(p): i for i, p in enumerate(params)}
    edges, seeds, rows = [], [], []
    for (node, nr), g in zip(sp.targets, sp.grads):
        var = _var(node)
        if var is None:
            edges.append(GradientEdge(node, nr))  # type: ignore[arg-type]
            seeds.append(torch.zeros_like(g[0], requires_grad=True))
            rows.append(g)
        elif id(var) in where:  # a shared parameter the heads use directly: its sketch block itself
            out += g.reshape(T, -1) @ S[where[id(var)]].reshape(d, -1).T
    if edges:
        for g, jv in zip(rows, _directional(edges, seeds, params, S)):
            if jv is not None:
                out += g.reshape(T, -1) @ jv.reshape(d, -1).T
    return out.detach()


def _directional(
    outputs: Sequence[Tensor | GradientEdge], seeds: Sequence[Tensor], params: Sequence[Tensor], S: Sequence[Tensor]
) -> list[Tensor | None]:
    """Per seed ``U_k`` (``d x U_k.shape``): the derivatives of ``outputs[k]`` along the ``d`` directions ``S``,
    as ``d/dU_k <v(U), s_j>`` with ``v(U) = sum_k (d outputs[k] / d params)^T U_k`` (one backward that keeps
    its graph, then ``d`` double-backward passes, batched where ``vmap`` can run them)."""
    v = retained_grad(
        list(outputs),
        list(params),
        grad_outputs=list(seeds),
        create_graph=True,
        retain_graph=True,
        allow_unused=True,
    )
    used = [(g, s) for g, s in zip(v, S) if g is not None and g.requires_grad]
    if not used:
        return [None] * len(seeds)
    return _vjps([g for g, _ in used], [s for _, s in used], list(seeds), batched=True)
