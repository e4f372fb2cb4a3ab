"""Base of the gradient-level balancers: weights from the Gramian of the parts' gradients.

``GramianBalancer.balance(losses)`` computes ``G`` (``T x T``, float64) of the parts present in the batch with
:mod:`lossport.gramian` (``G[i, j] = <g_i, g_j>``, ``g_i`` the gradient of part ``i``, rows in ``losses.names``
order), turns it into weights with the method's ``weigh(G, losses)``, and the update is then **one ordinary
backward of** ``sum_i w_i L_i`` (``w_i = s_i b_i``, see :mod:`lossport.balance.base`). So the shared parameters
receive ``J^T w`` and **every head receives its own part's gradient times** ``w_i``, in every method (LibMTL gives
the heads unweighted gradients in some methods and weighted ones in others). A method's ``weigh`` sees the
Gramian of the *unweighted* parts ``L_i``; the static weights ``s_i`` multiply its output.

Modes (any method works in any mode):

* ``gramian="params"`` (exact): ``G`` of the gradients on the shared parameters, those reached by more than
  one part (:func:`lossport.graph.shared_parameters`), or ``params=`` given. Computed layer by layer without
  the ``T x P`` Jacobian (:func:`lossport.gramian.gramian`); costs about ``T`` input-gradient backward passes
  through the trunk.
* ``gramian="features"``: ``G`` of the gradients with respect to a shared representation ``z`` (MGDA-UB,
  Sener & Koltun 2018, section 3.3): backward passes through the heads only, not the trunk. ``features`` is
  either the name of a net output (``losses.outputs[name]``; the net returns ``z`` as one of its outputs) or the
  ``nn.Module`` whose forward output is ``z`` (a tensor, a dict or list of tensors such as an FPN's levels, whose
  gradients are concatenated, or a tuple's first tensor): a forward hook, placed when the balancer is built, records
  that module's outputs during each gradient-enabled forward (all of them if it runs several times, e.g. on several
  inputs: ``G`` is then that of the concatenated gradients), and :meth:`balance` consumes and drops the records,
  so no graph is kept alive between steps. :meth:`close` removes the hook. When the module did not run, the error
  lists the net's modules (two levels down) that did.
* ``every=K``: recompute ``G`` and the weights on calls ``0, K, 2K, ...`` and reuse the last weights in
  between (also recomputed whenever the set of parts present changes). ``every=10`` with ``features`` costs
  about one sum-backward per step.

Diagnostics of the last computation are in ``info``: ``norm/<part>`` (``sqrt(G_ii)``) and ``cos/<a>/<b>``
(``G_ab / sqrt(G_aa G_bb)``) for up to :data:`PAIR_COSINES_UP_TO` parts, above that the cosines' summary
(``cos/mean``, ``cos/min``, ``cos/max``, ``cos/conflicting``), kept until the next recomputation; the Gramian
itself is ``last_gramian`` (every pairwise cosine, on demand).

Approximations for many parts (opt-in, :mod:`lossport.balance.approx`): ``subset=k`` weighs a random subset
of ``k`` parts per computation (the others get the subset's mean weight), ``sketch=d`` (``params`` mode, ``d``
at least the number of parts) sketches the gradients to ``d`` random directions; both draw from a seeded host
generator kept in the state.

Under ``torchrun`` (:mod:`lossport.distributed`) the Gramian is that of the global batch: the local Jacobian is
all-reduced in params mode (``T x P`` numbers: the cross-rank products ``J_r J_q^T`` are needed), the local
Gramian in features mode (``T^2`` numbers: each rank's examples have their own representation rows).

Subclasses write :meth:`weigh`; those needing the gradients themselves (GradDrop, DB-MTL:
:mod:`lossport.balance.surgery`) call :meth:`compute_jacobian` and replace :meth:`run` and :meth:`between`:
:meth:`balance` is the template of both families (the ``every=K`` schedule, single-part batches, a failed call
that neither counts nor changes the state, the hook's records dropped). A subclass declares its own state with
:meth:`~lossport.balance.base.Balancer.add_state` (warm starts, random generators, EMA targets).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed
from ..gramian import batched_grads, check_reached, feature_gramian, gramian, jacobian
from ..graph import shared_parameters
from ..result_types import Losses
from .approx import check_options, restrict, sketch_jacobian, subset_indices
from .base import Balancer

_MODES = ("params", "features")


def gram64(Y: Tensor, chunk: int = 1 << 13) -> Tensor:
    """``Y Y^T`` in float64 for a ``T x P`` ``Y`` of any float dtype, casting ``chunk`` columns at a time (no float64
    copy of ``Y``: the chunks stay in cache); equal to ``Y.double() @ Y.double().T`` up to the order of the float64
    sums."""
    if Y.dtype == torch.float64:
        return Y @ Y.T
    out = torch.zeros(Y.shape[0], Y.shape[0], dtype=torch.float64, device=Y.device)
    for c in Y.split(chunk, dim=1):
        c64 = c.to(torch.float64)
        out.addmm_(c64, c64.T)
    return out


def _shallow_snapshot(bal: Balancer) -> dict[str, Any]:
    """The declared state of ``bal`` without copying its tensors: containers copied one level down, generators by
    their state. Valid only for a balancer that replaces its state tensors rather than changing them in place."""
    out: dict[str, Any] = {}
    for n in bal.__dict__.get("_state_names", ()):
        v = getattr(bal, n)
        if isinstance(v, torch.Generator):
            out[n] = (v, v.get_state())
        else:
            out[n] = dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v
    return out


def _shallow_restore(bal: Balancer, before: Mapping[str, Any]) -> None:
    """Restore what :func:`_shallow_snapshot` gave."""
    for n, v in before.items():
        if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], torch.Generator):
            v[0].set_state(v[1])
            setattr(bal, n, v[0])
        else:
            setattr(bal, n, v)


class GramianBalancer(Balancer):
    """Base of every method whose weights are a function of the Gramian (see the module docstring).

    :param gramian: ``"params"`` (exact, on the shared parameters) or ``"features"`` (on a representation).
    :param features: with ``gramian="features"``: the net output's name or the module computing it.
    :param every: recompute the weights every ``every`` calls, reuse them in between.
    :param params: the parameters to take the Gramian on in ``"params"`` mode (default: those reached by more
        than one part, found in the autograd graph at each call).
    :param subset: approximation (:mod:`lossport.balance.approx`): weigh a random subset of ``subset`` parts at
        each computation (the method's weights on it; the other parts get their mean); ``None``: exact.
    :param sketch: approximation, ``gramian="params"`` only: the Gramian of the gradients projected on
        ``sketch`` random sign directions (unbiased, a cosine's error ``~ sqrt((1 + cos^2) / sketch)``); at least
        the number of parts (a smaller sketch is singular: an error); ``None``: exact.
    :param approx_seed: seed of the host generator of ``subset`` and ``sketch`` (its state is in
        :meth:`state_dict`).
    """

    kind = "gramian"

    def __init__(
        self,
        *,
        gramian: str = "params",
        features: str | nn.Module | None = None,
        every: int = 1,
        params: Iterable[Tensor] | None = None,
        subset: int | None = None,
        sketch: int | None = None,
        approx_seed: int = 0,
    ) -> None:
        super().__init__()
        if gramian not in _MODES:
            raise ValueError(f"gramian must be one of {_MODES}, not {gramian!r}")
        if gramian == "features" and features is None:
            raise ValueError(
                "gramian='features' needs features=: the name of the net output that is the shared "
                "representation, or the nn.Module that computes it"
            )
        if gramian == "features" and not isinstance(features, (str, nn.Module)):
            raise TypeError(f"features must be an output name or an nn.Module, not {type(features).__name__}")
        if gramian == "params" and features is not None:
            raise ValueError("features= is only used with gramian='features' (add gramian='features')")
        if gramian == "features" and params is not None:
            raise ValueError("params= is only used with gramian='params'")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, not {every!r}")
        self.mode = gramian
        self.every = every
        self.params = None if params is None else list(params)
        if self.params is not None and not self.params:
            raise ValueError("params= is empty; give the shared parameters or leave params=None to infer them")
        self.features = features
        self._calls: int
        self._last: dict[str, float] | None
        self.add_state("_calls", 0)  # calls counted for the every=K schedule
        self.add_state("_last", None)  # the weights in use, by part
        check_options(subset, sketch, gramian, approx_seed)
        if (subset is not None or sketch is not None) and type(self).run is not GramianBalancer.run:
            raise ValueError(
                f"{type(self).__name__} uses the gradients themselves, not only their Gramian: subset= and sketch= "
                "are not available for it (leave them None)"
            )
        if sketch is not None and type(self).compute_gramian is not GramianBalancer.compute_gramian:
            raise ValueError(f"{type(self).__name__} computes its Gramian from the Jacobian: sketch= is not available")
        self.subset, self.sketch, self.approx_seed = subset, sketch, approx_seed
        self._approx_rng: torch.Generator
        if subset is not None or sketch is not None:
            self.add_state("_approx_rng", torch.Generator().manual_seed(approx_seed))  # subsets and sketches
        self.last_gramian: Tensor | None = None
        """The Gramian of the last computation (float64, parts in the order of ``last_names``): every pairwise
        cosine is there when ``info`` holds only their summary (more than :data:`PAIR_COSINES_UP_TO` parts)."""
        self.last_names: list[str] = []
        self._records: list[Tensor] = []
        self._hook: Any = None
        self._net_hook: Any = None
        self._ran: list[str] = []  # the net's modules (two levels down) that ran in the last forward
        self._ran_hooks: list[Any] = []
        self._sharded: Any = None  # the fully_shard-ed net, when there is one (lossport.fsdp)
        if isinstance(features, nn.Module):
            me = weakref.ref(self)

            def hook(module: nn.Module, args: tuple, out: Any) -> None:
                if torch.compiler.is_compiling():
                    # under torch.compile the graph breaks here: the representation stays a tensor of the
                    # autograd graph between the compiled trunk and the compiled heads (docs/integrations.md)
                    torch._dynamo.graph_break()
                obj = me()
                if obj is None or not torch.is_grad_enabled():
                    return
                obj._records.extend(z for z in _representations(out) if z.requires_grad)

            self._hook = features.register_forward_hook(hook)

    # ------------------------------------------------------------------------------------------------
    def weigh(self, G: Tensor, losses: Losses) -> Tensor:
        """Weights ``b`` (shape ``T``) in the lossport convention from the Gramian ``G`` (``T x T`` float64) of the
        parts present, in ``losses.names`` order. Written by each method."""
        raise NotImplementedError

    def attach(self, net: nn.Module) -> None:
        """Called by :class:`~lossport.Objective` with the net: checks that a ``features`` module belongs to it and
        places a pre-hook that drops the records of earlier forwards when a new forward of ``net`` starts."""
        from .. import fsdp

        self._sharded = fsdp.NetRef(net) if fsdp.is_sharded(net) else None
        if not isinstance(self.features, nn.Module):
            return
        if not any(m is self.features for m in net.modules()):
            raise ValueError(
                f"features={type(self.features).__name__} module is not a submodule of the net "
                f"{type(net).__name__}; give the module instance the net uses (e.g. net.trunk)"
            )
        if self._net_hook is not None:
            self._net_hook.remove()
        for h in self._ran_hooks:
            h.remove()
        me = weakref.ref(self)

        def reset(module: nn.Module, args: tuple) -> None:
            obj = me()
            if obj is not None and torch.is_grad_enabled():
                obj._records, obj._ran = [], []

        def ran(name: str) -> Any:
            def hook(module: nn.Module, args: tuple, out: Any) -> None:
                obj = me()
                if obj is not None and torch.is_grad_enabled() and name not in obj._ran:
                    obj._ran.append(name)

            return hook

        self._net_hook = net.register_forward_pre_hook(reset)
        self._ran_hooks = [
            m.register_forward_hook(ran(name)) for name, m in net.named_modules() if name and name.count(".") <= 1
        ]

    # ------------------------------------------------------------------------------------------------
    def shared(self, losses: Losses) -> list[Tensor]:
        """The parameters the ``params``-mode Gramian is taken on, for the parts present in ``losses``."""
        parts = [losses.parts[k] for k in losses.names]
        params = shared_parameters(parts, self.params)
        if not params:
            raise ValueError(
                f"{type(self).__name__}: no parameter is reached by more than one of the parts {losses.names}; "
                "the parts share nothing, so there is nothing to balance (give params= to choose them)"
            )
        return params

    def representation(self, losses: Losses) -> list[Tensor]:
        """The shared representation(s) of this batch in ``features`` mode (consumes the hook's records)."""
        if isinstance(self.features, str):
            outs = losses.outputs if isinstance(losses.outputs, Mapping) else {}
            if self.features not in outs:
                raise ValueError(
                    f"features={self.features!r} is not an output of the net (outputs: {sorted(outs)}); return the "
                    "shared representation as an output or give the module that computes it"
                )
            z = outs[self.features]
            if not isinstance(z, Tensor) or not z.requires_grad:
                raise ValueError(f"output {self.features!r} is not a tensor attached to the graph")
            return [z]
        recs, self._records = self._records, []
        if not recs:
            ran = f" (modules that ran: {', '.join(self._ran[:12])}{', ...' if len(self._ran) > 12 else ''})"
            raise ValueError(
                f"features module {type(self.features).__name__} did not run (with gradients enabled) in the "
                f"forward of this batch{ran if self._ran else ''}, or returned no tensor attached to the graph; "
                "give the module the net calls, or an output name. (A torch.compile'd net does not see hooks added "
                "after it first ran: build the balancer before the compiled net's first call, or call "
                "torch._dynamo.reset())"
            )
        return recs

    def compute_gramian(self, losses: Losses) -> Tensor:
        """``G`` of the parts present in ``losses`` (global under torchrun), float64."""
        parts = [losses.parts[k] for k in losses.names]
        if self.mode == "features":
            return distributed.all_reduce_gramian(feature_gramian(parts, self.representation(losses)))
        if self._sharded is not None:  # FSDP2: per-shard Gramians, one T x T all-reduce
            from ..fsdp import sharded_gramian

            return sharded_gramian(parts, self._sharded(), self.params)
        params = self.shared(losses)
        if self.sketch is not None:  # J S, T x sketch: all-reduced like J (the same S on every rank)
            if self.sketch < len(parts):
                raise ValueError(
                    f"{type(self).__name__}: sketch={self.sketch} is below the {len(parts)} parts of this batch: the "
                    f"sketched Gramian has rank at most {self.sketch}, and the weighting then finds combinations of "
                    "the parts that it sees as zero (measured for UPGrad at T = 128, sketch=64: weights up to 86, "
                    "update error 6.5x, docs/scaling.md); give sketch= at least the number of parts, or use subset="
                )
            JS = distributed.all_reduce_jacobian(sketch_jacobian(parts, params, self.sketch, self._approx_rng))
            JS = JS.to(torch.float64)
            return JS @ JS.T
        if distributed.is_distributed():
            J = distributed.all_reduce_jacobian(jacobian(parts, params).to(torch.float64))
            return J @ J.T
        return gramian(parts, params)

    def compute_jacobian(self, losses: Losses) -> tuple[Tensor, list[Tensor]]:
        """The explicit Jacobian and the tensors it is taken on: ``T x P`` on the shared parameters (global under
        torchrun), or ``T x F`` on the flattened representation(s) in ``features`` mode (this rank's rows), with
        the columns in the order of the returned tensors, each flattened. For methods that need the gradients
        themselves (:mod:`lossport.balance.surgery`). Memory ``T x P``."""
        parts = [losses.parts[k] for k in losses.names]
        if self.mode == "features":
            zs = self.representation(losses)
            check_reached(parts, zs)
            cols = [
                (torch.zeros(len(parts), z.numel(), dtype=z.dtype, device=z.device) if g is None else g).reshape(
                    len(parts), -1
                )
                for z, g in zip(zs, batched_grads(parts, zs))
            ]
            return torch.cat(cols, dim=1), zs
        params = self.shared(losses)
        J = jacobian(parts, params)
        return (distributed.all_reduce_jacobian(J) if distributed.is_distributed() else J), params

    # ------------------------------------------------------------------------------------------------
    def balance(self, losses: Losses) -> Any:
        """The template of the gradient-level families: on calls ``0, K, 2K, ...`` (and whenever the set of
        parts present changes) :meth:`run` the method, on the others (and on single-part batches) return
        :meth:`between`. A call that raises is not counted and leaves the state as it was (each :meth:`run`
        sees to its own state); the features hook's records are dropped in every case."""
        names = losses.names
        due = self._last is None or self._calls % self.every == 0 or set(self._last) != set(names)
        try:
            if due and len(names) > 1:
                out = self.run(losses)
            else:
                if due:
                    self._last = dict.fromkeys(names, 1.0)
                out = self.between(losses)
        finally:
            self._records = []  # never keep a forward's graph alive past its step
        self._calls += 1  # only once the call has succeeded: the every=K schedule stays where it was
        return out

    def between(self, losses: Losses) -> Any:
        """The weights of the calls between two runs of the method and of single-part batches: the last ones."""
        assert self._last is not None
        return {k: self._last[k] for k in losses.names}

    def run(self, losses: Losses) -> Any:
        """Compute ``G`` (of a random subset of the parts with ``subset=``), check it, weigh it and keep the
        weights; a call that fails restores the state (random generators included)."""
        names = losses.names
        before = self._snapshot()  # weigh may move random orders, EMA targets, warm starts on
        try:
            drawn = losses
            if self.subset is not None and self.subset < len(names):
                drawn = restrict(losses, [names[i] for i in subset_indices(len(names), self.subset, self._approx_rng)])
            G = self.compute_gramian(drawn)
            w = self._weights(G, drawn)
        except Exception:
            self._restore(before)  # a failed call leaves the balancer as it was
            raise
        got = dict(zip(drawn.names, w.cpu().tolist()))
        rest = sum(got.values()) / len(got)  # subset=k: the parts not drawn get the drawn parts' mean weight
        self._last = {k: got.get(k, rest) for k in names}
        self.last_gramian, self.last_names = G, drawn.names
        self.info = diagnostics(G, drawn.names)
        return dict(self._last)

    def _weights(self, G: Tensor, losses: Losses) -> Tensor:
        """``weigh(G, losses)`` after checking ``G``, checked in turn (shape, finite), float64."""
        names = losses.names
        if not bool(torch.isfinite(G).all()):
            bad = [k for k, row in zip(names, G.tolist()) if not all(map(math.isfinite, row))]
            raise FloatingPointError(
                f"{type(self).__name__}: the gradients of {bad} are not finite (their Gramian rows "
                "hold NaN or inf) although the losses are; the balancer's state is unchanged"
            )
        w = self.weigh(G, losses)
        if not isinstance(w, Tensor) or w.shape != (len(names),):
            raise RuntimeError(
                f"{type(self).__name__}.weigh returned {getattr(w, 'shape', type(w))}; expected a "
                f"tensor of shape ({len(names)},) for the parts {names}"
            )
        w = w.detach().to(torch.float64)
        if not bool(torch.isfinite(w).all()):
            raise FloatingPointError(
                f"{type(self).__name__}: non-finite weights {w.tolist()} from G {G.tolist()}; the "
                "balancer's state is unchanged"
            )
        return w

    def _snapshot(self) -> Any:
        """The state to restore if a call fails: a copy (:meth:`state_dict`). A method whose state tensors are only
        ever replaced, never changed in place, overrides it with :func:`_shallow_snapshot` (no copy of them)."""
        return self.state_dict()

    def _restore(self, before: Any) -> None:
        """Restore what :meth:`_snapshot` gave."""
        self.load_state_dict(before)

    def close(self) -> None:
        """Remove the forward hooks placed for a ``features`` module."""
        for h in (self._hook, self._net_hook, *self._ran_hooks):
            if h is not None:
                h.remove()
        self._hook = self._net_hook = None
        self._ran_hooks, self._records = [], []

    def __repr__(self) -> str:
        extra = f", features={self.features!r}" if self.mode == "features" else ""
        every = f", every={self.every}" if self.every != 1 else ""
        approx = "".join(f", {k}={getattr(self, k)}" for k in ("subset", "sketch") if getattr(self, k) is not None)
        return f"{type(self).__name__}(gramian={self.mode!r}{extra}{every}{approx})"


def _representations(out: Any) -> list[Tensor]:
    """The tensors a ``features`` module returned: a tensor; every tensor value of a dict (an FPN's levels: the
    Gramian is then over their concatenation) or of a list; the first element of a tuple whose first element
    is a tensor (an RNN's ``(output, state)``)."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [v for v in out.values() if isinstance(v, Tensor)]
    if isinstance(out, list):
        return [v for v in out if isinstance(v, Tensor)]
    if isinstance(out, tuple) and out and isinstance(out[0], Tensor):
        return [out[0]]
    return []


PAIR_COSINES_UP_TO = 32
"""Up to this many parts, :func:`diagnostics` gives every pairwise cosine; above, their summary (the ``T (T - 1)
/ 2`` entries cost 0.4-0.7 s and 61 MB per step at ``T = 1024`` as Python floats, and as many history columns)."""


def diagnostics(G: Tensor, names: list[str]) -> dict[str, float]:
    """``norm/<a>`` = ``sqrt(G_aa)`` for every part; with at most :data:`PAIR_COSINES_UP_TO` parts
    ``cos/<a>/<b>`` = ``G_ab / sqrt(G_aa G_bb)`` for every pair (NaN for a zero gradient), with more their
    summary over the pairs of nonzero gradients (:func:`cosine_summary`). The balancer's ``last_gramian``
    holds every cosine in any case."""
    if len(names) > PAIR_COSINES_UP_TO:
        d = G.detach().to(torch.float64).diagonal().clamp_min(0).sqrt()
        info = dict(zip((f"norm/{k}" for k in names), d.cpu().tolist()))
        info.update(cosine_summary(G))
        return info
    g = G.detach().to(torch.float64).cpu().tolist()  # one transfer, then plain floats (T^2 / 2 cosines)
    dd = [math.sqrt(max(g[i][i], 0.0)) for i in range(len(names))]
    info = {f"norm/{k}": dd[i] for i, k in enumerate(names)}
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            den = dd[i] * dd[j]
            info[f"cos/{a}/{names[j]}"] = g[i][j] / den if den > 0 else float("nan")
    return info


def cosine_summary(G: Tensor) -> dict[str, float]:
    """Over the pairs ``a < b`` of parts with nonzero gradients, of ``cos_ab = G_ab / sqrt(G_aa G_bb)``:
    ``cos/mean``, ``cos/min``, ``cos/max`` and ``cos/conflicting`` (the fraction of pairs with ``cos_ab <
    0``); NaN when there is no such pair. (Keys with one ``/`` after ``cos``: no part-pair key has that form.)"""
    G = G.detach().to(torch.float64)
    d = G.diagonal().clamp_min(0).sqrt()
    iu = torch.triu_indices(G.shape[0], G.shape[0], 1, device=G.device)
    den = d[iu[0]] * d[iu[1]]
    c = (G[iu[0], iu[1]] / den)[den > 0]
    if c.numel() == 0:
        return dict.fromkeys(("cos/mean", "cos/min", "cos/max", "cos/conflicting"), float("nan"))
    stats = torch.stack([c.mean(), c.min(), c.max(), (c < 0).to(torch.float64).mean()]).cpu().tolist()
    return dict(zip(("cos/mean", "cos/min", "cos/max", "cos/conflicting"), stats))


def normalized(w: Tensor, T: int) -> Tensor:
    """``w`` scaled to sum to ``T`` (the lossport convention for normalised weights)."""
    s = w.sum()
    return w * (T / s) if float(s.abs()) > 1e-300 else torch.ones_like(w)


__all__ = ["PAIR_COSINES_UP_TO", "GramianBalancer", "cosine_summary", "diagnostics", "normalized"]
