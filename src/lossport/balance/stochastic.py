"""Gramian methods from the stochastic multi-objective optimisation literature, whose weights carry over from
step to step.

* :class:`CRMOGM` (Zhou et al., NeurIPS 2022): a moving average of the weights of any other Gramian method,
  which reduces the bias that stochastic gradients put into the weights of MGDA-like methods.
* :class:`SDMGrad` (Xiao, Ban, Ji, NeurIPS 2023) and :class:`MoDo` (Chen et al., JMLR 2024): simplex weights
  carried from step to step and moved by a few projected gradient steps on ``w^T G w``-type objectives.

**Three batches, as in the papers.** SDMGrad and MoDo are stated with three independent mini-batches per step:
the weights move on the cross matrix ``J_1 J_2^T`` of the Jacobians of two of them (an unbiased estimate of
the true Gramian ``E[J] E[J]^T``, which ``J J^T`` of one batch is not: its diagonal carries the gradients'
variance), and the update is taken on the third. Here (``batches=3``, the default) the main batch, whose
weighted total is backpropagated, is the third; the two others come from the :class:`~lossport.balance.base.Context`
(:func:`lossport.train` draws them from independent shuffles of the training data). The cross matrix is taken
on the shared parameters layer by layer, like the Gramian, from each batch's layer inputs and per-part output
gradients, without forming a Jacobian (:func:`lossport.gramian.cross_gramian`; ``gramian="params"`` only: in
features mode the coordinates are one batch's examples, and two batches have different ones); a part absent
from an extra batch has a zero row (first batch) or column (second batch) there. Under torchrun the global
matrix ``(1/R^2) sum_{r,q} J_1^r J_2^q^T`` needs the cross-rank terms, which per-rank cross matrices do not
give: there the two explicit ``T x P`` Jacobians are all-reduced (:func:`lossport.distributed.all_reduce_jacobian`,
memory ``2 T P``) and multiplied, so 2 processes give the 1-process matrix. The diagnostics in ``info``
(``norm/``, ``cos/``) are then those of the cross matrix: estimates of the true gradients' norms and cosines.
Given the same matrix the weights are TorchJD's ``SDMGradWeighting`` / ``MoDoWeighting`` (which take that
matrix), times ``T`` (tested).

``batches=1`` keeps one batch's Gramian ``J J^T`` (one forward instead of three): a biased estimate,
which the papers' convergence guarantees do not cover, for when the three forwards cost too much. (The official
SDMGrad code computes its three batches' gradients into aliases of one tensor, so it ends up using one batch's
gradients: see ``/work/shared/reference/balancing-methods.md``.)

Weights carried between steps are kept per part name: a part missing from a batch keeps its weight, the parts
present are renormalised among themselves for the step and written back with the mass they had. A part never
seen before restarts every weight from uniform (TorchJD resets when the number of parts changes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from .. import distributed
from ..gramian import cross_gramian, jacobian
from ..result_types import Losses
from ..solvers import project_simplex
from .base import register, resolve
from .gramian_base import GramianBalancer, gram64
from .loss_level import _positive
from .surgery import _Surgery, stacked
from .weighting import check_gramian

C = TypeVar("C", bound="CRMOGM")


@register("cr_mogm", "crmogm")
class CRMOGM(GramianBalancer):
    """CR-MOGM (Zhou et al., "On the Convergence of Stochastic Multi-Objective
    Gradient Manipulation and Beyond", NeurIPS 2022): smooth the weights of another gradient-level method with
    an exponential moving average, ``lambda_k = alpha lambda_{k-1} + (1 - alpha) lambda_hat_k``, where
    ``lambda_hat_k`` are the wrapped method's weights at step ``k`` and ``lambda_0 = lambda_hat_1`` (so the first
    step is the wrapped method's).

    :param base: the wrapped method: a name (``"mgda"``, ``"upgrad"``, ...) or a :class:`GramianBalancer`
        instance; only its ``weigh`` is used, so the Gramian mode, ``features=`` and ``every=`` are this
        balancer's. Its state (random order, warm start, ...) is part of this balancer's state dict.
    :param alpha: the weight of the past (0.9, TorchJD's ``CRMOGMWeighting`` default; the paper's Corollary 1
        lets ``alpha_k`` grow towards 1 as the learning rate decays: set ``balancer.alpha`` between steps).
        ``alpha = 0`` is the wrapped method; ``alpha = 1`` freezes the first weights.

    Factor: the same as the wrapped method's (the average of weights in the lossport convention is the
    convention's average: TorchJD's ``CRMOGMWeighting(w)`` times the wrapped method's factor). The average is
    kept per part name: a part missing from a batch keeps its average, a part seen for the first time starts
    from its current weight. Advanced only on the calls where the weights are computed (``every=K``)."""

    name = "cr_mogm"
    kind: ClassVar[str] = "gramian"

    def __init__(self, base: str | GramianBalancer = "mgda", alpha: float = 0.9, **engine: Any) -> None:
        super().__init__(**engine)
        inner = resolve(base) if isinstance(base, str) else base
        if (
            not isinstance(inner, GramianBalancer)
            or isinstance(inner, _Surgery)
            or type(inner).compute_gramian is not GramianBalancer.compute_gramian  # ExcessMTL needs the gradients
        ):
            raise TypeError(f"CRMOGM: base must be a method whose weights are a function of the Gramian, not {inner!r}")
        if inner.mode != "params" or inner.every != 1 or inner.params is not None or inner.subset or inner.sketch:
            raise ValueError(
                f"CRMOGM: give the engine options (gramian=, features=, every=, params=, subset=, sketch=) to CRMOGM, "
                f"not to its base "
                f"{inner!r}; only the base's weigh is used"
            )
        self.base = inner
        self.alpha = alpha  # validated by the setter, then declared as state (a schedule may change it)
        self._lambda: dict[str, float]
        self.add_state("_alpha", self._alpha)
        self.add_state("_lambda", {})  # the moving average, per part name

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"CRMOGM: alpha must be in [0, 1], not {value!r}")
        self._alpha = float(value)

    def weigh(self, G: Tensor, losses: Losses) -> Tensor:
        hat = self.base.weigh(G, losses).detach().to(torch.float64).cpu().tolist()
        out = []
        for k, h in zip(losses.names, hat):
            lam = self.alpha * self._lambda[k] + (1 - self.alpha) * h if k in self._lambda else h
            self._lambda[k] = lam
            out.append(lam)
        return torch.tensor(out, dtype=torch.float64, device=G.device)

    def state_dict(self) -> dict[str, Any]:
        """The declared state, with the wrapped method's own state under ``"base"``."""
        return {**super().state_dict(), "base": self.base.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.check_state(state)  # another method's state is refused as such, before anything is loaded
        if "base" not in state:
            raise ValueError(f"this CRMOGM state lacks ['base'] (it has {sorted(state)}): start the balancer afresh")
        self.base.check_state(state["base"])
        super().load_state_dict(state)
        self.alpha = float(self._alpha)  # validated again
        self.base.load_state_dict(state["base"])

    def to(self: C, device: torch.device | str | torch.dtype | None = None, dtype: torch.dtype | None = None) -> C:
        """Move this balancer's state and the wrapped method's (:meth:`Balancer.to`)."""
        super().to(device, dtype)
        self.base.to(device, dtype)
        return self

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", base={self.base!r}, alpha={self.alpha})"


class _CarriedSimplex(GramianBalancer):
    """Base of SDMGrad and MoDo: simplex weights ``w`` (per part name) carried from one computed step to the
    next; :meth:`update` moves the weights of the parts present. With ``batches=3`` the matrix is the cross
    matrix ``J_1 J_2^T`` of the two extra batches of the :class:`~lossport.balance.base.Context` (module
    docstring)."""

    def __init__(self, batches: int = 3, **engine: Any) -> None:
        super().__init__(**engine)
        what = type(self).__name__
        if batches not in (1, 3):
            raise ValueError(
                f"{what}: batches must be 3 (the paper: two batches for the cross matrix J_1 J_2^T, the main one for "
                f"the update) or 1 (one batch's Gramian, biased), not {batches!r}"
            )
        if batches == 3 and self.mode != "params":
            raise ValueError(
                f"{what}: the cross matrix J_1 J_2^T of two batches exists on the shared parameters only (in features "
                "mode each batch has its own examples as coordinates); use gramian='params', or batches=1 for one "
                "batch's Gramian"
            )
        self.batches = batches
        self._w: dict[str, float]
        self.add_state("_w", {})  # the carried simplex weights, per part name (host numbers)

    def compute_gramian(self, losses: Losses) -> Tensor:
        """``J J^T`` of the main batch (``batches=1``), or the cross matrix ``J_1 J_2^T`` of the two extra batches
        on the main batch's shared parameters (global under torchrun)."""
        if self.batches == 1:
            return super().compute_gramian(losses)
        assert self.context is not None  # checked by __call__
        params = self.shared(losses)
        if distributed.is_distributed():  # the ranks' cross terms J_1^r J_2^q^T: all-reduced explicit Jacobians
            J1, J2 = (jacobian_rows(evaluate(), losses.names, params) for evaluate in self.context.extra[:2])
            return cross(J1, J2)
        one, two = (evaluate() for evaluate in self.context.extra[:2])
        return cross_rows(one, two, losses.names, params)

    def update(self, G: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        """``(new w, output weights)`` (both on the simplex) from ``G`` and the current ``w`` of the parts present."""
        raise NotImplementedError

    def weigh(self, G: Tensor, losses: Losses) -> Tensor:
        G = check_gramian(G, type(self).__name__) if self.batches == 1 else _check_cross(G, type(self).__name__)
        names = losses.names
        T = len(names)
        if all(k in self._w for k in names) and (mass := sum(self._w[k] for k in names)) > 0:
            w0 = torch.tensor([self._w[k] / mass for k in names], dtype=torch.float64, device=G.device)
        else:  # first call, or a part never seen before: restart from uniform (TorchJD resets on a new shape)
            self._w, mass = {}, 1.0
            w0 = torch.full((T,), 1.0 / T, dtype=torch.float64, device=G.device)
        new, out = self.update(G.detach().to(torch.float64), w0)
        self._w.update({k: mass * float(v) for k, v in zip(names, new.tolist())})
        return T * out


def jacobian_rows(other: Losses, names: list[str], params: list[Tensor], scale: Losses | None = None) -> Tensor:
    """The ``T x P`` Jacobian of another batch's parts ``names`` on ``params`` (in the parameters' dtype; float64
    under torchrun, where it is averaged over the ranks), rows in ``names`` order, zero rows for the parts that
    batch lacks; with ``scale``, each row times the static weight ``scale.weights[name]``."""
    present = [k for k in names if k in other.parts]
    parts = [other.parts[k] * _static(scale, k) if scale is not None else other.parts[k] for k in present]
    rows = jacobian(parts, params) if present else None
    dtype = rows.dtype if rows is not None else params[0].dtype
    if distributed.is_distributed():
        dtype = torch.float64
    if rows is not None and len(present) == len(names) and rows.dtype == dtype:
        J = rows
    else:
        J = torch.zeros(len(names), sum(p.numel() for p in params), dtype=dtype, device=params[0].device)
        if rows is not None:
            J[[names.index(k) for k in present]] = rows.to(dtype)
    return distributed.all_reduce_jacobian(J) if distributed.is_distributed() else J


def cross_rows(one: Losses, two: Losses, names: list[str], params: list[Tensor]) -> Tensor:
    """``J_1 J_2^T`` (``T x T``, float64, rows and columns in ``names`` order) of two other batches' parts on
    ``params``, by :func:`lossport.gramian.cross_gramian` (no explicit Jacobian); a part that batch ``i`` lacks
    has a zero row (``i = 1``) or column (``i = 2``). One process only: under torchrun the global matrix needs
    the ranks' cross terms, which :func:`jacobian_rows` and :func:`cross` give."""
    M = torch.zeros(len(names), len(names), dtype=torch.float64, device=params[0].device)
    rows = [k for k in names if k in one.parts]
    cols = [k for k in names if k in two.parts]
    if rows and cols:
        sub = cross_gramian([one.parts[k] for k in rows], [two.parts[k] for k in cols], params)
        r = torch.tensor([names.index(k) for k in rows], device=M.device)
        c = torch.tensor([names.index(k) for k in cols], device=M.device)
        M[r[:, None], c[None, :]] = sub.to(M.device)
    return M


def cross(A: Tensor, B: Tensor, chunk: int = 1 << 16) -> Tensor:
    """``A B^T`` in float64, accumulated over column blocks of ``chunk`` (no float64 copy of the whole ``T x P``
    matrices)."""
    out = torch.zeros(A.shape[0], B.shape[0], dtype=torch.float64, device=A.device)
    for c in range(0, A.shape[1], chunk):
        out += A[:, c : c + chunk].to(torch.float64) @ B[:, c : c + chunk].to(torch.float64).T
    return out


def _static(losses: Losses, k: str) -> float:
    w = losses.weights.get(k, 1.0)
    return float(w.detach()) if isinstance(w, Tensor) else float(w)


def _check_cross(M: Tensor, what: str) -> Tensor:
    """A cross matrix ``J_1 J_2^T`` in float64: square and finite (its diagonal may be negative)."""
    M = M.to(torch.float64)
    if M.dim() != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"{what}: the cross matrix must be (T, T), not {tuple(M.shape)}")
    if not bool(torch.isfinite(M).all()):
        raise FloatingPointError(f"{what}: the cross matrix J_1 J_2^T has NaN or inf entries")
    return M


@register("sdmgrad")
class SDMGrad(_CarriedSimplex):
    """SDMGrad (Xiao, Ban, Ji, "Direction-oriented Multi-objective Learning: Simple and Provable Stochastic
    Algorithms", NeurIPS 2023): the update ``d = J^T (w + lambda w~) / (1 + lambda)`` stays within a ball around
    the preference direction ``J^T w~`` (``w~ = 1/T``, the mean gradient); the simplex weights ``w`` are found by
    ``n_iter`` steps of projected gradient descent with momentum on ``1/2 ||J^T (w + lambda w~)||^2``, i.e. with
    ``A = G / mean_i(sqrt(G_ii))^2`` (the authors' scale normalisation), ``v <- momentum v + A (w + lambda w~)``,
    ``w <- proj_simplex(w - lr v)``, warm-started from the previous step's ``w``.

    :param lambda_: the pull towards the mean gradient (0.3, the value of the authors' experiments and LibMTL;
        their class default is 0.6). ``0`` is a stochastic MGDA.
    :param lr: inner step size (10), ``momentum`` (0.5) and ``n_iter`` (20): the authors' inner solver.
    :param batches: 3 (the paper, Algorithm 1: ``G`` is the cross matrix ``J_xi1 J_xi2^T`` of two independent
        batches, the update ``J_zeta^T (w + lambda w~) / (1 + lambda)`` on the third, the main batch) or 1 (one
        batch's Gramian: biased; module docstring).

    Factor ``T``: the paper's and TorchJD's weights ``(w + lambda w~) / (1 + lambda)`` sum to 1. Cost with
    ``batches=3``: three forwards, the per-part backward passes of the two extra batches (heads once, trunk
    batched, as for the Gramian; no explicit Jacobian outside torchrun) and the backward of the total."""

    name = "sdmgrad"
    kind: ClassVar[str] = "gramian"

    def __init__(
        self,
        lambda_: float = 0.3,
        lr: float = 10.0,
        momentum: float = 0.5,
        n_iter: int = 20,
        batches: int = 3,
        **engine: Any,
    ) -> None:
        super().__init__(batches=batches, **engine)
        if not lambda_ >= 0:
            raise ValueError(f"SDMGrad: lambda_ must be >= 0, not {lambda_!r}")
        if not lr > 0:
            raise ValueError(f"SDMGrad: lr must be > 0, not {lr!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"SDMGrad: momentum must be in [0, 1), not {momentum!r}")
        if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
            raise ValueError(f"SDMGrad: n_iter must be an integer >= 1, not {n_iter!r}")
        self.lambda_, self.lr, self.momentum, self.n_iter = float(lambda_), float(lr), float(momentum), n_iter

    def update(self, G: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        T = G.shape[0]
        pref = torch.full((T,), 1.0 / T, dtype=torch.float64, device=G.device)
        scale = G.diagonal().clamp_min(0).sqrt().mean()
        A = G / (scale**2 + 1e-8)
        v: Tensor | None = None
        for _ in range(self.n_iter):
            g = A @ (w + self.lambda_ * pref)
            v = g if v is None else self.momentum * v + g
            w = project_simplex(w - self.lr * v)
        return w, (w + self.lambda_ * pref) / (1 + self.lambda_)

    def __repr__(self) -> str:
        return (
            super().__repr__()[:-1] + f", lambda_={self.lambda_}, lr={self.lr}, n_iter={self.n_iter}, "
            f"batches={self.batches})"
        )


@register("modo")
class MoDo(_CarriedSimplex):
    """MoDo (Chen, Fernando, Ying, Chen, "Three-Way Trade-Off in Multi-Objective Learning: Optimization,
    Generalization and Conflict-Avoidance", JMLR 2024): one projected gradient step per training step
    on the simplex weights, ``lambda <- proj_simplex(lambda - gamma (G lambda + rho lambda))``, starting from
    ``1/T``; the update is ``J^T lambda``.

    :param gamma: the weights' step size (0.1, TorchJD's default); ``G`` is not normalised, so ``gamma`` acts
        relative to the squared gradient norms.
    :param rho: the l2 regulariser of the weights (0.1, TorchJD's default).

    :param batches: 3 (the paper, Algorithm 1: ``lambda`` moves on ``J_1 J_2^T`` of two independent batches
        ``z_t1, z_t2``, the update ``J_3^T lambda`` is on the third, the main batch) or 1 (one batch's Gramian:
        biased, outside the paper's guarantee; module docstring).

    Factor ``T``: the paper's and TorchJD's ``lambda`` sums to 1. Heads get ``T lambda_i`` times their gradient
    (:mod:`~lossport.balance.gramian_base`); LibMTL's MoDo gives them their plain gradient. Since the step on
    ``lambda`` is not normalised, a part with a much larger gradient (an unscaled regression) sends ``lambda`` to
    an edge of the simplex at most steps with that part's weight at 0, and its head then trains only on the other
    steps (multidigits: docs/balancing.md, BENCHMARKS.md)."""

    name = "modo"
    kind: ClassVar[str] = "gramian"

    def __init__(self, gamma: float = 0.1, rho: float = 0.1, batches: int = 3, **engine: Any) -> None:
        super().__init__(batches=batches, **engine)
        if not gamma > 0:
            raise ValueError(f"MoDo: gamma must be > 0, not {gamma!r}")
        if not rho >= 0:
            raise ValueError(f"MoDo: rho must be >= 0, not {rho!r}")
        self.gamma, self.rho = float(gamma), float(rho)

    def update(self, G: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        w = project_simplex(w - self.gamma * (G @ w + self.rho * w))
        return w, w

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", gamma={self.gamma}, rho={self.rho}, batches={self.batches})"


@register("moco")
class MoCo(_Surgery):
    """MoCo (Fernando et al., "Mitigating Gradient Bias in Multi-objective
    Learning: A Provably Convergent Approach", ICLR 2023), in the form of LibMTL's implementation (from the
    authors' code): track each part's gradient with a moving average and run MGDA-like weights on the tracked
    gradients, which removes the bias that a single batch's stochastic gradients put into MGDA's weights.

    At the ``k``-th computed step, with ``g_i`` part ``i``'s gradient on the shared parameters and ``L_i`` its
    value (times its static weight):

    * ``y_i <- y_i - beta_k (y_i - L_i g_i / (||g_i|| + 1e-8))`` (``y_i = 0`` at the start),
    * ``lambda <- softmax(lambda - gamma_k (Y Y^T + rho I) lambda)`` (``lambda = 1/T`` at the start),
    * the shared parameters move along ``d = T Y^T lambda``,

    with ``beta_k = beta / k^beta_sigma`` and ``gamma_k = gamma / k^gamma_sigma``. Defaults: LibMTL's ``beta =
    0.5``, ``beta_sigma = 0.5``, ``gamma = 0.1``, ``gamma_sigma = 0.5``, ``rho = 0``.

    Factor ``T``: LibMTL's update is ``Y^T lambda`` (``lambda`` sums to 1). Applied through the zero-valued term
    ``moco/shared`` (:mod:`lossport.balance.surgery`); heads receive their plain gradient (``b = 1``), as in
    LibMTL. **State**: the tracked gradients ``Y``, ``T x P`` floats (``P`` the number of shared parameters: as
    much memory as a second copy of the trunk per part, kept on the gradients' device and saved in the state
    dict), ``lambda`` and the step count. The tracks restart (counted in ``info`` as ``moco/restarts``) if the
    set of shared parameters changes. ``gramian="params"`` only: in ``features`` mode the coordinates are the
    examples of one batch, and a moving average across batches of different examples means nothing.
    ``every=K``: MoCo runs (and its state moves) on every ``K``-th call; the calls between are the plain sum.
    A missing part keeps its track and its ``lambda``; the softmax runs over the parts present."""

    name = "moco"
    kind: ClassVar[str] = "surgery"  # tracks the gradients themselves (a correction term)

    def __init__(
        self,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
        **engine: Any,
    ) -> None:
        super().__init__(**engine)
        if self.mode != "params":
            raise ValueError(
                "MoCo tracks each part's gradient across steps; in features mode the coordinates are the examples "
                "of one batch, so use gramian='params'"
            )
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"MoCo: beta must be in (0, 1], not {beta!r}")
        if not gamma > 0:
            raise ValueError(f"MoCo: gamma must be > 0, not {gamma!r}")
        if not (beta_sigma >= 0 and gamma_sigma >= 0 and rho >= 0):
            raise ValueError(
                f"MoCo: beta_sigma, gamma_sigma and rho must be >= 0, not {beta_sigma!r}, {gamma_sigma!r}, {rho!r}"
            )
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self.gamma, self.gamma_sigma, self.rho = float(gamma), float(gamma_sigma), float(rho)
        self._k: int  # computed steps so far
        self._y: dict[str, Tensor]  # the tracked gradients, per part name, on the gradients' device
        self._lambda: dict[str, float]
        self._width: int | None
        self._restarts: int
        for name, value in (("_k", 0), ("_y", {}), ("_lambda", {}), ("_width", None), ("_restarts", 0)):
            self.add_state(name, value)

    def surgery(self, J: Tensor, xs: list[Tensor], losses: Losses, s: Tensor) -> tuple[Tensor, Tensor, dict]:
        names = losses.names
        T = len(names)
        k = self._k + 1
        state: dict[str, Any] = {"_k": k, "_width": J.shape[1]}
        tracks = self._y
        if self._width is not None and J.shape[1] != self._width:
            tracks = {}
            state["_restarts"] = self._restarts + 1
        vals = torch.stack([losses.parts[n].detach() for n in names]).to(J)
        for n, v in zip(names, vals.tolist(), strict=True):  # L_i g_i: a negative L_i points the track uphill
            _positive("MoCo", n, v, "it tracks L_i g_i / ||g_i||, which points up part i's slope when L_i < 0")
        # in place, with the same roundings as Y - beta_k (Y - J / (||J|| + 1e-8) * (vals s)): one T x P buffer
        target = torch.div(J, J.norm(dim=1, keepdim=True) + 1e-8).mul_((vals * s)[:, None])
        beta_k = self.beta / k**self.beta_sigma
        old = stacked([tracks[n].to(J) if n in tracks else torch.zeros_like(J[0]) for n in names])  # read only
        Y = target.sub_(old).mul_(beta_k).add_(old)  # target - Y = -(Y - target) exactly; Y + t = t + Y
        del old
        lam = torch.tensor([self._lambda.get(n, 1.0 / T) for n in names], dtype=torch.float64, device=J.device)
        YY = gram64(Y) + self.rho * torch.eye(T, dtype=torch.float64, device=J.device)
        lam = torch.softmax(lam - self.gamma / k**self.gamma_sigma * (YY @ lam), dim=0)
        keep = self._dtype or Y.dtype  # the tracks' dtype: the one asked by to(), else the gradients'
        # the rows of this step's Y are the tracks (views, no copy) when every track is renewed; with a missing part
        # (whose track then holds its whole step's Y alive: at most one older Y) copies
        views = keep == Y.dtype and set(tracks) <= set(names)
        rows = Y.detach().unbind(0) if views else [Y[i].detach().to(keep, copy=True) for i in range(T)]
        state["_y"] = {**tracks, **dict(zip(names, rows))}
        state["_lambda"] = {**self._lambda, **dict(zip(names, lam.tolist()))}
        d = T * (lam.to(J.dtype) @ Y)
        return torch.ones(T, dtype=J.dtype, device=J.device), d - s @ J, state

    def balance(self, losses: Losses) -> Any:
        out = super().balance(losses)
        self.info["moco/restarts"] = float(self._restarts)
        for k, v in self._lambda.items():
            self.info[f"moco/lambda/{k}"] = v
        return out


__all__ = ["CRMOGM", "MoCo", "MoDo", "SDMGrad"]
