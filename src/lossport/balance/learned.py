"""Learned balancers: weights with parameters of their own, trained by the balancer's own optimizer.

:class:`Uncertainty` (Kendall et al. 2018), :class:`IMTLL` (Liu et al. 2021), :class:`FAMO` (Liu et al. 2023) and
:class:`GradNorm` (Chen et al. 2018). Each keeps one scalar ``nn.Parameter`` per part, created at the first call
for every part of the objective (``losses.parts`` and ``losses.missing``), and an Adam optimizer over them with
the balancer's learning rate and no weight decay (FAMO: its regulariser ``gamma`` as Adam's weight decay, as in
the paper). The parameters are never given to the net's optimizer:

* UW, IMTL-L and GradNorm return terms that carry gradient to their parameters, so the user's
  ``losses.total.backward()`` fills their ``.grad``; :meth:`Balancer.step` then takes one Adam step and clears it.
* FAMO's logits get no gradient from the backward; :meth:`FAMO.step` computes their update from the losses
  re-evaluated on the same batch after the net's step.

Missing parts: a part absent from a batch gets no term, so its parameter receives no gradient and Adam skips it
(its value and Adam moments are unchanged).

Signs: UW and IMTL-L need finite losses ``>= 0`` (with a negative loss their objective is unbounded below in the
learned scale), GradNorm too (its training rates are loss ratios), FAMO losses above ``floor``; each raises an
error naming the part otherwise.

Device and dtype: the parameters are created on the device of the parts and in their dtype (at least float32:
half-precision parts give float32 parameters, as an optimizer needs); :meth:`LearnedBalancer.to` moves them
with Adam's state, and a call with parts on another device brings them there.

State (``state_dict``): the part names, the parameter values and dtype and the optimizer's state (deep-copied),
plus each method's own declared records; loading it into a fresh balancer gives the same subsequent weights.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .. import distributed
from ..result_types import Losses
from .base import Balancer, register
from .loss_level import _positive

L = TypeVar("L", bound="LearnedBalancer")


class LearnedBalancer(Balancer):
    """Base of the balancers with one learned scalar per part (see the module docstring)."""

    kind = "learned"

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
        self._params: dict[str, nn.Parameter] = {}
        self._opt: torch.optim.Adam | None = None

    # -- parameters ------------------------------------------------------------------------------------
    def _ensure(self, losses: Losses) -> None:
        if not self._params:
            names = list(losses.parts) + [k for k in losses.missing if k not in losses.parts]
            ref = next(iter(losses.parts.values()), None)
            device = ref.device if ref is not None else None
            dtype = self._dtype or (torch.promote_types(ref.dtype, torch.float32) if ref is not None else torch.float32)
            self._build(names, dict.fromkeys(names, self.init), device, dtype)
            return
        unknown = [k for k in losses.parts if k not in self._params]
        if unknown:
            raise ValueError(
                f"{type(self).__name__}: parts {unknown} were not in the objective when the balancer was "
                f"first called (parts {self._names}); use a fresh balancer for a different objective"
            )

    def _build(
        self, names: list[str], values: Mapping[str, Tensor | float], device: torch.device | None, dtype: torch.dtype
    ) -> None:
        self._names = list(names)
        self._params = {
            k: nn.Parameter(torch.as_tensor(values[k], dtype=dtype, device=device).detach().clone()) for k in names
        }
        self._opt = torch.optim.Adam([self._params[k] for k in names], lr=self.lr, weight_decay=self.weight_decay)
        self._fast_adam()

    def _fast_adam(self) -> None:
        """Adam's implementation (not its maths): fused (one kernel for the whole update) on the CPU and CUDA,
        else foreach; not torch's default Python loop over the scalars. Set again after loading Adam's state,
        whose param groups carry the flags of the run that saved it."""
        assert self._opt is not None
        fused = all(p.device.type in ("cpu", "cuda") for p in self._params.values())
        for group in self._opt.param_groups:
            group["fused"], group["foreach"] = (True, None) if fused else (None, True)

    def parameters(self) -> list[nn.Parameter]:
        return [self._params[k] for k in self._names]

    @property
    def values(self) -> dict[str, float]:
        """Current value of each part's learned parameter."""
        return {k: float(p.detach()) for k, p in self._params.items()}

    # -- protocol --------------------------------------------------------------------------------------
    def step(self, recompute: Callable[[], Losses] | None = None) -> None:
        """One Adam step on the parameters that received a gradient from the last backward; then clear it.

        A non-finite gradient (a mixed-precision step that the ``GradScaler`` skipped, for example) skips the
        step, as the scaler does for the net: the parameters and Adam's state are left unchanged."""
        if self._opt is None or all(p.grad is None for p in self._params.values()):
            return
        if not _finite([p.grad for p in self._params.values() if p.grad is not None]):
            for p in self._params.values():
                p.grad = None
            self.info["skipped_nonfinite_step"] = 1.0
            return
        self.info.pop("skipped_nonfinite_step", None)
        self._opt.step()
        for p in self._params.values():
            p.grad = None
        self._after_step()

    def _after_step(self) -> None:
        """Hook for projections after the Adam step (GradNorm's renormalisation)."""

    def state_dict(self) -> dict[str, Any]:
        """The declared state (header included), the part names, the parameters (detached copies: their
        values, dtype and device) and Adam's state."""
        return {
            **super().state_dict(),
            "names": list(self._names),
            "values": {k: p.detach().clone() for k, p in self._params.items()},
            "optimizer": copy.deepcopy(self._opt.state_dict()) if self._opt is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        missing = [k for k in ("names", "values", "optimizer") if k not in state]
        if missing:
            raise ValueError(f"this {type(self).__name__} state lacks {missing}: start the balancer afresh")
        if not state["names"]:
            self._names, self._params, self._opt = [], {}, None
            return
        ref = next(iter(state["values"].values()))
        device = self._device if self._device is not None else ref.device
        self._build(list(state["names"]), state["values"], device, ref.dtype)
        assert self._opt is not None
        if state["optimizer"] is not None:
            self._opt.load_state_dict(copy.deepcopy(state["optimizer"]))  # casts Adam's state to the parameters
            self._fast_adam()

    def to(self: L, device: torch.device | str | torch.dtype | None = None, dtype: torch.dtype | None = None) -> L:
        """Move the declared state, the parameters and Adam's state. The parameters are new ``nn.Parameter``
        objects afterwards (a move to ``meta`` cannot be made in place): ask :meth:`parameters` again."""
        super().to(device, dtype)
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        if not self._params:
            return self
        moved = {k: p.detach().to(device=device, dtype=dtype) for k, p in self._params.items()}
        grads = {k: p.grad for k, p in self._params.items()}
        adam = self._opt.state_dict() if self._opt is not None else None
        ref = next(iter(moved.values()))
        self._build(self._names, moved, ref.device, ref.dtype)
        for k, p in self._params.items():
            g = grads[k]
            p.grad = None if g is None else g.to(device=p.device, dtype=p.dtype)
        if adam is not None and self._opt is not None:
            self._opt.load_state_dict(adam)  # torch casts the moments to the parameters' device and dtype
            self._fast_adam()
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(lr={self.lr})"


def _finite(tensors: list[Tensor]) -> bool:
    """Whether every element of ``tensors`` (the scalars' gradients) is finite: one check per device and dtype, one
    host sync each."""
    groups: dict[tuple[torch.device, torch.dtype, bool], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype, t.dim() == 0), []).append(t)
    return all(
        bool(torch.isfinite(torch.stack(g) if scalar else torch.cat([t.reshape(-1) for t in g])).all())
        for (_, _, scalar), g in groups.items()
    )


def _values(method: str, losses: Losses) -> list[float]:
    """The parts' values as floats (one host sync), each checked finite and ``>= 0`` (:func:`_positive`)."""
    parts = [v.detach() for v in losses.parts.values()]
    same = len({(v.dtype, v.device) for v in parts}) == 1
    vals = (torch.stack(parts) if same else torch.stack([v.to(torch.float64) for v in parts])).tolist()
    for k, v in zip(losses.parts, vals, strict=True):
        _positive(method, k, v, _UNBOUNDED)
    return vals


def _stacked(params: Mapping[str, nn.Parameter], names: list[str]) -> Tensor:
    """The parameters of ``names`` as one vector (differentiable: one node in the graph instead of ``T``)."""
    return torch.stack([params[k] for k in names])


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

    def _c(self, part: str) -> float:
        return _FORMS[self.forms.get(part, self.forms.get("*", "regression"))]

    def balance(self, losses: Losses) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        self._ensure(losses)
        unknown = [k for k in self.forms if k != "*" and k not in self._params]
        if unknown:
            raise ValueError(f"Uncertainty: form given for {unknown}, which are not loss parts ({self._names})")
        names = list(losses.parts)
        if not names:
            return {}, {}
        _values("Uncertainty", losses)
        s = _stacked(self._params, names)
        c = torch.tensor([self._c(k) for k in names], dtype=s.dtype, device=s.device)
        weights = c * torch.exp(-s)
        b = dict(zip(names, weights.unbind(0), strict=True))
        reg = (0.5 * s).sum()
        for k, v in zip(names, weights.detach().tolist(), strict=True):
            self.info[f"uw/weight/{k}"] = v
        return b, {"uncertainty/log_var": reg}

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

    def balance(self, losses: Losses) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        self._ensure(losses)
        names = list(losses.parts)
        if not names:
            return {}, {}
        _values("IMTLL", losses)
        s = _stacked(self._params, names)
        weights = torch.exp(s)
        b = dict(zip(names, weights.unbind(0), strict=True))
        reg = -s.sum()
        for k, v in zip(names, weights.detach().tolist(), strict=True):
            self.info[f"imtl_l/weight/{k}"] = v
        return b, {"imtl_l/scale": reg}


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
        for k, v in losses.parts.items():
            d = float(v.detach()) - self._floor(k) + self.eps
            if math.isfinite(d) and not d > 0:  # a NaN or inf part is the caller's to report, not a floor problem
                raise ValueError(
                    f"FAMO: part {k!r} = {float(v.detach())} is not above its floor {self._floor(k)}; FAMO takes "
                    "log(L - floor): set floor= below the smallest value the loss can take"
                )
            out[k] = d
        return out

    def balance(self, losses: Losses) -> dict[str, float]:
        self._ensure(losses)
        D = self._D(losses)
        names = list(D)
        xi = torch.stack([self._params[k].detach() for k in names]).double()
        z = torch.softmax(xi, 0).tolist()
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
        if self._before is None or self._opt is None:
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
        params: list[Tensor] = [self._params[k] for k in names]
        delta = torch.tensor(
            [math.log(before[k]) - math.log(after[k]) for k in names], dtype=params[0].dtype, device=params[0].device
        )
        with torch.enable_grad():
            z = torch.softmax(torch.stack(params), 0)
            grads = torch.autograd.grad(z, params, grad_outputs=delta)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        self._opt.step()
        for p in params:
            p.grad = None

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
        b = {k: float(self._params[k].detach()) for k in names}
        trainable = all(losses.parts[k].requires_grad for k in names)
        if not torch.is_grad_enabled() or not trainable or not names:
            return b
        vals = {k: float(losses.parts[k].detach()) for k in names}
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
        w = torch.stack([self._params[k] for k in names])
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
        with torch.no_grad():
            # the sum of the present parts' weights before the step: every weight is renormalised after each
            # step, and the absent parts' weights did not move, so it is T minus their sum
            total = len(self._names) - sum(float(self._params[k]) for k in self._names if k not in names)
            for k in names:
                self._params[k].clamp_(min=1e-6)
            s = sum(float(self._params[k]) for k in names)
            for k in names:
                self._params[k].mul_(total / s)

    def __repr__(self) -> str:
        return f"GradNorm(alpha={self.alpha}, lr={self.lr})"
