"""The balancer protocol.

A balancer turns the unweighted loss parts of a batch into weights. It never needs the trainer: in a
hand-written loop it is three lines::

    losses = balancer(objective(net, batch))            # weights set, losses.total ready
    losses.total.backward(); optimizer.step(); optimizer.zero_grad()
    balancer.step(lambda: objective(net, batch))        # own parameters, FAMO's post-step update

What a method needs per step, besides the batch, is declared on its class (instances may override it):

* ``batches`` (default 1): the number of *independent* training batches per step. The main batch is the one
  whose weighted total is backpropagated; ``batches - 1`` more come in a :class:`Context` as closures that
  evaluate the objective (with gradients) on other batches drawn independently from the training data
  (SDMGrad and MoDo: ``batches = 3``, the cross matrix ``J_1 J_2^T`` of two of them)::

      ev = objective.evaluate                            # the unbalanced parts, with gradients
      b2, b3 = next(extra_a), next(extra_b)              # independent draws (other shuffles of the data)
      ctx = Context(extra=(lambda: ev(net, b2), lambda: ev(net, b3)))
      losses = balancer(ev(net, batch), ctx)
      losses.total.backward(); optimizer.step(); optimizer.zero_grad()

* ``meta`` (default ``False``): the method is bilevel and needs a meta batch (Auto-Lambda, MOML): ``Context.meta``
  evaluates the objective on it, ``Context.train`` evaluates it again on the main batch (at whatever parameters
  the net holds when called: the finite-difference look-ahead moves them and puts them back), and
  ``Context.optimizer`` is the net's optimizer (its learning rate, momentum and weight decay define the
  look-ahead step ``theta' = theta - lr * (grad + ...)``)::

      m = next(meta_batches)                             # Auto-Lambda's code: another shuffle of the training data
      ctx = Context(meta=lambda: ev(net, m), train=lambda: ev(net, batch), optimizer=optimizer)
      losses = balancer(ev(net, batch), ctx)             # MOML also takes one extra batch: Context(extra=..., meta=...)
      losses.total.backward(); optimizer.step(); optimizer.zero_grad()

A balancer that needs a context and gets none (or too few extra batches, or no meta batch) raises a
``ValueError`` at its call, before any backward. :func:`lossport.train` provides everything: the extra batches
and (by default) the meta batch from independent shuffles of the training data, with their random generators
in the checkpoint (``meta_data=`` gives the meta batches another source).

Weight convention (all methods): the balancer's weight ``b_i`` multiplies the static weight ``s_i`` of the
spec (``weights=`` times ``Scaled``), so the applied weight is ``w_i = s_i * b_i`` and the total is
``sum_i w_i L_i + extra``. Equal weighting is ``b = 1`` (the plain sum of the parts, as Keras and LibMTL's EW);
methods that produce normalised weights scale them to ``sum_i b_i = T`` (the number of parts present in the
batch). Each method's docstring states the factor that maps its weights to its paper's convention.

State, declared once (in the spirit of torchmetrics' ``add_state``): a balancer declares each attribute it
carries between steps with ``self.add_state(name, initial value)`` (EMA statistics, loss histories, solver warm
starts, random generators). From the declarations follow

* ``state_dict()``: ``{"balancer": <registered name or class name>, "version": <state format>, <name without
  leading underscore>: <copy of the value>, ...}``; tensors are copied, a ``torch.Generator`` is saved as its
  state;
* ``load_state_dict(state)``: refuses, with a ``ValueError`` naming both methods, a state written by another
  balancer (FAMO's state into Uncertainty), by another version of the state format, or without the header;
  tensors are placed on the balancer's device;
* ``to(device, dtype)``: moves every tensor of the state (casting the floating ones to ``dtype``). At each call
  the balancer also follows the parts: state tensors move, lazily, to the device of the parts they are
  weighing. Every tensor a balancer creates takes the device (and floating dtype) of its inputs. Random
  generators are host (CPU) generators: the draws they make decide orders and weights on the host, so a seed
  gives the same run on every device and their state loads anywhere.

Learned parameters (uncertainty weighting's log-variances, GradNorm's weights, ...) are trained by the
balancer's own optimizer, with the balancer's own learning rate and no weight decay, stepped in ``step()``;
they are never handed to the net's optimizer. Their state is written by hand
(:class:`~lossport.balance.learned.LearnedBalancer`), on top of the declared one.

Kinds: each registered class has a ``kind`` from :data:`KINDS`: ``"static"`` (fixed weights), ``"loss"`` (from
loss values and their history), ``"learned"`` (parameters trained by the balancer), ``"gramian"`` (a function of
the Gramian of the parts' gradients), ``"surgery"`` (edits the gradients themselves). Code outside
``lossport.balance`` selects methods by kind (:func:`suggest`), never by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from ..result_types import Losses

KINDS = ("static", "loss", "learned", "gramian", "surgery")
"""The closed set of balancer kinds (see the module docstring)."""

PREFERENCE = ("normalize", "uw", "famo", "dwa", "gradnorm", "upgrad", "mgda", "pcgrad", "cagrad", "nash_mtl")
"""The methods suggested first, in this order, when advice names methods of a kind (:func:`suggest`)."""

_REGISTRY: dict[str, type[Balancer]] = {}
_CANONICAL: dict[type[Balancer], str] = {}

B = TypeVar("B", bound="Balancer")


def register(*names: str) -> Callable[[type[B]], type[B]]:
    """Class decorator: make a balancer available as ``balance="name"`` under each of ``names``; the first is
    its canonical name (listed by :func:`available`, written in its state). The class needs a ``kind`` from
    :data:`KINDS`."""

    def deco(cls: type[B]) -> type[B]:
        if getattr(cls, "kind", None) not in KINDS:
            raise TypeError(
                f"{cls.__name__} has kind {getattr(cls, 'kind', None)!r}; give the class kind = one of {KINDS}"
            )
        for n in names:
            key = n.lower()
            if key in _REGISTRY and _REGISTRY[key] is not cls:
                raise RuntimeError(f"balancer name {n!r} registered twice")
            _REGISTRY[key] = cls
        if names:
            _CANONICAL.setdefault(cls, names[0].lower())
        return cls

    return deco


def available() -> list[str]:
    """Each registered method once, by its canonical name (:func:`resolve` also accepts the aliases)."""
    return sorted(set(_CANONICAL.values()))


def aliases() -> list[str]:
    """Every name :func:`resolve` accepts (canonical names and aliases)."""
    return sorted(_REGISTRY)


def kind_of(name: str) -> str:
    """The kind of the registered method ``name`` (a canonical name or an alias)."""
    key = name.lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ValueError(f"unknown balancer {name!r}; available: {', '.join(available())}")
    return _REGISTRY[key].kind


def suggest(kinds: Iterable[str], among: Iterable[str] | None = None) -> list[str]:
    """Canonical names of the registered methods of the given ``kinds``: those of :data:`PREFERENCE` first, in
    its order, then the others alphabetically. With ``among``, only the names it holds."""
    wanted = set(kinds)
    bad = wanted - set(KINDS)
    if bad:
        raise ValueError(f"unknown balancer kinds {sorted(bad)}; the kinds are {KINDS}")
    names = [n for n in available() if _REGISTRY[n].kind in wanted]
    if among is not None:
        allowed = set(among)
        names = [n for n in names if n in allowed]
    first = [n for n in PREFERENCE if n in names]
    return first + [n for n in names if n not in first]


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


@dataclass(frozen=True)
class Context:
    """What a balancer that declares ``batches > 1`` or ``meta`` receives with its call (module docstring).

    :param extra: one closure per extra independent training batch; each evaluates the objective (unbalanced
        parts, gradients enabled, static weights) on its batch at the net's current parameters.
    :param meta: evaluates the objective on the meta batch (bilevel methods).
    :param train: evaluates the objective again on the main batch (bilevel methods' finite differences).
    :param optimizer: the net's optimizer (bilevel methods' look-ahead step; its parameters are the net's).
    """

    extra: tuple[Callable[[], Losses], ...] = ()
    meta: Callable[[], Losses] | None = None
    train: Callable[[], Losses] | None = None
    optimizer: torch.optim.Optimizer | None = None

    @classmethod
    def of(
        cls,
        evaluate: Callable[[Any], Losses],
        batch: Any,
        extra: Iterable[Any] = (),
        meta: Any = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> Context:
        """The context whose closures call ``evaluate`` on each extra batch, on the meta batch (``None``: no
        meta batch) and on the main ``batch``."""

        def on(data: Any) -> Callable[[], Losses]:
            return lambda: evaluate(data)

        return cls(
            extra=tuple(on(x) for x in extra),
            meta=None if meta is None else on(meta),
            train=on(batch),
            optimizer=optimizer,
        )


class Balancer:
    """Base class of every balancing method (see the module docstring for the protocol and the state)."""

    name: ClassVar[str] = "balancer"
    kind: ClassVar[str]
    """One of :data:`KINDS`; required of registered classes."""
    version: ClassVar[int] = 1
    """Version of the state format; bump it when the meaning or the keys of the state change."""
    needs_recompute: ClassVar[bool] = False
    """True when :meth:`step` needs the ``recompute`` closure (FAMO's extra no-grad forward)."""
    batches: int = 1
    """Independent training batches the method uses per step (the main one included); ``batches - 1`` come in
    :attr:`Context.extra`."""
    meta: bool = False
    """True for bilevel methods: each call needs :attr:`Context.meta`, ``train`` and ``optimizer``."""
    context: Context | None = None
    """The :class:`Context` of the call in progress (``None`` outside a call or when none was given)."""

    _device: torch.device | None = None
    """The device the state lives on (``None`` until the first call or :meth:`to`)."""

    @property
    def needs_context(self) -> bool:
        """Whether each call needs a :class:`Context` (``batches > 1`` or ``meta``)."""
        return self.batches > 1 or self.meta

    _dtype: torch.dtype | None = None
    """The floating dtype asked for by :meth:`to` (``None``: the parts'), also for state created later."""

    def __init__(self) -> None:
        self.info: dict[str, float] = {}
        """Diagnostics of the last call (norms, cosines, solver residuals), reported in the history."""
        self._state_names: list[str] = []

    # -- the one method a subclass must write ---------------------------------------------------------
    def balance(
        self, losses: Losses
    ) -> Mapping[str, Tensor | float] | Tensor | tuple[Mapping[str, Tensor | float] | Tensor, Mapping[str, Tensor]]:
        """Balancer weights ``b_i`` by part name, optionally with extra terms for the total.

        Return either ``{part: b}`` or ``({part: b}, {extra_name: term})``. Weights may be tensors; they are
        detached unless the method trains through them (then the subclass says so). The weights may also come
        as one vector over ``losses.names`` (in that order): the way for weights attached to the method's own
        parameters (one node in the graph instead of ``T``).
        """
        raise NotImplementedError

    # -- protocol ----------------------------------------------------------------------------------------
    def __call__(self, losses: Losses, context: Context | None = None) -> Losses:
        """``losses`` with the applied weights ``s_i * b_i`` and the recomputed total. ``context`` carries the
        extra batches and the meta batch a method declares it needs (module docstring)."""
        self.check_context(context)
        self.follow(losses)
        self.context = context
        try:
            out = self.balance(losses)
        finally:
            self.context = None
        if isinstance(out, tuple):
            b, extra = out
        else:
            b, extra = out, {}
        if isinstance(b, Tensor):
            return self._apply_vector(losses, b, extra)
        if b.keys() != losses.parts.keys():
            raise RuntimeError(f"{type(self).__name__} returned weights for {sorted(b)}, parts are {losses.names}")
        weights = {k: _mul(losses.weights[k], b[k]) for k in losses.parts}
        return losses.reweighted(weights, extra)

    def _apply_vector(self, losses: Losses, b: Tensor, extra: Mapping[str, Tensor]) -> Losses:
        """``losses`` weighted by ``b``, the balancer weights of ``losses.names`` as one vector: the applied
        weights ``s_i b_i`` as numbers in ``weights`` and as one tensor in the total (gradient to ``b``)."""
        names = losses.names
        if b.shape != (len(names),):
            raise RuntimeError(f"{type(self).__name__} returned {tuple(b.shape)} weights, parts are {names}")
        static = [losses.weights[k] for k in names]
        if not all(isinstance(s, (int, float)) for s in static):  # tensor static weights: the general way
            return losses.reweighted({k: _mul(s, w) for k, s, w in zip(names, static, b.unbind(0))}, extra)
        if any(float(s) != 1.0 for s in static):
            b = b * torch.tensor(static, dtype=b.dtype, device=b.device)
        return losses.reweighted(dict(zip(names, b.detach().tolist())), extra, vector=b)

    def check_context(self, context: Context | None) -> None:
        """``ValueError`` unless ``context`` holds what this method declared it needs (``batches``, ``meta``)."""
        mine = type(self).__name__
        if context is not None and not isinstance(context, Context):
            raise TypeError(f"{mine}: context must be a lossport.balance.Context, not {type(context).__name__}")
        have = 0 if context is None else len(context.extra)
        if self.batches > 1 and have < self.batches - 1:
            raise ValueError(
                f"{mine} uses {self.batches} independent training batches per step and got {have} extra: call it as "
                f"balancer(losses, Context(extra=(...))) with {self.batches - 1} closures evaluating the objective "
                "on other batches drawn independently from the training data (lossport.train does this), or "
                "build it with batches=1 where the method offers it"
            )
        if self.meta:
            lacks = [k for k in ("meta", "train", "optimizer") if context is None or getattr(context, k) is None]
            if lacks:
                raise ValueError(
                    f"{mine} is bilevel: each call needs Context(meta=..., train=..., optimizer=...) (the objective "
                    f"on a meta batch, on the main batch again, and the net's optimizer); {lacks} missing. "
                    "lossport.train provides them (meta batches from another shuffle of the training data, or "
                    "meta_data=)"
                )

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

    # -- state -------------------------------------------------------------------------------------------
    def add_state(self, name: str, default: Any) -> None:
        """Declare the attribute ``name`` as state and set it to ``default``: it goes into :meth:`state_dict`
        (under ``name`` without its leading underscores), comes back through :meth:`load_state_dict`, and its
        tensors follow :meth:`to` and the parts' device. Values: numbers, strings, ``None``, tensors, a
        ``torch.Generator``, and lists and dicts of these."""
        names = self.__dict__.setdefault("_state_names", [])
        key = name.lstrip("_")
        if key in ("balancer", "version") or key in {n.lstrip("_") for n in names}:
            raise ValueError(f"{type(self).__name__}: state {name!r} declared twice or under a reserved key")
        names.append(name)
        setattr(self, name, default)

    def state_name(self) -> str:
        """The method's name in its state: the canonical registered name, or the class name."""
        return _CANONICAL.get(type(self), type(self).__name__)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this balancer is, under a header naming the method and
        the state format's version."""
        out: dict[str, Any] = {"balancer": self.state_name(), "version": self.version}
        for n in self.__dict__.get("_state_names", ()):
            out[n.lstrip("_")] = _export(getattr(self, n))
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` gave; refuses another method's state (see :meth:`check_state`)."""
        self.check_state(state)
        names = self.__dict__.get("_state_names", ())
        missing = [n.lstrip("_") for n in names if n.lstrip("_") not in state]
        if missing:
            raise ValueError(
                f"this {type(self).__name__} state lacks {missing} (it has {sorted(state)}); it was not written "
                "by state_dict() of this balancer: start it afresh"
            )
        for n in names:
            setattr(self, n, _import(getattr(self, n), state[n.lstrip("_")], self._device))

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Raise a ``ValueError`` unless ``state`` is this method's state, in this state format's version."""
        mine = type(self).__name__
        if not isinstance(state, Mapping) or "balancer" not in state:
            keys = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(
                f"this balancer state ({keys}) does not say which balancer wrote it (no 'balancer' entry); the "
                f"run uses {mine}: start the balancer afresh"
            )
        theirs = state["balancer"]
        if theirs != self.state_name():
            known = _REGISTRY.get(str(theirs).lower())
            how = f"balance={theirs!r}" if known is not None else f"a {theirs} balancer"
            raise ValueError(
                f"this checkpoint's balancer state is {known.__name__ if known else theirs}'s; the run uses "
                f"{mine}: resume with {how} or start afresh"
            )
        if state.get("version") != self.version:
            raise ValueError(
                f"this checkpoint's {mine} state has format version {state.get('version')!r}; this lossport "
                f"reads version {self.version}: start the balancer afresh"
            )

    def to(self: B, device: torch.device | str | torch.dtype | None = None, dtype: torch.dtype | None = None) -> B:
        """Move every tensor of the state to ``device`` and cast its floating tensors to ``dtype`` (either may
        be omitted; ``to(torch.float64)`` casts only); state created later (learned parameters at the first
        call) takes that ``dtype`` too. Returns the balancer."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        dev = None if device is None else torch.device(device)
        for n in self.__dict__.get("_state_names", ()):
            setattr(self, n, _move(getattr(self, n), dev, dtype))
        if dev is not None:
            self._device = dev
        if dtype is not None:
            self._dtype = dtype
        return self

    def follow(self, losses: Losses) -> None:
        """Move the state to the device of the parts being weighed, if it is elsewhere (called by
        :meth:`__call__`)."""
        ref = next(iter(losses.parts.values()), None)
        if ref is not None and ref.device != self._device:
            self.to(ref.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _export(v: Any) -> Any:
    """A copy of a state value for :meth:`Balancer.state_dict` (a generator as its state)."""
    if isinstance(v, torch.Generator):
        return v.get_state()
    if isinstance(v, Tensor):
        return v.detach().clone()
    if isinstance(v, dict):
        return {k: _export(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_export(x) for x in v)
    return v


def _import(current: Any, saved: Any, device: torch.device | None) -> Any:
    """The value of a state attribute after loading ``saved``: a generator takes the saved state; tensors are
    copied onto ``device`` (where the balancer's state lives) when it is known."""
    if isinstance(current, torch.Generator):
        current.set_state(saved.to("cpu"))
        return current
    if isinstance(saved, Tensor):
        return saved.detach().clone() if device is None else saved.detach().to(device, copy=True)
    if isinstance(saved, Mapping):
        return {k: _import(None, x, device) for k, x in saved.items()}
    if isinstance(saved, (list, tuple)):
        return type(saved)(_import(None, x, device) for x in saved)
    return saved


def _move(v: Any, device: torch.device | None, dtype: torch.dtype | None) -> Any:
    """``v`` with its tensors on ``device`` and its floating tensors in ``dtype`` (generators stay: host RNGs)."""
    if isinstance(v, Tensor):
        return v.to(device=device, dtype=dtype if v.is_floating_point() else None)
    if isinstance(v, dict):
        return {k: _move(x, device, dtype) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_move(x, device, dtype) for x in v)
    return v


def _mul(static: Tensor | float, b: Tensor | float) -> Tensor | float:
    if isinstance(static, (int, float)) and float(static) == 1.0:
        return b
    return static * b
