"""Base of the gradient-level balancers: weights from the Gramian of the parts' gradients.

``GramianBalancer.balance(losses)`` computes ``G`` (``T x T``, float64) of the parts present in the batch with
:mod:`lossport.gramian`, turns it into weights with the method's ``weigh(G, losses)``, and the update is then
one ordinary backward of ``sum_i w_i L_i``. So the shared parameters receive ``J^T w`` and every head receives
its own part's gradient times ``w_i`` (the "weighted-loss" convention, in every method; LibMTL gives the heads
unweighted gradients in some methods and weighted ones in others).

Modes:

* ``gramian="params"`` (exact): ``G`` of the gradients on the shared parameters — those reached by more than
  one part (:func:`lossport.graph.shared_parameters`), or ``params=`` given.
* ``gramian="features"``: ``G`` of the gradients with respect to a shared representation ``z`` (MGDA-UB,
  Sener & Koltun 2018): ``features`` names an output of the net (``losses.outputs[name]``) or is the
  ``nn.Module`` that computes ``z`` (a forward hook on it keeps its last output). ``T`` backward passes through
  the heads only, instead of through the trunk.
* ``every=K``: recompute ``G`` and the weights every ``K`` calls and reuse the last weights in between.

Under ``torchrun`` the Gramian is that of the global batch (:mod:`lossport.distributed`): the local
Jacobian is all-reduced in params mode, the local Gramian in features mode.

Diagnostics of the last computation are in ``info``: ``norm/<part>`` (gradient norms) and ``cos/<a>/<b>``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed
from ..gramian import feature_gramian, gramian, jacobian
from ..graph import shared_parameters
from ..result_types import Losses
from .base import Balancer

_MODES = ("params", "features")


class GramianBalancer(Balancer):
    """Base of every method whose weights are a function of the Gramian (see the module docstring)."""

    def __init__(
        self,
        *,
        gramian: str = "params",
        features: str | nn.Module | None = None,
        every: int = 1,
        params: Iterable[Tensor] | None = None,
    ) -> None:
        super().__init__()
        if gramian not in _MODES:
            raise ValueError(f"gramian must be one of {_MODES}, not {gramian!r}")
        if gramian == "features" and features is None:
            raise ValueError(
                "gramian='features' needs features=: the name of the net output that is the shared "
                "representation, or the nn.Module that computes it"
            )
        if gramian == "params" and features is not None:
            raise ValueError("features= is only used with gramian='features'")
        if int(every) < 1:
            raise ValueError(f"every must be a positive integer, not {every!r}")
        self.mode = gramian
        self.every = int(every)
        self.params = None if params is None else list(params)
        self.features = features
        self._calls = 0
        self._last: dict[str, float] | None = None
        self._feature_value: Tensor | None = None
        self._hook = None
        if isinstance(features, nn.Module):
            me = weakref.ref(self)

            def hook(module: nn.Module, args: tuple, out: Any) -> None:
                obj = me()
                if obj is not None and isinstance(out, Tensor):
                    obj._feature_value = out

            self._hook = features.register_forward_hook(hook)

    # ------------------------------------------------------------------------------------------------
    def weigh(self, G: Tensor, losses: Losses) -> Tensor:
        """Weights ``b`` (``T``) in the lossport convention from the Gramian ``G`` of the present parts."""
        raise NotImplementedError

    def compute_gramian(self, losses: Losses) -> Tensor:
        """``G`` of the parts present in ``losses`` (global under torchrun), float64."""
        parts = [losses.parts[k] for k in losses.names]
        if self.mode == "features":
            z = self._representation(losses)
            G = feature_gramian(parts, z)
            return distributed.all_reduce_gramian(G)
        params = shared_parameters(parts, self.params) if self.params is not None else shared_parameters(parts)
        if not params:
            raise ValueError(
                f"{type(self).__name__}: no parameter is reached by more than one of the parts {losses.names}; "
                "the parts share nothing, so there is nothing to balance (give params= to choose them)"
            )
        if distributed.is_distributed():
            J = distributed.all_reduce_jacobian(jacobian(parts, params).to(torch.float64))
            return J @ J.T
        return gramian(parts, params)

    def _representation(self, losses: Losses) -> Tensor:
        if isinstance(self.features, str):
            outs = losses.outputs or {}
            if self.features not in outs:
                raise ValueError(
                    f"features={self.features!r} is not an output of the net (outputs: {sorted(outs)}); return the "
                    "shared representation as an output or give the module that computes it"
                )
            return outs[self.features]
        if self._feature_value is None:
            raise ValueError("features module has not run in the forward of this batch")
        return self._feature_value

    def balance(self, losses: Losses) -> dict[str, Tensor | float]:
        names = losses.names
        recompute = self._last is None or self._calls % self.every == 0 or any(k not in self._last for k in names)
        self._calls += 1
        if recompute:
            if len(names) == 1:
                self._last = {names[0]: 1.0}
            else:
                G = self.compute_gramian(losses)
                w = self.weigh(G, losses).detach().to(torch.float64)
                if not bool(torch.isfinite(w).all()):
                    raise FloatingPointError(
                        f"{type(self).__name__}: non-finite weights {w.tolist()} from G {G.tolist()}"
                    )
                self._last = {k: float(w[i]) for i, k in enumerate(names)}
                self._record(G, names)
        assert self._last is not None
        return {k: self._last[k] for k in names}

    def _record(self, G: Tensor, names: list[str]) -> None:
        d = G.diagonal().clamp_min(0).sqrt()
        info: dict[str, float] = {f"norm/{k}": float(d[i]) for i, k in enumerate(names)}
        for i, a in enumerate(names):
            for j in range(i + 1, len(names)):
                den = float(d[i] * d[j])
                info[f"cos/{a}/{names[j]}"] = float(G[i, j]) / den if den > 0 else float("nan")
        self.info = info

    # ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"calls": self._calls, "last": None if self._last is None else dict(self._last)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._calls = int(state["calls"])
        self._last = None if state["last"] is None else dict(state["last"])

    def close(self) -> None:
        """Remove the forward hook placed on a ``features`` module."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __repr__(self) -> str:
        extra = f", features={self.features!r}" if self.mode == "features" else ""
        every = f", every={self.every}" if self.every != 1 else ""
        return f"{type(self).__name__}(gramian={self.mode!r}{extra}{every})"


def normalized(w: Tensor, T: int) -> Tensor:
    """``w`` scaled to sum to ``T`` (the lossport convention for normalised weights)."""
    s = w.sum()
    return w * (T / s) if float(s.abs()) > 1e-300 else torch.ones_like(w)


__all__ = ["GramianBalancer", "normalized"]
