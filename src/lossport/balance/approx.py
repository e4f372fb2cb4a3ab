"""Opt-in approximations of the Gramian balancers for many parts (``subset=k``, ``sketch=d``).

Both are **approximations**: the weights they give are not those of the exact method. Their randomness comes
from a host generator seeded by ``approx_seed`` and kept in the balancer's state, so a resumed run draws the
same subsets and sketches as an uninterrupted one.

**Random subset of parts** (``subset=k``): each time the weights are computed, ``k`` of the ``T`` parts present
are drawn uniformly without replacement; the method runs on those ``k`` parts only (their ``k x k`` Gramian,
their weighting), each drawn part's weight is multiplied by ``T / k`` and the other parts get weight ``0`` for
that step. This is the stochastic sub-Jacobian descent of Quinton & Rey (2024, "Jacobian Descent for
Multi-Objective Optimization", section 6: aggregate a random subset of the Jacobian's rows). Every part is drawn
with probability ``k / T``, so its expected weight is the method's weight on the drawn sets (``E[w_i] = 1``
for a method that gives ``1`` to every part, e.g. UPGrad without conflicts: the update is then an unbiased
estimate of the full one). Cost: the Gramian of ``k`` parts (``k`` vector-Jacobian products in ``params``
mode, ``k`` heads in ``features`` mode) and a weighting of size ``k`` (UPGrad: ``k`` problems of ``k``
variables instead of ``T`` of ``T``). A part that is not drawn trains neither its head nor the trunk that
step.

**Sketched Gramian** (``sketch=d``, ``gramian="params"``): ``G ~ (J S)(J S)^T`` with ``S`` a ``P x d`` matrix
of independent ``N(0, 1/d)`` entries drawn afresh at each computation (Johnson & Lindenstrauss 1984; as a
matrix sketch: Woodruff 2014, "Sketching as a Tool for Numerical Linear Algebra", section 2). Unbiased entry
by entry, ``E[G~] = G``, with variance ``Var[G~_ts] = (G_tt G_ss + G_ts^2) / d``: the relative error of an
entry falls as ``1 / sqrt(d)``, whatever ``T`` and ``P``. ``J S`` (``T x d``) is obtained without the ``T``
backward passes of the exact Gramian: ``v(u) = J^T u`` is one backward of ``sum_t u_t L_t`` that keeps its
graph, and ``J s_j`` is the gradient of ``<v(u), s_j>`` with respect to ``u``, ``d`` double-backward passes
(batched into one where ``vmap`` can run them). Cost: about ``d`` backward passes of the trunk's backward
(instead of ``T``) and ``d P`` random numbers per computation; memory ``d x P`` floats for ``S``. Worth it
when ``T`` is several times ``d``; it needs every op of the trunk to be twice differentiable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from ..gramian import _vjps
from ..graph import retained_grad
from ..result_types import Losses

__all__ = ["check_options", "restrict", "sketched_gramian", "subset_indices"]


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
    ``d`` Gaussian directions (see the module docstring). The graph is retained."""
    JS = sketch_jacobian(parts, params, d, generator).to(torch.float64)
    return JS @ JS.T


def sketch_jacobian(parts: Sequence[Tensor], params: Sequence[Tensor], d: int, generator: torch.Generator) -> Tensor:
    """``J S`` (``T x d``, the parts' dtype) with ``S`` of ``N(0, 1/d)`` entries drawn from the host
    ``generator`` (one ``d x numel`` block per parameter, in ``params`` order)."""
    T = len(parts)
    first = parts[0]
    live = [t for t, p in enumerate(parts) if p.requires_grad]
    out = torch.zeros(T, d, dtype=first.dtype, device=first.device)
    S = [torch.randn((d, *p.shape), generator=generator).to(p.device, p.dtype) / math.sqrt(d) for p in params]
    if not live:
        return out
    u = torch.zeros(len(live), dtype=first.dtype, device=first.device, requires_grad=True)
    total = (torch.stack([parts[t].reshape(()) for t in live]) * u).sum()
    v = retained_grad(total, list(params), create_graph=True, retain_graph=True, allow_unused=True)
    used = [(g, s) for g, s in zip(v, S) if g is not None and g.requires_grad]
    if not used:
        return out
    (JS,) = _vjps([g for g, _ in used], [s for _, s in used], [u], batched=True)
    if JS is not None:
        out[live] = JS.T.detach()
    return out
