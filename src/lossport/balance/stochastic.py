"""Gramian methods from the stochastic multi-objective optimisation literature, whose weights carry over from
step to step.

* :class:`CRMOGM` (Zhou et al., NeurIPS 2022): a moving average of the weights of any other Gramian method,
  which reduces the bias that stochastic gradients put into the weights of MGDA-like methods.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..result_types import Losses
from .base import register, resolve
from .gramian_base import GramianBalancer
from .surgery import _Surgery


@register("cr_mogm", "crmogm")
class CRMOGM(GramianBalancer):
    """CR-MOGM (Zhou, Zhang, Jiang, Chen, Tsang, Kwok, "On the Convergence of Stochastic Multi-Objective
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
        if not isinstance(inner, GramianBalancer) or isinstance(inner, _Surgery):
            raise TypeError(f"CRMOGM: base must be a method whose weights are a function of the Gramian, not {inner!r}")
        if inner.mode != "params" or inner.every != 1 or inner.params is not None:
            raise ValueError(
                f"CRMOGM: give the engine options (gramian=, features=, every=, params=) to CRMOGM, not to its base "
                f"{inner!r}; only the base's weigh is used"
            )
        self.base = inner
        self.alpha = alpha
        self._lambda: dict[str, float] = {}

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
        return torch.tensor(out, dtype=torch.float64)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "lambda": dict(self._lambda),
            "alpha": self.alpha,
            "base": self.base.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._lambda = {k: float(v) for k, v in state["lambda"].items()}
        self.alpha = float(state["alpha"])
        self.base.load_state_dict(state["base"])

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", base={self.base!r}, alpha={self.alpha})"


__all__ = ["CRMOGM"]
