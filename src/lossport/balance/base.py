"""The balancer protocol.

A balancer turns the unweighted loss parts of a batch into weights. It never needs the trainer: in a
hand-written loop it is three lines::

    losses = balancer(objective(net, batch))            # weights set, losses.total ready
    losses.total.backward(); optimizer.step(); optimizer.zero_grad()
    balancer.step(lambda: objective(net, batch))        # own parameters, FAMO's post-step update

Weight convention (all methods): the balancer's weight ``b_i`` multiplies the static weight ``s_i`` of the
spec (``weights=`` times ``Scaled``), so the applied weight is ``w_i = s_i * b_i`` and the total is
``sum_i w_i L_i + extra``. Equal weighting is ``b = 1`` (the plain sum of the parts, as Keras and LibMTL's EW);
methods that produce normalised weights scale them to ``sum_i b_i = T`` (the number of parts present in the
batch). Each method's docstring states the factor that maps its weights to its paper's convention.

State: everything a balancer carries between steps (EMA statistics, loss histories, learned parameters and
the state of their own optimizer, solver warm starts, random generators) goes into ``state_dict()`` as plain
tensors, numbers and lists, and comes back unchanged through ``load_state_dict()``.

Learned parameters (uncertainty weighting's log-variances, GradNorm's weights, ...) are trained by the
balancer's own optimizer, with the balancer's own learning rate and no weight decay, stepped in ``step()``;
they are never handed to the net's optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..result_types import Losses

_REGISTRY: dict[str, type[Balancer]] = {}


def register(*names: str) -> Callable[[type[Balancer]], type[Balancer]]:
    """Class decorator: make a balancer available as ``balance="name"`` under each of ``names``."""

    def deco(cls: type[Balancer]) -> type[Balancer]:
        for n in names:
            key = n.lower()
            if key in _REGISTRY and _REGISTRY[key] is not cls:
                raise RuntimeError(f"balancer name {n!r} registered twice")
            _REGISTRY[key] = cls
        return cls

    return deco


def available() -> list[str]:
    """The names accepted by :func:`resolve`."""
    return sorted(_REGISTRY)


def resolve(spec: str | Balancer | None, **kwargs: Any) -> Balancer | None:
    """A balancer from a name (``"uw"``, ``"famo"``, ...), an instance, or ``None`` (static weights)."""
    if spec is None or isinstance(spec, Balancer):
        if kwargs:
            raise TypeError("keyword arguments are only accepted with a balancer given by name")
        return spec
    if isinstance(spec, str):
        key = spec.lower().replace("-", "_")
        if key not in _REGISTRY:
            raise ValueError(f"unknown balancer {spec!r}; available: {', '.join(available())}")
        return _REGISTRY[key](**kwargs)
    raise TypeError(f"balance must be a name, a Balancer or None, not {type(spec).__name__}")


class Balancer:
    """Base class of every balancing method (see the module docstring for the protocol)."""

    name: ClassVar[str] = "balancer"
    needs_recompute: ClassVar[bool] = False
    """True when :meth:`step` needs the ``recompute`` closure (FAMO's extra no-grad forward)."""

    def __init__(self) -> None:
        self.info: dict[str, float] = {}
        """Diagnostics of the last call (norms, cosines, solver residuals), reported in the history."""

    # -- the one method a subclass must write ---------------------------------------------------------
    def balance(
        self, losses: Losses
    ) -> Mapping[str, Tensor | float] | tuple[Mapping[str, Tensor | float], Mapping[str, Tensor]]:
        """Balancer weights ``b_i`` by part name, optionally with extra terms for the total.

        Return either ``{part: b}`` or ``({part: b}, {extra_name: term})``. Weights may be tensors; they are
        detached unless the method trains through them (then the subclass says so).
        """
        raise NotImplementedError

    # -- protocol ----------------------------------------------------------------------------------------
    def __call__(self, losses: Losses) -> Losses:
        """``losses`` with the applied weights ``s_i * b_i`` and the recomputed total."""
        out = self.balance(losses)
        if isinstance(out, tuple):
            b, extra = out
        else:
            b, extra = out, {}
        unknown = [k for k in b if k not in losses.parts]
        absent = [k for k in losses.parts if k not in b]
        if unknown or absent:
            raise RuntimeError(f"{type(self).__name__} returned weights for {sorted(b)}, parts are {losses.names}")
        weights = {k: _mul(losses.weights[k], b[k]) for k in losses.parts}
        return losses.reweighted(weights, extra)

    def attach(self, net: torch.nn.Module) -> None:
        """Called by :class:`~lossport.Objective` with the (unwrapped) net before the first forward it runs with
        this balancer; methods that record activations (the Gramian engine) place their hooks here."""

    def parameters(self) -> list[torch.nn.Parameter]:
        """Learned parameters of the method (empty for most); trained by the balancer itself in :meth:`step`."""
        return []

    def step(self, recompute: Callable[[], Losses] | None = None) -> None:
        """Called once after each optimizer step of the net. ``recompute`` evaluates the objective again on
        the same batch (only methods with ``needs_recompute`` use it)."""

    def end_round(self, round_means: Mapping[str, float]) -> None:
        """Called at the end of each round (epoch) with the mean unweighted value of each part."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this balancer is; plain tensors and numbers."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` gave."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _mul(static: Tensor | float, b: Tensor | float) -> Tensor | float:
    if isinstance(static, (int, float)) and float(static) == 1.0:
        return b
    return static * b
