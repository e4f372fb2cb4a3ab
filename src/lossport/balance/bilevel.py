"""Bilevel balancers: LDC-MTL (a penalised single-level form) and Auto-Lambda (a look-ahead on a meta batch).

**Auto-Lambda** (:class:`AutoLambda`; Liu, Johns, Davison, "Auto-Lambda: Disentangling Dynamic Task Relationships",
TMLR 2022; code github.com/lorenmt/auto-lambda): the weights ``lambda`` minimise the meta loss after one
look-ahead step of the net, ``min_lambda L_meta(theta - alpha grad_theta sum_i lambda_i L_i(theta))``, by one Adam
step per training step on the finite-difference approximation of its gradient (see the class).

**LDC-MTL**: loss discrepancy control by a learned router, from a penalised bilevel problem.

Xiao, Dong, Zou, Ji, "LDC-MTL: Balancing Multi-Task Learning through Scalable Loss Discrepancy Control" (arXiv
2502.08585, 2025). The rule below is that of the authors' code (github.com/OptMN-Lab/LDC-MTL,
``experiments/*/trainer.py``), read for this module: the router weights ``sigma`` and the net minimise together
(one backward, one step each) the penalised single-level objective::

    F = sum_i sigma_i Lt_i / sg(sum_i sigma_i)  +  lambda * sum_{i=1}^{T-1} |sigma_i Lt_i - sigma_{i+1} Lt_{i+1}|

where ``Lt_i`` are the pre-normalised losses: the upper level (the router) reduces the discrepancies between
consecutive weighted losses, the lower level (the net) the weighted sum. Each step costs one backward, like the
plain sum (``O(1)`` in the number of parts).
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import distributed
from ..result_types import Losses
from ..solvers import interior_qp, min_norm_simplex
from .base import Context, register
from .learned import LearnedBalancer
from .loss_level import _training, _values
from .stochastic import cross, jacobian_rows
from .surgery import _zero_valued

_NORMALIZATIONS = ("initial", "log", "none")


def discrepancy_objective(sigma: Tensor, lt: Tensor, lam: float) -> Tensor:
    """``F = sum_i sigma_i Lt_i / sg(sum sigma) + lam sum_i |sigma_i Lt_i - sigma_{i+1} Lt_{i+1}|`` (the chain over
    consecutive parts, in the given order)."""
    wl = sigma * lt
    return wl.sum() / sigma.sum().detach() + lam * (wl[:-1] - wl[1:]).abs().sum()


@register("ldc_mtl", "ldcmtl")
class LDCMTL(LearnedBalancer):
    """LDC-MTL (Xiao et al. 2025; module docstring): a router with one logit ``r_i`` per part gives ``sigma =
    softmax(r)`` over the parts present (the authors' NYUv2 router ends in a softmax; its input, the batch's
    pooled features, has no counterpart outside the net, so lossport's router is input-free, as the authors'
    QM9 and CelebA routers, which are plain parameter vectors).

    With ``s_j = sign(sigma_j Lt_j - sigma_{j+1} Lt_{j+1})`` (``s_0 = s_T = 0``), the net's gradient of ``F`` is
    ``sum_i c_i dLt_i/dL_i grad L_i`` with ``c_i = sigma_i (1 + lambda (s_i - s_{i-1}))``; lossport returns
    ``b_i = T c_i dLt_i/dL_i`` (detached; factor ``T``: ``sigma`` sums to 1) and the extra term ``ldc_mtl/router``
    (value 0, gradient ``dF/dr``), so ``losses.total.backward()`` gives the router the authors' gradient and
    :meth:`step` takes one Adam step on it. The net descends the penalty too (the authors' single-level form): a
    part whose weighted loss lies below both neighbours gets ``c_i = sigma_i (1 - 2 lambda)``, negative for
    ``lambda > 1/2`` (the authors use at most 0.1): the net is then pushed to raise that loss.

    :param lamb: the penalty ``lambda`` (the authors' ``--lamb``: 0.05 on NYUv2 and QM9, 0.1 Cityscapes, 0.01
        CelebA).
    :param normalization: the pre-normalisation ``Lt``: ``"initial"`` (NYUv2: ``Lt_i = L_i / (L_i(0) / min_j
        L_j(0))``, ``L(0)`` the values at the first training call), ``"log"`` (QM9: ``Lt_i = log(L_i / L_i(0))``)
        or ``"none"`` (CelebA: ``Lt_i = L_i``).
    :param lr: the router's Adam learning rate (the authors train it with the net's optimizer: 1e-3 on QM9).
    :param init: the initial logits (0: uniform ``sigma``).

    The chain runs over the parts present in the spec's order (the authors' task order). A part's ``L(0)`` is its
    value in the first training batch where it is present (``min_j L_j(0)`` is taken over that first batch's
    parts). Losses must be ``> 0`` for ``"initial"`` and ``"log"``. The NYUv2 router also clamps ``sigma`` to
    ``[0.2, 0.8]`` (a 3-task setting); lossport does not clamp.
    """

    name = "ldc_mtl"
    kind: ClassVar[str] = "loss"

    def __init__(self, lamb: float = 0.05, normalization: str = "initial", lr: float = 1e-3, init: float = 0.0) -> None:
        super().__init__(lr=lr, init=init)
        if not lamb >= 0:
            raise ValueError(f"LDCMTL: lamb must be >= 0, not {lamb!r}")
        if normalization not in _NORMALIZATIONS:
            raise ValueError(f"LDCMTL: normalization must be one of {_NORMALIZATIONS}, not {normalization!r}")
        self.lamb = float(lamb)
        self.normalization = normalization
        self._initial: dict[str, float]
        self._min0: float | None
        self.add_state("_initial", {})  # L_i(0) per part name
        self.add_state("_min0", None)  # min_j L_j(0) over the first training batch

    def _normalized(self, vals: dict[str, float], names: list[str]) -> tuple[list[float], list[float]]:
        """``Lt_i`` and ``dLt_i/dL_i`` of the parts present."""
        if self.normalization == "none":
            return [vals[k] for k in names], [1.0] * len(names)
        for k in names:
            if not vals[k] > 0 or math.isinf(vals[k]):
                raise ValueError(
                    f"LDCMTL(normalization={self.normalization!r}) needs finite losses > 0 (it divides by them), but "
                    f"part {k!r} is {vals[k]}; shift the loss so that it is > 0 or use normalization='none'"
                )
        if _training():
            if self._min0 is None:
                self._min0 = min(vals[k] for k in names)
            for k in names:
                self._initial.setdefault(k, vals[k])
        init = {k: self._initial.get(k, vals[k]) for k in names}
        if self.normalization == "log":
            return [math.log(vals[k] / init[k]) for k in names], [1 / vals[k] for k in names]
        m0 = self._min0 if self._min0 is not None else min(vals.values())
        factors = [m0 / init[k] for k in names]
        return [vals[k] * f for k, f in zip(names, factors)], factors

    def balance(self, losses: Losses) -> tuple[dict[str, float], dict[str, Tensor]]:
        self._ensure(losses)
        names = losses.names
        if not names:
            return {}, {}
        vals = _values(losses)
        lt, dlt = self._normalized(vals, names)
        logits = self._vector(names)
        sigma = torch.softmax(logits, dim=0)
        lt_t = torch.tensor(lt, dtype=sigma.dtype, device=sigma.device)
        F = discrepancy_objective(sigma, lt_t, self.lamb)
        sg = sigma.detach().tolist()
        wl = [s * v for s, v in zip(sg, lt)]
        signs = [0.0] + [float((a > b) - (a < b)) for a, b in itertools.pairwise(wl)] + [0.0]
        T = len(names)
        total_sigma = sum(sg)
        b = {
            k: T * (sg[i] / total_sigma + self.lamb * sg[i] * (signs[i + 1] - signs[i])) * dlt[i]
            for i, k in enumerate(names)
        }
        self.info["ldc_mtl/discrepancy"] = sum(abs(x - y) for x, y in itertools.pairwise(wl))
        for k, s in zip(names, sg):
            self.info[f"ldc_mtl/sigma/{k}"] = s
        return b, {"ldc_mtl/router": F - F.detach()}

    def __repr__(self) -> str:
        return f"LDCMTL(lamb={self.lamb}, normalization={self.normalization!r}, lr={self.lr})"


@register("auto_lambda", "autol")
class AutoLambda(LearnedBalancer):
    """Auto-Lambda (Liu, Johns, Davison, TMLR 2022), by the authors' code (``auto_lambda.py``,
    ``trainer_dense.py``). At each step, before the net's update, with ``L_i`` the parts of the main batch,
    ``s_i`` their static weights and ``alpha`` the net's learning rate:

    1. look ahead: ``theta' = theta - alpha (grad_theta sum_i s_i lambda_i L_i + m + wd theta)`` (``m`` the SGD
       momentum buffer times the momentum, ``wd`` the weight decay of the net's optimizer, as the authors' code);
    2. ``d = grad_theta' L_meta(theta')``, ``L_meta = sum_{i in primary} s_i L_i^meta`` on the meta batch;
    3. finite differences (``eps = 0.01 / ||alpha d||``):
       ``dL_meta/dlambda_i ~ -s_i (L_i(theta + eps alpha d) - L_i(theta - eps alpha d)) / (2 eps)``
       on the main batch (the second-order term of the look-ahead; the first-order term is zero: ``lambda``
       enters ``L_meta`` only through ``theta'``);
    4. one Adam step (``lr``) on ``lambda``; the net then steps on ``sum_i s_i lambda_i L_i``.

    :param init: the initial weights (the authors' ``--autol_init`` 0.1).
    :param lr: the weights' Adam learning rate (the authors' ``--autol_lr``: 1e-4 on NYUv2 and Cityscapes,
        3e-5 on CIFAR-100).
    :param primary: the parts of the meta loss (``None``: every part, the multi-task setting; a subset gives the
        authors' auxiliary-learning setting).
    :param eps: the finite difference's step ``0.01`` (times ``1 / ||alpha d||``).

    Factor 1: the applied weight is ``s_i lambda_i``, the authors' ``lambda_i`` (unconstrained, as theirs). The
    meta batch: by default :func:`lossport.train` draws it from another shuffle of the training data, as the
    authors' code does ("a copy of train_loader with different data order"); ``train(meta_data=...)`` gives a
    held-out set instead. Per parameter group, ``alpha`` is that group's learning rate (the authors' one group:
    the same). Differences from the authors' code, each exact to rounding: the look-ahead gradient reuses the main
    batch's forward (theirs runs it again, so dropout masks differ), the parameters get their own tensors back
    after the finite differences (theirs adds and subtracts ``eps d``), and the buffers (BatchNorm statistics) are
    restored after the meta forward (theirs runs it on a copy of the net; lossport restores them when the balancer
    is attached to the net, i.e. used through an :class:`~lossport.Objective` or :func:`lossport.train`). Cost per
    step: the main forward and backward, one backward through the look-ahead gradient, a forward and backward of the
    meta batch, two forwards without gradient; memory: two copies of the parameters. The context (:class:`Context`)
    must hold ``meta``, ``train`` and ``optimizer``: :func:`lossport.train` provides them; under torchrun the
    gradients are averaged over the ranks (the parts are the global batch's).
    """

    name = "auto_lambda"
    kind: ClassVar[str] = "learned"
    meta = True

    def __init__(
        self, init: float = 0.1, lr: float = 1e-4, primary: list[str] | None = None, eps: float = 0.01
    ) -> None:
        super().__init__(lr=lr, init=init)
        if not eps > 0:
            raise ValueError(f"AutoLambda: eps must be > 0, not {eps!r}")
        if primary is not None and (isinstance(primary, str) or not list(primary)):
            raise ValueError(f"AutoLambda: primary must be a non-empty list of part names or None, not {primary!r}")
        self.primary = None if primary is None else list(primary)
        self.eps = float(eps)
        self._net: Any = None  # a weak reference to the net (its buffers are restored after the meta forward)

    def attach(self, net: nn.Module) -> None:
        self._net = weakref.ref(net)

    def step(self, recompute: Callable[[], Losses] | None = None) -> None:
        """Nothing: the weights' Adam step is taken in the call, before the net's update (the authors' order)."""

    def balance(self, losses: Losses) -> dict[str, Tensor]:
        self._ensure(losses)
        names = losses.names
        if self.primary is not None:
            unknown = [k for k in self.primary if k not in self._names]
            if unknown:
                raise ValueError(f"AutoLambda: primary parts {unknown} are not parts of the objective {self._names}")
        ctx = self.context
        assert ctx is not None and ctx.optimizer is not None  # checked by __call__
        if torch.is_grad_enabled() and names:
            hyper = self.hypergradient(losses, ctx)
            if all(map(math.isfinite, hyper.values())):
                self._update(list(hyper), list(hyper.values()))
                self.info.pop("auto_lambda/skipped_nonfinite", None)
            else:
                self.info["auto_lambda/skipped_nonfinite"] = 1.0
        for k, v in self.values.items():
            self.info[f"auto_lambda/lambda/{k}"] = v
        return dict(zip(names, self._current(names).unbind(0), strict=True)) if names else {}

    def hypergradient(self, losses: Losses, ctx: Context) -> dict[str, float]:
        """``dL_meta(theta')/dlambda_i`` of the parts present, by the class docstring's steps 1-3."""
        assert ctx.optimizer is not None and ctx.meta is not None and ctx.train is not None
        groups = [(g, [p for p in g["params"] if p.requires_grad]) for g in ctx.optimizer.param_groups]
        params = [p for _, ps in groups for p in ps]
        lam = dict(zip(losses.names, self._current(losses.names).tolist(), strict=True))
        inner = torch.stack([_static(losses, k) * lam[k] * losses.parts[k] for k in losses.names]).sum()
        for term in losses.extra.values():
            inner = inner + term
        grads = _mean_over_ranks(torch.autograd.grad(inner, params, retain_graph=True, allow_unused=True), params)
        saved = [p.data for p in params]  # the parameters' own tensors, put back as they are (no arithmetic)
        ahead = _regroup(groups, grads, ctx.optimizer)
        buffers = self._buffers()
        try:
            _assign(params, ahead)
            meta = ctx.meta()
            primary = [k for k in meta.parts if self.primary is None or k in self.primary]
            if not primary:
                raise ValueError(
                    f"AutoLambda: the meta batch has no labelled example of the primary parts "
                    f"{self.primary or self._names}; the meta loss is empty"
                )
            lmeta = torch.stack([_static(meta, k) * meta.parts[k] for k in primary]).sum()
            d = _mean_over_ranks(torch.autograd.grad(lmeta, params, allow_unused=True), params)
        finally:
            _assign(params, saved)
            self._restore(buffers)
        v = [g_lr * x for g_lr, x in zip(_lrs(groups), d)]
        norm = math.sqrt(sum(float((x.to(torch.float64) ** 2).sum()) for x in v))
        self.info["auto_lambda/meta_loss"] = float(lmeta.detach())
        if not norm > 0:
            return dict.fromkeys(losses.names, 0.0)
        eps = self.eps / norm
        values = []
        try:
            for sign in (1.0, -1.0):
                _assign(params, [t + sign * eps * x for t, x in zip(saved, v)])
                with torch.no_grad():
                    out = ctx.train()
                values.append({k: float(out.parts[k]) for k in out.parts})
        finally:
            _assign(params, saved)
        plus, minus = values
        return {
            k: -_static(losses, k) * (plus[k] - minus[k]) / (2 * eps) if k in plus and k in minus else 0.0
            for k in losses.names
        }

    def _buffers(self) -> list[tuple[Tensor, Tensor]]:
        net = self._net() if self._net is not None else None
        return [] if net is None else [(b, b.detach().clone()) for b in net.buffers()]

    @staticmethod
    def _restore(buffers: list[tuple[Tensor, Tensor]]) -> None:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)

    def __repr__(self) -> str:
        return f"AutoLambda(init={self.init}, lr={self.lr}, primary={self.primary})"


@register("moml")
class MOML(LearnedBalancer):
    """MOML (Ye, Lin, Zhang, Kwok, "Multi-Objective Meta Learning", NeurIPS 2021; AIJ 2024), in the one-inner-step
    form of LibMTL's bilevel trainer (``bacth_forward_MOML``). The weights are ``p = softmax(alpha)``; each task's
    meta loss is an upper-level objective, and their hypergradients are combined by MGDA. At each step, before the
    net's update, with ``L_i`` the parts of an *inner* batch (an extra independent training batch) and ``M_i``
    those of the meta batch:

    1. ``g_f = [s_i grad_theta L_i]`` (``T x P``, every parameter of the net's optimizer);
    2. look ahead one plain SGD step: ``theta' = theta - inner_lr p^T g_f``;
    3. ``g_F = [s_i grad_theta' M_i]`` at ``theta'``; the hypergradient of task ``i`` is row ``i`` of
       ``H = -inner_lr g_F g_f^T (diag(p) - p p^T)`` (the last factor: the softmax's Jacobian);
    4. rows normalised to unit length (``normalization="l2"``, LibMTL's), ``c`` = their min-norm convex combination
       (MGDA, Sener & Koltun 2018, solved exactly), one Adam step (``lr``) on ``alpha`` along ``c^T H``;
    5. the net steps on the main batch with ``b = T softmax(alpha)``.

    :param inner_lr: the look-ahead's step size (LibMTL's ``--inner_lr`` 0.1); not the net's learning rate.
    :param lr: the weights' Adam learning rate (LibMTL's ``--outer_lr`` 1e-3).
    :param normalization: ``"l2"`` (LibMTL) or ``"none"`` for the hypergradients before MGDA.

    Factor ``T``: LibMTL's weights ``softmax(alpha)`` sum to 1. The logits start equal (LibMTL: ``1/T`` each, the
    same softmax). Per step: three forwards with gradients (main, inner, meta) and ``2 T`` backward passes for the
    two explicit Jacobians (memory ``2 T P``, ``P`` the net's parameter count: every parameter, as LibMTL). A part
    missing from the inner or meta batch has a zero row there. The inner and meta batches come from other
    shuffles of the training data under :func:`lossport.train` (LibMTL draws both from one loader of half the batch
    size; ``meta_data=`` gives the meta batches another source); under torchrun the Jacobians are the global
    batches' (averaged over the ranks). LibMTL's Frank-Wolfe solver stops at a change below ``1e-5``; lossport's
    min-norm point is exact, so the two differ by that tolerance.
    """

    name = "moml"
    kind: ClassVar[str] = "learned"
    batches = 2
    meta = True

    def __init__(self, inner_lr: float = 0.1, lr: float = 1e-3, normalization: str = "l2") -> None:
        super().__init__(lr=lr, init=0.0)
        if not inner_lr > 0:
            raise ValueError(f"MOML: inner_lr must be > 0, not {inner_lr!r}")
        if normalization not in ("l2", "none"):
            raise ValueError(f"MOML: normalization must be 'l2' or 'none', not {normalization!r}")
        self.inner_lr = float(inner_lr)
        self.normalization = normalization

    def step(self, recompute: Callable[[], Losses] | None = None) -> None:
        """Nothing: the weights' Adam step is taken in the call, before the net's update (LibMTL's order)."""

    def balance(self, losses: Losses) -> dict[str, Tensor]:
        self._ensure(losses)
        names = losses.names
        if torch.is_grad_enabled() and len(names) > 1:
            grad = self.hypergradient(losses)
            if bool(torch.isfinite(grad).all()):
                self._update(names, grad)
        soft = torch.softmax(self._current(names), 0)
        for k, v in zip(names, soft.tolist()):
            self.info[f"moml/weight/{k}"] = v
        return {k: len(names) * soft[i] for i, k in enumerate(names)}

    def hypergradient(self, losses: Losses) -> Tensor:
        """``c^T H`` of the class docstring (steps 1-4), float64, for the parts present in ``losses``."""
        ctx = self.context
        assert ctx is not None and ctx.optimizer is not None and ctx.meta is not None
        names = losses.names
        params = [p for g in ctx.optimizer.param_groups for p in g["params"] if p.requires_grad]
        logits = self._current(names).to(torch.float64)
        p = torch.softmax(logits, 0)
        g_f = jacobian_rows(ctx.extra[0](), names, params, scale=losses)
        step = (p.to(g_f.device, g_f.dtype) @ g_f).to(torch.float64)
        flat = torch.cat([x.detach().reshape(-1) for x in params]).to(torch.float64)
        ahead = _unflatten(flat - self.inner_lr * step, params)
        saved = [x.data for x in params]
        try:
            _assign(params, ahead)
            g_F = jacobian_rows(ctx.meta(), names, params, scale=losses)
        finally:
            _assign(params, saved)
        soft = (torch.diag(p) - torch.outer(p, p)).to(g_f.device)
        H = -self.inner_lr * cross(g_F, g_f) @ soft
        if self.normalization == "l2":
            norms = H.norm(dim=1, keepdim=True)
            H = torch.where(norms > 0, H / norms.clamp_min(1e-300), H)
        c = min_norm_simplex(H @ H.T)
        self.info["moml/hypergradient_norm"] = float((c @ H).norm())
        return (c @ H).cpu()

    def __repr__(self) -> str:
        return f"MOML(inner_lr={self.inner_lr}, lr={self.lr}, normalization={self.normalization!r})"


@register("forum")
class FORUM(LearnedBalancer):
    """FORUM (Ye, Lin, Zhou, Zhang, Tsang, "A First-Order Multi-Gradient Algorithm for Multi-Objective Bi-Level
    Optimization", ECAI 2024), as LibMTL's bilevel trainer implements it (``bacth_forward_FORUM``). The variables
    are ``z = (alpha, omega)``: the task-weight logits ``alpha`` (``p = softmax(alpha)``) and the net's parameters
    ``omega`` (every parameter of the net's optimizer). The lower level is ``f(alpha, omega) = sum_i p_i s_i L_i``
    on the main batch (LibMTL's inner batch), the upper levels are the parts ``F_i = M_i`` of the meta batch
    (LibMTL's outer batch). The bilevel problem is relaxed by the value function: ``q(z) = f(alpha, omega) -
    f(alpha, omega^K)``, ``omega^K`` the net after ``K`` plain SGD steps on ``f`` (first order: ``omega^K`` is held
    fixed when differentiating). At each step:

    1. ``g_q = grad_z f(alpha, omega) - (grad_alpha f(alpha, omega^K), 0)`` (``grad_alpha f = (diag(p) - p p^T)
       (s L)``: loss values only);
    2. ``u_i = (0, grad_omega M_i / ||grad_omega M_i||)`` (the normalised meta gradients; the static weight
       cancels);
    3. ``pi_i = phi - <g_q, u_i> / (||g_q||^2 + 1e-8)``; with ``A = [u_1; ...; u_T; g_q]``, ``w`` solves the QP
       ``min_w w^T A A^T w - phi (||g_q||^2 + 1e-8) w_{T+1}`` s.t. ``w >= 0``, ``sum_{i <= T} w_i = 1``, ``w_{T+1} >=
       sum_i pi_i w_i`` (LibMTL solves it by cvxpy; lossport by :func:`~lossport.solvers.interior_qp`, in the
       slack variables of :meth:`_solve`);
    4. ``lambda <- lambda + beta_r (w_{1..T} - lambda)``, ``beta_r = (r + 1)^(-3/4)``, ``r`` the round (epoch)
       index, as LibMTL (so ``lambda = w`` throughout the first round), ``lambda`` starting at 0;
    5. ``nu = max(sum_i lambda_i pi_i, 0)``; the update direction is ``d = sum_i lambda_i u_i + nu g_q``: the net
       receives ``d``'s ``omega`` part, ``alpha`` takes one Adam step (``lr``) along its ``alpha`` part.

    The net's gradient is LibMTL's exactly (factor 1), written as a weighting of the main batch plus one
    correction: the weights ``b_i = nu p_i`` (so the weighted total's gradient is ``nu grad_omega f``) and the
    zero-valued extra term ``forum/meta``, ``sum_x <x - sg(x), c_x>`` over the optimizer's parameters with ``c =
    sum_i lambda_i u_i`` (as the surgery methods' correction, :mod:`lossport.balance.surgery`). The heads get
    their part of ``d`` too (LibMTL's gradient covers every parameter).

    :param phi: the constraint's margin ``phi`` (LibMTL's ``--FORUM_phi`` 0.1).
    :param inner_step: ``K``, the lower-level SGD steps of ``omega^K`` (LibMTL's ``--inner_step`` 5).
    :param inner_lr: their step size (LibMTL's ``--inner_lr`` 0.1); not the net's learning rate.
    :param lr: ``alpha``'s Adam learning rate (LibMTL's ``--outer_lr`` 1e-3).

    As LibMTL, the inner steps stop early once ``f`` exceeds ``1e5`` (a too large ``inner_lr``). The first
    inner step reuses the main batch's gradient ``grad_omega f`` (LibMTL runs that forward again: the same up to
    dropout masks); the inner steps run on the net's own parameters, which (and the buffers, when the balancer
    is attached to the net through an :class:`~lossport.Objective`) are then put back; the meta forward updates
    BatchNorm statistics, as LibMTL's does. A meta gradient that is exactly zero stays zero (LibMTL divides by
    its norm). Parts missing from the main batch are left out of the step; ``lambda`` is kept per part. Cost per
    step: ``K`` backwards on the main batch, ``T`` backwards of the meta batch for its ``T x P`` Jacobian (memory
    ``T P``), two forwards without gradient, a QP in ``T + 1`` variables. Under torchrun the gradients and the
    Jacobian are averaged over the ranks.

    When the inner steps diverge (the ``1e5`` stop is checked before each step, so the last one can reach
    ``f ~ 1e12``; with LibMTL's ``inner_lr = 0.1`` this happens on ``lossport compare``'s built-in data),
    ``||g_q||^2`` reaches ``1e22``-``1e27`` beside the unit entries of the normalised Gramian. Written in ``w``
    (LibMTL's cvxpy form) the QP is then numerically ill-posed in float64 (its matrix rounds to an indefinite
    one, ``pi`` rounds to ``phi``); lossport solves it in the slack variables of :meth:`_solve`, where every
    term keeps the Gramian's scale, so the answer stays exact there.
    """

    name = "forum"
    kind: ClassVar[str] = "learned"
    meta = True

    def __init__(self, phi: float = 0.1, inner_step: int = 5, inner_lr: float = 0.1, lr: float = 1e-3) -> None:
        super().__init__(lr=lr, init=0.0)
        if not phi >= 0 or math.isinf(phi):
            raise ValueError(f"FORUM: phi must be finite and >= 0, not {phi!r}")
        if isinstance(inner_step, bool) or not isinstance(inner_step, int) or inner_step < 1:
            raise ValueError(f"FORUM: inner_step must be an integer >= 1, not {inner_step!r}")
        if not inner_lr > 0:
            raise ValueError(f"FORUM: inner_lr must be > 0, not {inner_lr!r}")
        self.phi, self.inner_step, self.inner_lr = float(phi), inner_step, float(inner_lr)
        self._net: Any = None
        self._lambda: dict[str, float]
        self._round: int
        self.add_state("_lambda", {})  # LibMTL's lambda_buffer, per part
        self.add_state("_round", 0)  # rounds (epochs) completed: beta = (round + 1)^(-3/4)

    def attach(self, net: nn.Module) -> None:
        self._net = weakref.ref(net)

    def end_round(self, round_means: Mapping[str, float]) -> None:
        self._round += 1

    def step(self, recompute: Callable[[], Losses] | None = None) -> None:
        """Nothing: ``alpha``'s Adam step is taken in the call (LibMTL steps it with the net, on the same
        gradients)."""

    def balance(self, losses: Losses) -> tuple[dict[str, Tensor | float], dict[str, Tensor]]:
        self._ensure(losses)
        names = losses.names
        if not torch.is_grad_enabled() or not names:
            return dict.fromkeys(names, 1.0), {}
        ctx = self.context
        assert ctx is not None and ctx.optimizer is not None and ctx.meta is not None and ctx.train is not None
        params = [x for g in ctx.optimizer.param_groups for x in g["params"] if x.requires_grad]
        dev = params[0].device
        p = torch.softmax(self._current(names).to(dev, torch.float64), 0)
        s = torch.tensor([_static(losses, k) for k in names], dtype=torch.float64, device=dev)
        sp = (s * p).tolist()
        f = torch.stack([losses.parts[k] * sp[i] for i, k in enumerate(names)]).sum()
        g_f = _flat(_mean_over_ranks(torch.autograd.grad(f, params, retain_graph=True, allow_unused=True), params))
        values = torch.stack([losses.parts[k].detach() for k in names]).to(dev, torch.float64)
        ahead = self._inner_values(losses, ctx, params, sp, g_f, float(f.detach()))
        soft = torch.diag(p) - torch.outer(p, p)
        gq_alpha = soft @ (s * values) - soft @ (s * ahead)
        U = jacobian_rows(ctx.meta(), names, params)  # the meta parts' gradients, normalised below
        Ug = torch.cat([U, g_f.to(U.dtype)[None]])
        M = cross(Ug, Ug)  # one pass over the T + 1 rows
        del Ug
        if not (bool(torch.isfinite(M).all()) and bool(torch.isfinite(gq_alpha).all())):
            raise FloatingPointError(
                f"FORUM: the gradients of the parts {names} (main batch, meta batch) or their values after the "
                f"{self.inner_step} inner steps (inner_lr={self.inner_lr}) are not finite; no step was taken and "
                "the balancer's state is unchanged (a smaller inner_lr keeps the inner steps finite)"
            )
        norms = M.diagonal()[:-1].sqrt()
        inv = torch.where(norms > 0, 1 / norms.clamp_min(1e-300), torch.zeros_like(norms))
        scale = torch.cat([inv, inv.new_ones(1)])
        w, pi = self._solve(M * scale[:, None] * scale[None], gq_alpha)
        beta = (self._round + 1) ** -0.75
        for i, k in enumerate(names):
            old = self._lambda.get(k, 0.0)
            self._lambda[k] = old + beta * (float(w[i]) - old)
        lam = torch.tensor([self._lambda[k] for k in names], dtype=torch.float64, device=dev)
        nu = max(float(lam @ pi), 0.0)
        grad_alpha = nu * gq_alpha
        if bool(torch.isfinite(grad_alpha).all()):
            self._update(names, grad_alpha)
        c = (lam * inv).to(U.dtype) @ U
        self.info.update({"forum/nu": nu, **{f"forum/lambda/{k}": float(v) for k, v in zip(names, lam)}})
        return {k: nu * pk for k, pk in zip(names, p.tolist())}, {"forum/meta": _zero_valued(params, c)}

    def _inner_values(
        self, losses: Losses, ctx: Context, params: list[Tensor], sp: list[float], g_f: Tensor, f0: float
    ) -> Tensor:
        """The main batch's part values at ``omega^K`` (``K`` SGD steps on ``f``; the parameters and buffers are
        put back)."""
        assert ctx.train is not None
        names = losses.names
        saved = [x.data for x in params]
        net = self._net() if self._net is not None else None
        buffers = [] if net is None else [(b, b.detach().clone()) for b in net.buffers()]
        flat, grad, value = _flat([x.detach() for x in params]), g_f, f0
        try:
            for i in range(self.inner_step):
                if i > 0:
                    out = ctx.train()
                    f = torch.stack([out.parts[k] * sp[j] for j, k in enumerate(names)]).sum()
                    value = float(f.detach())
                    if value <= 1e5:
                        grads = torch.autograd.grad(f, params, allow_unused=True)
                        grad = _flat(_mean_over_ranks(grads, params))
                if value > 1e5:  # LibMTL: "caused by too large inner_lr and inner_step"
                    break
                flat = flat - self.inner_lr * grad.to(flat.dtype)
                _assign(params, _unflatten(flat, params))
            with torch.no_grad():
                out = ctx.train()
            return torch.stack([out.parts[k] for k in names]).to(params[0].device, torch.float64)
        finally:
            _assign(params, saved)
            AutoLambda._restore(buffers)

    def _solve(self, M: Tensor, gq_alpha: Tensor) -> tuple[Tensor, Tensor]:
        """LibMTL's QP (class docstring, step 3): its solution ``w`` (``T + 1``) and ``pi`` (``T``). ``M``: the
        Gramian of ``[u_1; ...; u_T; grad_omega f]`` (float64).

        Solved in the variables ``(u, t')``, ``u = w_{1..T}`` and ``w_{T+1} = pi^T u + t' / sq`` (``sq = ||g_q||^2
        + 1e-8``, ``t' >= 0`` the coupling constraint's slack): with ``pi = phi - b / sq`` (``b_i = <u_i, g_q>``)
        and ``1^T u = 1`` the objective ``w^T G w - phi sq w_{T+1}`` becomes, exactly and up to a constant,
        ``u^T (A - (sq + e) / sq^2 b b^T) u + phi (1 + 2e / sq) b^T u + 2e / sq^2 t' b^T u + (sq - e) / sq^2 t'^2
        + phi (1 - 2e / sq) t'`` (``A`` the unit rows' Gramian, ``e = 1e-8``), whose terms are all of the size of
        ``A``'s. In ``w`` the terms in ``||g_q||^2`` cancel to ``A``'s size, which float64 loses when ``||g_q||^2``
        is large (``pi_i = phi - b_i / sq`` rounds to ``phi``); the constraints are ``u >= 0``, ``1^T u = 1``,
        ``t' >= 0`` and ``w_{T+1} >= 0``."""
        T = M.shape[0] - 1
        dev = M.device
        e = 1e-8
        sq = float(M[T, T] + gq_alpha @ gq_alpha) + e
        b = M[:T, T]
        pi = self.phi - b / sq
        Q = torch.zeros(T + 1, T + 1, dtype=torch.float64, device=dev)
        Q[:T, :T] = 2 * (M[:T, :T] - (sq + e) / sq**2 * torch.outer(b, b))
        Q[:T, T] = Q[T, :T] = 2 * e / sq**2 * b
        Q[T, T] = 2 * (sq - e) / sq**2
        q = torch.cat([self.phi * (1 + 2 * e / sq) * b, b.new_full((1,), self.phi * (1 - 2 * e / sq))])
        C = torch.cat(
            [torch.eye(T + 1, dtype=torch.float64, device=dev), torch.cat([pi, b.new_full((1,), 1 / sq)])[None]]
        )
        E = torch.cat([b.new_ones(T), b.new_zeros(1)])[None]
        x = interior_qp(Q, q, C, b.new_zeros(T + 2), E, b.new_ones(1))
        u, t = x[:T], x[T]
        w = torch.cat([u, (self.phi * u.sum() - (b @ u) / sq + t / sq)[None]])
        self.info["forum/qp_objective"] = float(0.5 * x @ Q @ x + q @ x)
        return w, pi

    def __repr__(self) -> str:
        return f"FORUM(phi={self.phi}, inner_step={self.inner_step}, inner_lr={self.inner_lr}, lr={self.lr})"


def _unflatten(flat: Tensor, params: list[Tensor]) -> list[Tensor]:
    """``flat`` cut into tensors shaped (and typed) as ``params``."""
    return [x.view_as(p).to(p.dtype) for x, p in zip(torch.split(flat, [p.numel() for p in params]), params)]


def _flat(xs: list[Tensor]) -> Tensor:
    return torch.cat([x.reshape(-1) for x in xs])


def _static(losses: Losses, k: str) -> float:
    w = losses.weights.get(k, 1.0)
    return float(w.detach()) if isinstance(w, Tensor) else float(w)


def _lrs(groups: list[tuple[dict[str, Any], list[Tensor]]]) -> list[float]:
    """Each parameter's learning rate, in the order of the parameters."""
    return [float(g["lr"]) for g, ps in groups for _ in ps]


def _regroup(
    groups: list[tuple[dict[str, Any], list[Tensor]]], grads: list[Tensor], opt: torch.optim.Optimizer
) -> list[Tensor]:
    """``theta'`` of every parameter (step 1 of :class:`AutoLambda`), group by group."""
    out, i = [], 0
    with torch.no_grad():
        for g, ps in groups:
            for p in ps:
                out.append(_look_ahead(p, grads[i], g, opt))
                i += 1
    return out


def _look_ahead(p: Tensor, grad: Tensor, group: dict[str, Any], opt: torch.optim.Optimizer) -> Tensor:
    """``p - lr (m + grad + wd p)``: the authors' virtual step (``m``: SGD's momentum buffer times momentum)."""
    step = grad + float(group.get("weight_decay", 0.0)) * p
    if "momentum" in group:
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            step = step + float(group["momentum"]) * buf
    return p - float(group["lr"]) * step


def _assign(params: list[Tensor], values: list[Tensor]) -> None:
    """Give each parameter the tensor ``values[i]`` as its data (not an in-place write: the main batch's graph,
    which saved the parameters, stays valid once the original tensors are put back)."""
    for p, v in zip(params, values):
        p.data = v


def _mean_over_ranks(grads: tuple[Tensor | None, ...], params: list[Tensor]) -> list[Tensor]:
    """The gradients (zeros where ``None``), averaged over the ranks under torchrun (the surrogate parts'
    gradients average to the global batch's)."""
    out = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params)]
    if not distributed.is_distributed() or not out:
        return out
    flat = distributed.all_reduce_jacobian(torch.cat([g.reshape(-1) for g in out])[None])[0]
    return [x.view_as(p) for x, p in zip(torch.split(flat, [p.numel() for p in params]), params)]


__all__ = ["FORUM", "LDCMTL", "MOML", "AutoLambda", "discrepancy_objective"]
