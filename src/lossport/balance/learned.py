"""Learned balancers: weights with parameters of their own, trained by the balancer's own optimizer.

:class:`Uncertainty` (Kendall et al. 2018), :class:`IMTLL` (Liu et al. 2021), :class:`FAMO` (Liu et al. 2023) and
:class:`GradNorm` (Chen et al. 2018); the bilevel and router methods of :mod:`lossport.balance.bilevel` share the
base. Each keeps one learned scalar per part in one vector ``theta`` (an ``nn.Parameter``, in the objective's
part order), created at the first call for every part of the objective (``losses.parts`` and
``losses.missing``), and trains it with Adam at the balancer's learning rate and no weight decay (FAMO: its
regulariser ``gamma`` as Adam's weight decay, as in the paper). ``theta`` is never given to the net's optimizer:

* UW, IMTL-L, GradNorm and LDC-MTL return terms that carry gradient to ``theta``, so the user's
  ``losses.total.backward()`` fills its ``.grad``; :meth:`Balancer.step` then takes one Adam step and clears it.
* FAMO's logits get no gradient from the backward; :meth:`FAMO.step` computes their update from the losses
  re-evaluated on the same batch after the net's step.

Missing parts: a part absent from a batch gets no term, so no gradient reaches its entry of ``theta`` and Adam
skips it (its value, moments and step count are unchanged), as if each part had its own parameter.

Signs: UW and IMTL-L need finite losses ``>= 0`` (with a negative loss their objective is unbounded below in the
learned scale), GradNorm too (its training rates are loss ratios), FAMO losses above ``floor``; each raises an
error naming the part otherwise.

Device and dtype: ``theta`` is created on the device of the parts and in their dtype (at least float32:
half-precision parts give float32 parameters, as an optimizer needs); :meth:`LearnedBalancer.to` moves it with
Adam's moments, and a call with parts on another device brings them there.

State (``state_dict``, format version 2): the part names, ``theta`` (values, dtype, device), Adam's moments and
step counts, plus each method's own declared records; loading it into a fresh balancer gives the same subsequent
weights. A version-1 state (one parameter per part, torch's Adam state) is refused with that reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from .. import distributed
from ..result_types import Losses
from .base import Balancer, register
from .loss_level import _floats, _positive

L = TypeVar("L", bound="LearnedBalancer")


class LearnedBalancer(Balancer):
    """Base of the balancers with one learned scalar per part (see the module docstring).

    The scalars live in one vector ``theta`` (``nn.Parameter`` of shape ``(T,)``, in the objective's part order),
    trained by Adam (Kingma & Ba, ICLR 2015, Alg. 1; L2 weight decay added to the gradient, as
    ``torch.optim.Adam``) element by element: each part has its own step count, and a step updates only the
    parts that received a gradient, so a part missing from a batch keeps its value and moments, exactly as
    ``torch.optim.Adam`` over one scalar parameter per part (tested). For ``g`` the gradient of a part stepped
    for the ``t``-th time::

        g <- g + weight_decay * theta
        m <- beta1 m + (1 - beta1) g,    v <- beta2 v + (1 - beta2) g^2
        theta <- theta - (lr / (1 - beta1^t)) m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    with ``beta = (0.9, 0.999)`` and ``eps = 1e-8`` (torch's defaults). One vector instead of ``T`` parameters is
    one autograd leaf and a handful of vector operations per step: measured in ``benchmarks/cpu_time.py``.
    """

    kind = "learned"
    version = 2
    """Format 2: one vector ``theta`` and the Adam moments as vectors (format 1 kept one Adam over ``T``
    scalar parameters)."""
    betas: ClassVar[tuple[float, float]] = (0.9, 0.999)
    adam_eps: ClassVar[float] = 1e-8

    def __init__(self, lr: float, init: float, weight_decay: float = 0.0) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"{type(self).__name__}: lr must be > 0, not {lr}")
        if not weight_decay >= 0:
            raise ValueError(f"{type(self).__name__}: weight decay must be >= 0, not {weight_decay}")
        self.lr = float(lr)
        self.init = float(init)
        self.weight_decay = float(weight_decay)
        self._names: list[str] = []
        self._index: dict[str, int] = {}
        self._theta: nn.Parameter | None = None
        self._reached: Tensor | None = None  # the parts a gradient reached since the last step (bool, (T,))
        self._all = torch.ones(0, dtype=torch.bool)  # every part (bool, (T,)): _reached when all were reached
        self._count: int | None = None  # the step count shared by every part (-1: they differ; None: not known)
        self._exp_avg: Tensor | None
        self._exp_avg_sq: Tensor | None
        self._steps: Tensor | None  # Adam steps taken by each part (int64)
        self.add_state("_exp_avg", None)
        self.add_state("_exp_avg_sq", None)
        self.add_state("_steps", None)

    # -- parameters ------------------------------------------------------------------------------------
    def _ensure(self, losses: Losses) -> None:
        if self._theta is None:
            names = list(losses.parts) + [k for k in losses.missing if k not in losses.parts]
            ref = next(iter(losses.parts.values()), None)
            device = ref.device if ref is not None else None
            dtype = self._dtype or (torch.promote_types(ref.dtype, torch.float32) if ref is not None else torch.float32)
            self._build(names, torch.full((len(names),), self.init, dtype=dtype, device=device))
            self._exp_avg = torch.zeros_like(self._params_vector())
            self._exp_avg_sq = torch.zeros_like(self._exp_avg)
            self._steps = torch.zeros(len(names), dtype=torch.int64, device=device)
            return
        unknown = [k for k in losses.parts if k not in self._index]
        if unknown:
            raise ValueError(
                f"{type(self).__name__}: parts {unknown} were not in the objective when the balancer was "
                f"first called (parts {self._names}); use a fresh balancer for a different objective"
            )

    def _build(self, names: list[str], values: Tensor) -> None:
        self._names = list(names)
        self._index = {k: i for i, k in enumerate(names)}
        self._theta = nn.Parameter(values.detach().clone())
        self._all = torch.ones(len(names), dtype=torch.bool, device=self._theta.device)
        self._reached = None
        self._count = None

    def _params_vector(self) -> nn.Parameter:
        assert self._theta is not None, "the balancer's parameters are created at its first call"
        return self._theta

    def _rows(self, names: list[str]) -> Tensor | None:
        """Indices of ``names`` in ``theta`` (``None``: all parts, in order)."""
        if names == self._names:
            return None
        return torch.tensor([self._index[k] for k in names], dtype=torch.long, device=self._params_vector().device)

    def _vector(self, names: list[str]) -> Tensor:
        """``theta`` at ``names``, differentiable: a backward through it marks those parts for the next
        :meth:`step` (the parts it does not reach keep their value and Adam moments)."""
        theta, rows = self._params_vector(), self._rows(names)
        out = theta.view_as(theta) if rows is None else theta.index_select(0, rows)
        if out.requires_grad:
            mark = self._all
            if rows is not None:
                mark = torch.zeros_like(self._all)
                mark[rows] = True
            out.register_hook(lambda g, mark=mark: self._reach(mark))
        return out

    def _reach(self, mark: Tensor) -> None:
        if self._reached is None or mark is self._all:
            self._reached = mark
        elif self._reached is not self._all:
            self._reached = self._reached | mark

    def _current(self, names: list[str]) -> Tensor:
        """``theta`` at ``names``, detached (a copy)."""
        theta, rows = self._params_vector().detach(), self._rows(names)
        return theta.clone() if rows is None else theta.index_select(0, rows)

    def parameters(self) -> list[nn.Parameter]:
        return [] if self._theta is None else [self._theta]

    @property
    def values(self) -> dict[str, float]:
        """Current value of each part's learned parameter."""
        if self._theta is None:
            return {}
        return dict(zip(self._names, self._theta.detach().tolist(), strict=True))

    # -- Adam ------------------------------------------------------------------------------------------
    def _adam(self, grad: Tensor, mask: Tensor | None) -> None:
        """One Adam step (class docstring) of the parts where ``mask`` is true (``None``: every part), with
        gradient ``grad`` (T,)."""
        theta = self._params_vector()
        assert self._exp_avg is not None and self._exp_avg_sq is not None and self._steps is not None
        b1, b2 = self.betas
        with torch.no_grad():
            g = grad.to(theta.dtype)
            if self.weight_decay:
                g = g + self.weight_decay * theta
            count = self._common_count() if mask is None else -1
            if count >= 0:  # every part, all at the same step: in place, with host bias corrections
                self._count = t = count + 1
                self._steps += 1
                self._exp_avg.lerp_(g, 1 - b1)
                self._exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (self._exp_avg_sq.sqrt() / math.sqrt(1 - b2**t)).add_(self.adam_eps)
                theta.addcdiv_(self._exp_avg, denom, value=-self.lr / (1 - b1**t))
                return
            mask = self._all if mask is None else mask
            self._count = None  # the parts' step counts may differ now: look again at the next step
            self._steps += mask
            steps = self._steps.clamp_min(1).to(theta.dtype)
            m = torch.where(mask, self._exp_avg.lerp(g, 1 - b1), self._exp_avg)
            v = torch.where(mask, self._exp_avg_sq * b2 + (1 - b2) * g * g, self._exp_avg_sq)
            denom = v.sqrt() / (1 - b2**steps).sqrt() + self.adam_eps
            theta.sub_(torch.where(mask, (self.lr / (1 - b1**steps)) * m / denom, 0.0))
            self._exp_avg, self._exp_avg_sq = m, v

    def _common_count(self) -> int:
        """The step count shared by every part, or -1 when they differ (kept on the host between steps)."""
        if self._count is None:
            assert self._steps is not None
            lo, hi = torch.aminmax(self._steps)
            self._count = int(lo) if int(lo) == int(hi) else -1
        return self._count

    def _update(self, names: list[str], grad: Tensor | list[float]) -> None:
        """One Adam step of the parts ``names`` with the gradient ``grad`` (one value each), computed by the
        method itself (FAMO's logits, the bilevel methods' hypergradients)."""
        if not names:
            return
        theta = self._params_vector()
        full = torch.zeros_like(theta.detach())
        mask = torch.zeros(len(self._names), dtype=torch.bool, device=theta.device)
        rows = torch.tensor([self._index[k] for k in names], dtype=torch.long, device=theta.device)
        full[rows] = torch.as_tensor(grad, dtype=theta.dtype, device=theta.device)
        mask[rows] = True
        self._adam(full, None if len(set(names)) == len(self._names) else mask)

    # -- protocol --------------------------------------------------------------------------------------
    def step(self, recompute: Callable[[], Losses] | None = None) -> None:
        """One Adam step on the parts that received a gradient from the backward passes since the last step;
        then clear the gradient.

        A non-finite gradient (a mixed-precision step that the ``GradScaler`` skipped, for example) skips the
        step, as the scaler does for the net: the parameters and Adam's state are left unchanged."""
        theta, reached = self._theta, self._reached
        self._reached = None
        if theta is None or theta.grad is None:
            return
        grad, theta.grad = theta.grad, None
        if not bool(torch.isfinite(grad).all()):
            self.info["skipped_nonfinite_step"] = 1.0
            return
        self.info.pop("skipped_nonfinite_step", None)
        # no mark: a gradient set by hand, for every part
        self._adam(grad, None if reached is None or reached is self._all else reached)
        self._after_step()

    def _after_step(self) -> None:
        """Hook for projections after the Adam step (GradNorm's renormalisation)."""

    def state_dict(self) -> dict[str, Any]:
        """The declared state (header and Adam's moments included), the part names and ``theta`` (a detached
        copy: its values, dtype and device)."""
        theta = None if self._theta is None else self._theta.detach().clone()
        return {**super().state_dict(), "names": list(self._names), "theta": theta}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        missing = [k for k in ("names", "theta") if k not in state]
        if missing:
            raise ValueError(f"this {type(self).__name__} state lacks {missing}: start the balancer afresh")
        if state["theta"] is None:
            self._names, self._index, self._theta, self._reached = [], {}, None, None
            return
        theta = state["theta"]
        device = self._device if self._device is not None else theta.device
        self._build(list(state["names"]), theta.to(device))  # the moments came on that device too (_import)

    def to(self: L, device: torch.device | str | torch.dtype | None = None, dtype: torch.dtype | None = None) -> L:
        """Move the declared state (Adam's moments, by :meth:`Balancer.to`) and ``theta``. ``theta`` is a new
        ``nn.Parameter`` afterwards (a move to ``meta`` cannot be made in place): ask :meth:`parameters` again."""
        super().to(device, dtype)
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        if self._theta is None:
            return self
        old, reached, old_all = self._theta, self._reached, self._all
        self._build(self._names, old.detach().to(device=device, dtype=dtype))
        new = self._params_vector()
        if old.grad is not None:
            new.grad = old.grad.to(device=new.device, dtype=new.dtype)
        self._reached = None if reached is None else self._all if reached is old_all else reached.to(new.device)
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(lr={self.lr})"


def _values(method: str, losses: Losses) -> list[float]:
    """The parts' values as floats (one host sync), each checked finite and ``>= 0`` (:func:`_positive`)."""
    vals = _floats(losses)
    for k, v in zip(losses.parts, vals, strict=True):
        _positive(method, k, v, _UNBOUNDED)
    return vals


# ------------------------------------------------------------------------------------------------------
_FORMS = {"regression": 0.5, "classification": 1.0}
_UNBOUNDED = "with a negative loss its objective is unbounded below in the learned scale"


@register("uw", "uncertainty")
class Uncertainty(LearnedBalancer):
    """Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018), with ``s_i = log sigma_i^2`` learned.

    Regression form (Gaussian likelihood): ``L_i / (2 sigma_i^2) + log sigma_i = 0.5 exp(-s_i) L_i + 0.5 s_i``;
    classification form (softmax with temperature, the paper's approximation): ``L_i / sigma_i^2 + log sigma_i
    = exp(-s_i) L_i + 0.5 s_i``. Weights ``b_i = c_i exp(-s_i)`` (``c_i = 0.5`` or ``1``), attached to ``s_i``,
    and the extra term ``uncertainty/log_var = 0.5 sum_i s_i`` (parts present). The paper's weights, factor 1
    (so at ``s = 0`` a regression part has ``b = 0.5``: half the plain sum). At the optimum of ``s_i``,
    ``exp(s_i) = c_i' L_i``: UW drifts towards SI's ``1/L_i`` weights.

    Args:
        form: ``"regression"`` (default) or ``"classification"`` for every part, or ``{part: form}`` (parts not
            named are regression).
        lr: learning rate of the balancer's Adam on ``s`` (0.025: nash-mtl/FAMO's ``method_params_lr``).
        init: initial ``s_i`` (0: nash-mtl, FAMO, TorchJD; LibMTL uses -0.5).

    Same as TorchJD's ``scalarization.UW`` (regression form, ``s`` init 0) when the static weights are 1. With
    static weights ``w_i = s_i b_i`` the learned variance balances ``s_i L_i``.
    """

    name = "uw"

    def __init__(self, form: str | Mapping[str, str] = "regression", lr: float = 0.025, init: float = 0.0) -> None:
        super().__init__(lr=lr, init=init)
        forms = {"*": form} if isinstance(form, str) else dict(form)
        for k, f in forms.items():
            if f not in _FORMS:
                raise ValueError(f"Uncertainty: form of {k!r} must be 'regression' or 'classification', not {f!r}")
        self.forms = forms
        self._c_cache: tuple[tuple[Any, ...], Tensor] | None = None

    def _c(self, part: str) -> float:
        return _FORMS[self.forms.get(part, self.forms.get("*", "regression"))]

    def _factors(self, names: list[str], like: Tensor) -> Tensor:
        """The forms' factors ``c_i`` of ``names`` as a vector like ``like`` (kept for the next call)."""
        key = (tuple(names), like.dtype, like.device)
        if self._c_cache is None or self._c_cache[0] != key:
            c = torch.tensor([self._c(k) for k in names], dtype=like.dtype, device=like.device)
            self._c_cache = (key, c)
        return self._c_cache[1]

    def balance(self, losses: Losses) -> tuple[Tensor | dict[str, Tensor], dict[str, Tensor]]:
        self._ensure(losses)
        unknown = [k for k in self.forms if k != "*" and k not in self._index]
        if unknown:
            raise ValueError(f"Uncertainty: form given for {unknown}, which are not loss parts ({self._names})")
        names = list(losses.parts)
        if not names:
            return {}, {}
        _values("Uncertainty", losses)
        s = self._vector(names)
        weights = self._factors(names, s) * torch.exp(-s)
        return weights, {"uncertainty/log_var": 0.5 * s.sum()}

    def __repr__(self) -> str:
        return f"Uncertainty(form={self.forms.get('*', self.forms)!r}, lr={self.lr}, init={self.init})"


@register("imtl_l", "imtll")
class IMTLL(LearnedBalancer):
    """IMTL-L (Liu et al., ICLR 2021), the loss-balance half of IMTL: minimise ``sum_i (exp(s_i) L_i - s_i)``
    jointly in the net and ``s``. Weights ``b_i = exp(s_i)`` attached to ``s_i`` and the extra term
    ``imtl_l/scale = -sum_i s_i``. Factor 1 to the paper (``b = 1`` at ``s = 0``). At the optimum of ``s_i``,
    ``exp(s_i) = 1/L_i``, so IMTL-L reaches SI's log transform (DB-MTL Prop. 3.1). Same as TorchJD's
    ``scalarization.IMTLL``; equal to twice UW at ``-s`` up to the constant.

    ``lr`` (0.025, nash-mtl/FAMO's ``method_params_lr``) is that of the balancer's Adam; ``init`` the initial ``s``.
    """

    name = "imtl_l"

    def __init__(self, lr: float = 0.025, init: float = 0.0) -> None:
        super().__init__(lr=lr, init=init)

    def balance(self, losses: Losses) -> tuple[Tensor | dict[str, Tensor], dict[str, Tensor]]:
        self._ensure(losses)
        names = list(losses.parts)
        if not names:
            return {}, {}
        _values("IMTLL", losses)
        s = self._vector(names)
        weights = torch.exp(s)
        return weights, {"imtl_l/scale": -s.sum()}


# ------------------------------------------------------------------------------------------------------
@register("famo")
class FAMO(LearnedBalancer):
    """FAMO, fast adaptive multitask optimization (Liu, Feng, Stone & Liu, NeurIPS 2023, Alg. 1).

    Logits ``xi`` (one per part, init 0), ``z = softmax(xi)`` over the parts present, ``D_i = L_i - floor_i + eps``,
    ``c = (sum_i z_i / D_i)^(-1)``. The net's update is ``d = sum_i (c z_i / D_i) g_i``, a convex combination of
    the gradients (the paper's weights ``c z_i / D_i`` sum to 1); lossport scales them to sum ``T``:
    ``b_i = T c z_i / D_i`` (detached; factor ``T`` to the paper, to the authors' code and to TorchJD's
    ``scalarization.FAMO``, whose gradient ours is ``T`` times).

    After the net's optimizer step, :meth:`step` re-evaluates the batch (``recompute``, without gradient),
    takes ``delta_i = log D_i(before) - log D_i(after)`` and one Adam step on ``xi`` with gradient
    ``J_softmax(xi)^T delta`` and weight decay ``gamma`` (the paper's regulariser). This costs one extra forward
    per step (``needs_recompute``).

    Args:
        lr: the logits' learning rate ``beta`` (0.025, paper).
        gamma: logit regularisation (1e-3: paper's NYUv2, QM9, CelebA runs; 1e-2 Cityscapes; official code 1e-5).
        floor: loss lower bound ``l*`` (number, or ``{part: l*}``); 0 by default, so losses must be > 0.
        eps: added to ``D`` (1e-8, as the authors).

    Missing parts: the softmax and ``T`` run over the parts present, and only their logits are updated.
    """

    name = "famo"
    needs_recompute = True

    def __init__(
        self, lr: float = 0.025, gamma: float = 1e-3, floor: float | Mapping[str, float] = 0.0, eps: float = 1e-8
    ) -> None:
        super().__init__(lr=lr, init=0.0, weight_decay=gamma)
        self.gamma = float(gamma)
        self.floor = floor if isinstance(floor, (int, float)) else {k: float(v) for k, v in floor.items()}
        self.eps = float(eps)
        self._before: dict[str, float] | None
        self.add_state("_before", None)

    def _floor(self, k: str) -> float:
        return float(self.floor) if isinstance(self.floor, (int, float)) else self.floor.get(k, 0.0)

    def _D(self, losses: Losses) -> dict[str, float]:
        out = {}
        for k, v in zip(losses.parts, _floats(losses), strict=True):
            d = v - self._floor(k) + self.eps
            if math.isfinite(d) and not d > 0:  # a NaN or inf part is the caller's to report, not a floor problem
                raise ValueError(
                    f"FAMO: part {k!r} = {v} is not above its floor {self._floor(k)}; FAMO takes "
                    "log(L - floor): set floor= below the smallest value the loss can take"
                )
            out[k] = d
        return out

    def balance(self, losses: Losses) -> dict[str, float]:
        self._ensure(losses)
        D = self._D(losses)
        names = list(D)
        z = torch.softmax(self._current(names).double(), 0).tolist()
        c = 1.0 / sum(zi / D[k] for zi, k in zip(z, names, strict=True))
        T = len(names)
        if torch.is_grad_enabled():
            self._before = D
        for k, zi in zip(names, z, strict=True):
            self.info[f"famo/z/{k}"] = zi
        return {k: T * c * zi / D[k] for k, zi in zip(names, z, strict=True)}

    def step(self, recompute: Callable[[], Losses] | None = None) -> None:
        """FAMO's logit update from the losses before and after the net's step on the same batch."""
        if recompute is None:
            raise ValueError(
                "FAMO.step needs recompute=, a function that evaluates the objective again on the same batch: "
                "balancer.step(lambda: objective(net, batch)) or objective.step(net, batch)"
            )
        if self._before is None or self._theta is None:
            return
        with torch.no_grad():
            after = self._D(recompute())
        names = [k for k in self._before if k in after]
        before, self._before = self._before, None
        if not names:
            return
        if not all(math.isfinite(after[k]) for k in names):  # e.g. a float16 overflow: no information, skip
            self.info["skipped_nonfinite_step"] = 1.0
            return
        self.info.pop("skipped_nonfinite_step", None)
        xi = self._current(names)
        delta = [math.log(before[k]) - math.log(after[k]) for k in names]
        d = torch.tensor(delta, dtype=xi.dtype, device=xi.device)
        z = torch.softmax(xi, 0)
        self._update(names, z * (d - z @ d))  # J_softmax(xi)^T delta, J = diag(z) - z z^T

    def __repr__(self) -> str:
        return f"FAMO(lr={self.lr}, gamma={self.gamma}, floor={self.floor})"


# ------------------------------------------------------------------------------------------------------
@register("gradnorm")
class GradNorm(LearnedBalancer):
    """GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018).

    Learned weights ``w_i`` (init 1; ``b_i = w_i``, detached for the net). On the last shared layer ``W``:
    ``G_i = w_i || grad_W (s_i L_i) ||`` (``s_i`` the static weight), ``r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0))``
    (``L_i(0)``: the part's first value), target ``sg(mean_j G_j * r_i^alpha)`` and
    ``L_grad = sum_i |G_i - target_i|``. The balancer returns the extra term ``gradnorm/grad_loss =
    L_grad - sg(L_grad)``: value 0 (the total is still ``sum_i w_i L_i``), gradient ``grad_w L_grad`` for the
    user's backward; :meth:`step` takes the Adam step on ``w`` and renormalises the weights of the parts present
    so that their sum is unchanged (so ``sum_i w_i = T`` over all parts, the paper's convention; factor 1).
    ``L_grad`` and the norms and targets are in ``info``. A batch with a single part present (nothing to
    balance, no shared layer to find) returns that part's current weight without a GradNorm update and is
    counted in ``info["gradnorm/single_part_batches"]``.

    Args:
        alpha: asymmetry (1.5, LibMTL's default; the paper tunes it per data set).
        lr: learning rate of the balancer's Adam on ``w`` (0.025, nash-mtl/FAMO's ``method_params_lr``).
        layer: the last shared layer, an ``nn.Module`` or its parameters. If ``None``, found from the autograd
            graph (:func:`lossport.graph.shared_parameters`): the first parameter reached by more than one part,
            counting from the output side, with two or more dimensions (a weight matrix).

    Cost: one backward per part from the part to ``W`` (through its head only) on top of the usual one. Under
    ``torch.no_grad()`` (validation) the weights are returned without any norm or update. A part whose graph
    does not reach ``W`` has gradient norm 0 there.
    """

    name = "gradnorm"

    def __init__(
        self, alpha: float = 1.5, lr: float = 0.025, layer: nn.Module | Iterable[Tensor] | None = None
    ) -> None:
        super().__init__(lr=lr, init=1.0)
        if not alpha >= 0:
            raise ValueError(f"GradNorm: alpha must be >= 0, not {alpha}")
        self.alpha = float(alpha)
        if isinstance(layer, nn.Module):
            self._layer: list[Tensor] | None = list(layer.parameters())
        else:
            self._layer = None if layer is None else list(layer)
        if self._layer is not None and not self._layer:
            raise ValueError("GradNorm: layer= has no parameters; give the last shared layer (module or tensors)")
        self._auto = layer is None
        self._initial: dict[str, float]
        self._present: list[str]
        self._single_part_batches: int  # batches with one part present: passed through, not balanced
        self.add_state("_initial", {})
        self.add_state("_present", [])
        self.add_state("_single_part_batches", 0)

    def _shared_layer(self, losses: Losses) -> list[Tensor]:
        if self._layer is not None:
            return self._layer
        from ..graph import shared_parameters

        shared = shared_parameters([losses.parts[k] for k in losses.parts])
        if not shared:
            raise ValueError(
                "GradNorm: no parameter is reached by more than one loss part, so there is no shared layer; "
                "give layer= (the last shared nn.Module or its parameters)"
            )
        chosen = next((t for t in shared if t.dim() >= 2), shared[0])
        self._layer = [chosen]
        return self._layer

    def balance(self, losses: Losses) -> dict[str, float] | tuple[dict[str, float], dict[str, Tensor]]:
        self._ensure(losses)
        names = losses.names
        b = dict(zip(names, self._current(names).tolist(), strict=True)) if names else {}
        trainable = all(losses.parts[k].requires_grad for k in names)
        if not torch.is_grad_enabled() or not trainable or not names:
            return b
        vals = dict(zip(names, _floats(losses), strict=True))
        for k, v in vals.items():
            _positive("GradNorm", k, v, "its training rates are ratios L_i / L_i(0)")
            self._initial.setdefault(k, v)
        if len(names) == 1:  # nothing to balance (e.g. a batch with one labelled part): its weight, no update
            self._single_part_batches += 1
            self._present = []
            self.info["gradnorm/single_part_batches"] = float(self._single_part_batches)
            return b
        layer = self._shared_layer(losses)
        rows = []
        for k in names:  # the part's gradient on W, flattened (zeros where its graph does not reach W)
            grads = torch.autograd.grad(losses.parts[k], layer, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).detach().reshape(-1)
                                   for g, p in zip(grads, layer, strict=True)]))  # fmt: skip
        # under torchrun: the gradients of the global parts (the mean of the ranks' surrogate gradients)
        J = distributed.all_reduce_jacobian(torch.stack(rows).to(torch.float64))
        norms: list[float] = []
        for i, k in enumerate(names):
            static = losses.weights[k]
            s = abs(float(static.detach()) if isinstance(static, Tensor) else float(static))
            norms.append(s * float(J[i].norm()))
        ratio = [vals[k] / self._initial[k] if self._initial[k] != 0 else 1.0 for k in names]
        mean_ratio = sum(ratio) / len(ratio)
        r = [x / mean_ratio if mean_ratio != 0 else 1.0 for x in ratio]
        w = self._vector(names)
        G = w * torch.tensor(norms, dtype=w.dtype, device=w.device)
        mean_G = float(G.detach().mean())
        target = torch.tensor([mean_G * ri**self.alpha for ri in r], dtype=w.dtype, device=w.device)
        l_grad = (G - target).abs().sum()
        self._present = list(names)
        self.info["gradnorm/grad_loss"] = float(l_grad.detach())
        for i, k in enumerate(names):
            self.info[f"gradnorm/norm/{k}"] = float(G[i].detach())
            self.info[f"gradnorm/target/{k}"] = float(target[i])
        return b, {"gradnorm/grad_loss": l_grad - l_grad.detach()}

    def _after_step(self) -> None:
        names = self._present
        if not names:
            return
        w = self._params_vector()
        present = torch.zeros(len(self._names), dtype=torch.bool, device=w.device)
        present[[self._index[k] for k in names]] = True
        with torch.no_grad():
            # the sum of the present parts' weights before the step: every weight is renormalised after each
            # step, and the absent parts' weights did not move, so it is T minus their sum
            total = len(self._names) - float(w[~present].sum())
            moved = w.clamp_min(1e-6)
            w.copy_(torch.where(present, moved * (total / moved[present].sum()), w))

    def __repr__(self) -> str:
        return f"GradNorm(alpha={self.alpha}, lr={self.lr})"
