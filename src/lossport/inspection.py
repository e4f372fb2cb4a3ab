"""Which loss reaches which layer, how hard each pulls, whether they conflict: :func:`inspect` and the
training :class:`Monitor`.

::

    report = lossport.inspect(net, data, {"y1": "mse", "y2": "ce"}, batches=4)
    print(report)              # terminal table: reach and pull by module, trunk cosines and ratios, advice
    report.plot()              # parts x modules heatmap of gradient norms (unreached hatched) + cosine matrix
    report.as_dict()

**Reach** is read from the autograd graph (:func:`lossport.graph.reached_parameters`): a part reaches a
parameter when the parameter is a leaf of the part's graph, whatever the value of the gradient (a ReLU that
is off on every example still *reaches* the layers before it; its pull is then 0, shown as ``0``, while an
unreached cell shows ``.``). This answers the question of the Keras FAQ (loss1 of ``A -> B -> C`` reaches A, B
and C, loss2 of ``A -> B -> D`` reaches A, B and D) for the user's own net. Modules are the ones that own
parameters directly, named by qualified name (``""`` is shown ``(root)``); a parameter belongs to the first
module that owns it.

**Pull and conflict** come from one ``torch.autograd.grad`` of every part on the parameters it reaches, per
batch (no ``.grad`` is touched). With ``g_{i,b}|m`` part ``i``'s gradient on the parameters of module ``m`` in
batch ``b``, and ``B_i`` the batches where part ``i`` is present:

* ``pull[i][m] = (1/|B_i|) sum_{b in B_i} ||g_{i,b}|m||`` (mean of per-batch norms: what each step sees, not
  the norm of the mean gradient, which shrinks with the gradient noise);
* ``cos[m][i][j] = mean over b in B_i & B_j of <g_i, g_j> / (||g_i|| ||g_j||)`` (batches where a norm is 0 are
  skipped; NaN when none is left);
* the same on the *shared trunk*, the concatenation of the modules reached by two parts or more.

A part with no labelled example in a batch has no gradient in that batch: it is counted in ``missing`` and
left out of that batch's averages. Regularization terms (``L1``/``L2``) are not parts and are not measured.

**Compiled nets** (``torch.compile``) are measured eagerly (:func:`eager_compiled`): the compiled graph is one
autograd node that hides the layers, so its reach would be "every part reaches everything".

**During training**, :func:`monitor` gives the same trunk figures for one batch from the Gramian
(:func:`lossport.gramian.gramian`), and :class:`Monitor` samples them every ``K`` steps and averages them
per round.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor, nn

from .balance import Context
from .errors import LossSpecError
from .graph import reached_parameters, shared_parameters
from .objective import Objective, unwrap
from .report import ModuleInfo, Report, advise
from .result_types import Losses
from .training.data import first_batches

ROOT = "(root)"
MAX_ROWS = 40
"""The default grouping (``group_by="auto"``) shows at most this many module rows."""
GroupBy = Union[None, str, int, Sequence[str], Callable[[str], str]]  # noqa: UP007 (a runtime alias)


# -- data ---------------------------------------------------------------------------------------------------
def parametrised_modules(net: nn.Module) -> list[tuple[str, nn.Module, list[tuple[str, nn.Parameter]]]]:
    """``(name, module, own parameters)`` of every module that owns parameters directly, in registration
    order; a parameter shared by several modules belongs to the first.

    A Keras 3 model (torch backend) keeps every variable in one ``ParameterDict`` (``_torch_params``, keys the
    variables' paths): its parameters are attributed to the Keras layers that own them, named by their path
    (``block/dense``), the layer object as module."""
    keras_owner = _keras_layers(net)
    seen: set[int] = set()
    out: list[tuple[str, nn.Module, list[tuple[str, nn.Parameter]]]] = []
    by_layer: dict[str, int] = {}
    for name, mod in net.named_modules():
        own = []
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            qn = f"{name}.{pname}" if name else pname
            if id(p) in keras_owner:
                lname, layer = keras_owner[id(p)]
                if lname not in by_layer:
                    by_layer[lname] = len(out)
                    out.append((lname, layer, []))
                out[by_layer[lname]][2].append((qn, p))
            else:
                own.append((qn, p))
        if own:
            out.append((name or ROOT, mod, own))
    return out


def _keras_layers(net: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """``id(parameter) -> (layer path, layer)`` for the variables of a Keras 3 model's layers (torch backend)."""
    keras = sys.modules.get("keras")
    layer_cls = getattr(keras, "Layer", None)
    if not isinstance(layer_cls, type) or not isinstance(net, layer_cls):
        return {}
    layers = getattr(net, "_flatten_layers", None)
    found: dict[int, tuple[str, nn.Module]] = {}
    for layer in layers(include_self=True, recursive=True) if callable(layers) else [net]:
        for v in getattr(layer, "_trainable_variables", []) + getattr(layer, "_non_trainable_variables", []):
            value = getattr(v, "value", None)
            if isinstance(value, Tensor):
                found.setdefault(id(value), (str(v.path).rsplit("/", 1)[0], layer))
    return found


@dataclass
class Row:
    """A row of the report: a parametrised module, or a group of them (``group_by``)."""

    name: str
    kind: str
    members: list[str]
    own: list[tuple[str, nn.Parameter]]


def group_modules(
    mods: list[tuple[str, nn.Module, list[tuple[str, nn.Parameter]]]], group_by: GroupBy = "auto"
) -> tuple[list[Row], str]:
    """The report's rows from the parametrised modules, and a sentence saying how they were grouped.

    ``group_by``: ``None`` (a row per module); an int ``d`` (modules grouped by the first ``d`` components of
    their qualified name, ``.`` or ``/`` separated: ``d=2`` puts ``backbone.body.0.conv`` in ``backbone.body``);
    a list of name prefixes (a module goes to the longest prefix it is under, others stay alone); a function
    ``module name -> row name``; ``"auto"`` (default): a row per module up to :data:`MAX_ROWS` modules, else the
    deepest ``d`` that gives at most :data:`MAX_ROWS` rows (depth 1 if none does)."""
    if isinstance(group_by, bool) or not (
        group_by is None or isinstance(group_by, (str, int, Sequence)) or callable(group_by)
    ):
        raise ValueError(f"group_by must be None, 'auto', a depth, a list of prefixes or a function, not {group_by!r}")
    names = [m[0] for m in mods]
    how = ""
    if isinstance(group_by, str):
        if group_by != "auto":
            raise ValueError(
                f"group_by={group_by!r}: the string form is 'auto'; give a list for one prefix, e.g. [{group_by!r}]"
            )
        if len(mods) <= MAX_ROWS:
            group_by = None
        else:
            fits = [d for d in range(1, _depth(names) + 1) if len(set(_keys(names, d))) <= MAX_ROWS]
            depth = max(fits, default=1)
            group_by = depth
            how = " by default (group_by='auto')"
    if group_by is None:
        return [Row(n, type(m).__name__, [n], list(own)) for n, m, own in mods], ""
    keys = _keys(names, group_by)
    rows: dict[str, Row] = {}
    kinds: dict[str, list[str]] = {}
    for (n, m, own), k in zip(mods, keys):
        row = rows.setdefault(k, Row(k, "", [], []))
        row.members.append(n)
        row.own.extend(own)
        kinds.setdefault(k, []).append(type(m).__name__)
    for k, row in rows.items():
        ts = sorted(set(kinds[k]))
        row.kind = (
            ts[0]
            if len(row.members) == 1
            else (f"{len(row.members)}x {ts[0]}" if len(ts) == 1 else f"{len(row.members)} modules")
        )
    what = (
        f"to depth {group_by}"
        if isinstance(group_by, int)
        else "by the prefixes given"
        if not callable(group_by)
        else f"by {getattr(group_by, '__name__', 'the function given')}"
    )
    note = f"{len(mods)} modules grouped {what}{how} into {len(rows)} rows; group_by=None shows each"
    return list(rows.values()), note


_SEP = re.compile(r"[./]")


def _depth(names: list[str]) -> int:
    return max((len(_SEP.split(n)) for n in names if n != ROOT), default=1)


def _keys(names: list[str], group_by: Any) -> list[str]:
    if isinstance(group_by, int):
        if group_by < 1:
            raise ValueError(f"group_by depth must be at least 1, not {group_by}")
        return [n if n == ROOT else _prefix(n, group_by) for n in names]
    if callable(group_by):
        return [str(group_by(n)) for n in names]
    prefixes = sorted((str(p) for p in group_by), key=len, reverse=True)
    return [next((p for p in prefixes if n == p or (n.startswith(p) and n[len(p)] in "./")), n) for n in names]


def _prefix(name: str, depth: int) -> str:
    seps = [m.start() for m in _SEP.finditer(name)]
    return name if len(seps) < depth else name[: seps[depth - 1]]


# -- inspect ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def eager_compiled() -> Iterator[None]:
    """Inside: ``torch.compile``'d functions and modules run eagerly (``torch.compiler.set_stance("force_eager")``,
    restored on exit). A compiled net's graph is one opaque autograd node, in which every part reaches every
    parameter; run eagerly, the graph shows which layer each part reaches, and the figures are those of the
    eager net (the same function)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:  # torch < 2.6: no stance to set; compiled nets are then measured as compiled
        yield
        return
    with set_stance("force_eager"):
        yield


def inspect(
    net: nn.Module,
    data: Any,
    loss: Any = "auto",
    *,
    weights: Any = None,
    batches: int = 4,
    batch_size: int = 64,
    balance: Any = None,
    group_by: GroupBy = "auto",
) -> Report:
    """Measure on ``batches`` batches of ``data`` which parameters each loss part reaches, how hard it pulls
    on every module, and how the parts' gradients agree on the shared trunk (see the module docstring).

    Args:
        net: the multi-output net (its train/eval mode is left as it is).
        data: a dict of tensors, a pair ``(x, y)``, or an iterable of batches (a ``DataLoader``).
        loss: a loss spec as for :class:`lossport.Objective`, or an ``Objective``.
        weights: static weights (with a spec only); reported next to the parts and used by the advice.
        batches: number of batches measured.
        batch_size: rows per batch when ``data`` is a dict or a pair of tensors.
        balance: a balancer or its name: its weights on these batches are reported (and used by the advice);
            a balancer instance keeps the state these calls give it.
        group_by: rows of the report (:func:`group_modules`): ``"auto"`` (a row per module up to
            :data:`MAX_ROWS`, else modules grouped by name to the deepest level that fits), ``None`` (every
            module), a depth, a list of name prefixes or a function ``module name -> row name``. A group's pull
            is the norm of the part's gradient on all the group's parameters together.

    Returns:
        a :class:`lossport.report.Report`; ``print(report)`` shows the table.
    """
    from .balance import available, resolve

    if isinstance(loss, Objective):
        if weights is not None:
            raise ValueError("weights= is for a loss spec; an Objective already has its weights")
        objective = loss
    else:
        objective = Objective(loss, weights=weights)
    balancer = resolve(balance)
    if balancer is None and objective.balancer is not None:
        balancer = objective.balancer
    inner = unwrap(net)
    mods = parametrised_modules(inner)
    rows, grouping = group_modules(mods, group_by)
    row_of = {m: r.name for r in rows for m in r.members}
    owner: dict[int, str] = {}
    pname: dict[int, str] = {}
    for r in rows:
        for qn, p in r.own:
            owner[id(p)] = r.name
            pname[id(p)] = qn
    called: set[str] = set()
    unobserved = {row_of[mname] for mname, mod, _ in mods if _keras_layers(mod)}  # Keras calls bypass the hooks
    handles = []
    for mname, mod, _ in mods:
        handles.append(mod.register_forward_hook(lambda *_a, _n=row_of[mname]: called.add(_n)))
    batch_list = first_batches(data, batches, batch_size)
    acc = _Accumulator()
    try:
        for i, batch in enumerate(batch_list):
            with eager_compiled():
                losses = objective.evaluate(net, batch)
            if balancer is not None and len(losses.parts) > 0:
                losses = balancer(losses, _context(balancer, objective, net, batch_list, i))
            acc.add(losses, owner, pname, rows)
    finally:
        for h in handles:
            h.remove()
    if objective.terms is None:
        raise LossSpecError("inspect: the objective was never evaluated")
    part_names = [p for p in objective.part_names if p in acc.seen_parts] + [
        p for p in acc.seen_parts if p not in objective.part_names
    ]
    report = acc.report(part_names, rows, called - unobserved, unobserved, len(batch_list), _name_of(balance, balancer))
    report.grouping = grouping
    report.advice = advise(report, available())
    return report


def _context(balancer: Any, objective: Objective, net: nn.Module, batch_list: list[Any], i: int) -> Context | None:
    """For a balancer that declares extra batches or a meta batch: the next batches of the inspected ones (in
    turn) as its extra and meta batches; no optimizer (a bilevel method's look-ahead needs the net's: it raises)."""
    if not balancer.needs_context:
        return None
    need = balancer.batches + int(balancer.meta)
    if len(batch_list) < need:
        raise ValueError(
            f"inspect: {type(balancer).__name__} uses {need} batches per step; inspect at least batches={need}"
        )

    def at(j: int) -> Any:
        return batch_list[(i + j) % len(batch_list)]

    return Context.of(
        lambda data: objective.evaluate(net, data),
        at(0),
        [at(j) for j in range(1, balancer.batches)],
        at(balancer.batches) if balancer.meta else None,
    )


def _name_of(spec: Any, balancer: Any) -> str | None:
    if balancer is None:
        return None
    return spec if isinstance(spec, str) else repr(balancer)


class _Accumulator:
    """Per-batch Gram matrices by module, averaged into a :class:`Report` at the end."""

    def __init__(self) -> None:
        self.seen_parts: list[str] = []
        self.batches: list[dict[str, Any]] = []
        self.reach: dict[str, set[str]] = {}
        self.reach_params: dict[str, set[str]] = {}
        self.value_sum: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.weight_sum: dict[str, float] = {}
        self.present: dict[str, int] = {}

    def add(self, losses: Losses, owner: dict[int, str], pname: dict[int, str], units: list[Row]) -> None:
        names = losses.names
        for p in list(names) + list(losses.missing):
            if p not in self.seen_parts:
                self.seen_parts.append(p)
        params_by_id: dict[int, Tensor] = {id(p): p for u in units for _, p in u.own}
        reached: dict[str, list[Tensor]] = {}
        for k in names:
            leaves = [t for t in reached_parameters(losses.parts[k]) if id(t) in owner]
            reached[k] = leaves
            self.reach.setdefault(k, set()).update(owner[id(t)] for t in leaves)
            self.reach_params.setdefault(k, set()).update(pname[id(t)] for t in leaves)
            n = max(losses.counts.get(k, 1), 1)
            self.value_sum[k] = self.value_sum.get(k, 0.0) + float(losses.parts[k].detach()) * n
            self.counts[k] = self.counts.get(k, 0) + n
            w = losses.weights.get(k, 1.0)
            self.weight_sum[k] = self.weight_sum.get(k, 0.0) + float(w.detach() if isinstance(w, Tensor) else w)
            self.present[k] = self.present.get(k, 0) + 1
        for k in losses.missing:
            self.reach.setdefault(k, set())
            self.reach_params.setdefault(k, set())
        # per module: T x T Gram matrix of the parts' gradients on its own parameters (float64)
        T = len(names)
        grads: dict[int, list[Tensor | None]] = {}
        for i, k in enumerate(names):
            leaves = reached[k]
            gs = torch.autograd.grad(losses.parts[k], leaves, retain_graph=True, allow_unused=True) if leaves else ()
            for t, g in zip(leaves, gs):
                grads.setdefault(id(t), [None] * T)[i] = g
        rows_by_module: dict[str, list[Tensor]] = {}
        for pid, gl in grads.items():
            param = params_by_id[pid]
            rows = torch.stack(
                [
                    torch.zeros(param.numel(), dtype=torch.float64, device=param.device)
                    if g is None
                    else g.detach().reshape(-1).to(torch.float64)
                    for g in gl
                ]
            )
            rows_by_module.setdefault(owner[pid], []).append(rows)
        gram = {
            m: sum((r @ r.T for r in rs), torch.zeros(T, T, dtype=torch.float64)) for m, rs in rows_by_module.items()
        }
        reach_mod = {k: {owner[id(t)] for t in reached[k]} for k in names}
        self.batches.append({"names": list(names), "gram": gram, "reach": reach_mod})

    def report(
        self,
        parts: list[str],
        rows: list[Row],
        called: set[str],
        unobserved: set[str],
        n_batches: int,
        balance: str | None,
    ) -> Report:
        reach_count: dict[str, int] = {}
        for p in parts:
            for m in self.reach.get(p, ()):
                reach_count[m] = reach_count.get(m, 0) + 1
        infos = []
        for r in rows:
            trainable = sum(p.numel() for _, p in r.own if p.requires_grad)
            if reach_count.get(r.name):
                status = "reached"
            elif trainable == 0:
                status = "frozen"
            elif r.name in called:
                status = "no loss"
            elif r.name in unobserved:
                status = "not reached"
            else:
                status = "not called"
            infos.append(
                ModuleInfo(r.name, r.kind, sum(p.numel() for _, p in r.own), trainable, status, len(r.members))
            )
        order = [m.name for m in infos]
        shared = [m for m in order if reach_count.get(m, 0) >= 2]
        P = len(parts)
        pull: dict[str, dict[str, list[float]]] = {p: {} for p in parts}
        cos_acc: dict[str, list[list[list[float]]]] = {m: [[[] for _ in parts] for _ in parts] for m in shared}
        trunk_cos: list[list[list[float]]] = [[[] for _ in parts] for _ in parts]
        trunk_norm: dict[str, list[float]] = {p: [] for p in parts}
        idx = {p: i for i, p in enumerate(parts)}
        for b in self.batches:
            names: list[str] = b["names"]
            T = len(names)
            for i, k in enumerate(names):
                for m in b["reach"][k]:
                    g = b["gram"].get(m)
                    pull[k].setdefault(m, []).append(math.sqrt(max(float(g[i, i]), 0.0)) if g is not None else 0.0)
            trunk = torch.zeros(T, T, dtype=torch.float64)
            for m in shared:
                g = b["gram"].get(m)
                if g is None:
                    continue
                trunk = trunk + g
                _add_cos(cos_acc[m], g, names, idx)
            if shared:
                _add_cos(trunk_cos, trunk, names, idx)
                for i, k in enumerate(names):
                    trunk_norm[k].append(math.sqrt(max(float(trunk[i, i]), 0.0)))

        def mean(xs: list[float]) -> float:
            return sum(xs) / len(xs) if xs else math.nan

        def mat(acc: list[list[list[float]]]) -> list[list[float]]:
            return [[mean(acc[i][j]) for j in range(P)] for i in range(P)]

        return Report(
            parts=parts,
            modules=infos,
            reach={p: [m for m in order if m in self.reach.get(p, set())] for p in parts},
            reach_params={p: sorted(self.reach_params.get(p, set())) for p in parts},
            pull={p: {m: mean(pull[p][m]) for m in order if m in pull[p]} for p in parts},
            shared=shared,
            cos={m: mat(cos_acc[m]) for m in shared},
            trunk_cos=mat(trunk_cos),
            trunk_norm={p: mean(trunk_norm[p]) for p in parts if trunk_norm[p]},
            values={p: self.value_sum[p] / self.counts[p] for p in parts if self.counts.get(p)},
            weights={p: self.weight_sum[p] / self.present[p] for p in parts if self.present.get(p)},
            missing={p: n_batches - self.present.get(p, 0) for p in parts},
            counts={p: self.counts.get(p, 0) for p in parts},
            batches=n_batches,
            balance=balance,
        )


def _add_cos(acc: list[list[list[float]]], G: Tensor, names: list[str], idx: dict[str, int]) -> None:
    d = G.diagonal().clamp_min(0).sqrt()
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            den = float(d[i] * d[j])
            if den > 0:
                acc[idx[a]][idx[b]].append(max(-1.0, min(1.0, float(G[i, j]) / den)))


# -- monitoring during training ------------------------------------------------------------------------------
def figures_from_gramian(G: Tensor, names: Sequence[str]) -> dict[str, float]:
    """``gradnorm/<a> = sqrt(G_aa)``, ``cos/<a>/<b> = G_ab / sqrt(G_aa G_bb)`` and
    ``gradratio/<a>/<b> = sqrt(G_aa / G_bb)`` for every pair ``a`` before ``b`` (NaN where a norm is 0)."""
    d = G.detach().to(torch.float64).diagonal().clamp_min(0).sqrt()
    out = {f"gradnorm/{a}": float(d[i]) for i, a in enumerate(names)}
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            b = names[j]
            den = float(d[i] * d[j])
            out[f"cos/{a}/{b}"] = float(G[i, j]) / den if den > 0 else math.nan
            out[f"gradratio/{a}/{b}"] = float(d[i] / d[j]) if float(d[j]) > 0 else math.nan
    return out


def monitor(losses: Losses, shared: Sequence[Tensor] | None = None) -> dict[str, float]:
    """Trunk figures of one batch (see :func:`figures_from_gramian`) from the Gramian of the parts' gradients
    on ``shared`` (default: the parameters reached by two parts or more). Call before ``backward()``: it keeps
    the graph (``retain_graph``) and touches no ``.grad``."""
    from .gramian import gramian

    names = losses.names
    parts = [losses.parts[k] for k in names]
    params = shared_parameters(parts) if shared is None else list(shared)
    if not params or not parts:
        return {}
    return figures_from_gramian(gramian(parts, params), names)


class Monitor:
    """Samples :func:`monitor` every ``every`` steps and averages per round.

    In a training loop, once per step, after the objective (and balancer) and before ``backward()``::

        mon = Monitor(every=10)
        ...
        losses = objective(net, batch)
        mon.observe(losses, objective.balancer)     # every 10th call measures; the others cost nothing
        losses.total.backward(); opt.step(); opt.zero_grad()
        ...
        history_row.update(mon.end_round())         # {"cos/a/b": mean, "gradnorm/a": mean, ...}

    When the balancer is a Gramian balancer on the parameters (``upgrad``, ``mgda``, ...) that has just
    computed ``G``, its figures are reused at no cost (every step it recomputes). The shared parameters are
    fixed at the first step with two parts present (or given as ``params``). A sampled step with fewer than
    two parts present (missing labels) moves the sample to the next step that has two.
    """

    def __init__(self, every: int = 10, *, params: Iterable[Tensor] | None = None) -> None:
        if int(every) < 1:
            raise ValueError(f"Monitor: every must be a positive integer, not {every!r}")
        self.every = int(every)
        self.params = None if params is None else list(params)
        self.steps = 0
        self.samples = 0
        self._sums: dict[str, float] = {}
        self._n: dict[str, int] = {}
        self._last_info: object = None  # the balancer's info dict last used (kept alive: compared by identity)
        self._due = False

    def observe(self, losses: Losses, balancer: Any = None) -> dict[str, float] | None:
        """Call once per step, before ``backward()``. Counts the step; on sampled steps (and whenever a
        Gramian balancer has just computed ``G``) records the figures and returns them."""
        step = self.steps
        self.steps += 1
        names = losses.names
        figs: dict[str, float] | None = None
        gramian = getattr(balancer, "kind", None) in ("gramian", "surgery")  # the Gramian engine's balancers
        if gramian and balancer.mode == "params" and balancer.params is None:
            info = balancer.info
            if info is not self._last_info and all(f"norm/{k}" in info for k in names) and len(names) >= 2:
                self._last_info = info
                G = getattr(balancer, "last_gramian", None)
                if f"cos/{names[0]}/{names[1]}" not in info and G is not None and G.shape[0] == len(names):
                    figs = figures_from_gramian(G, names)  # many parts: info holds the cosines' summary only
                else:
                    figs = _from_balancer_info(info, names)
        if step % self.every == 0:
            self._due = True
        if figs is None and self._due and len(names) >= 2:
            if self.params is None:
                self.params = shared_parameters([losses.parts[k] for k in names])
                if not self.params:
                    raise ValueError(
                        f"monitor: the parts {names} share no parameter, so there is no trunk to monitor; "
                        "turn the monitor off or give params="
                    )
            figs = monitor(losses, self.params)
        if figs:
            self._due = False
            self.samples += 1
            for k, v in figs.items():
                if not math.isnan(v):
                    self._sums[k] = self._sums.get(k, 0.0) + v
                    self._n[k] = self._n.get(k, 0) + 1
        return figs

    def state_dict(self) -> dict[str, Any]:
        """The sampling schedule (saved in training checkpoints; the round's sums restart at each round)."""
        return {"steps": self.steps, "due": self._due}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps, self._due = int(state["steps"]), bool(state["due"])

    def end_round(self) -> dict[str, float]:
        """Means of the figures sampled since the last call (each over the samples where it was defined),
        and start a new round."""
        out = {k: self._sums[k] / self._n[k] for k in self._sums}
        self._sums, self._n, self.samples = {}, {}, 0
        return out


def _from_balancer_info(info: Mapping[str, float], names: Sequence[str]) -> dict[str, float]:
    out = {f"gradnorm/{a}": float(info[f"norm/{a}"]) for a in names}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            out[f"cos/{a}/{b}"] = float(info.get(f"cos/{a}/{b}", math.nan))
            nb = out[f"gradnorm/{b}"]
            out[f"gradratio/{a}/{b}"] = out[f"gradnorm/{a}"] / nb if nb > 0 else math.nan
    return out


__all__ = [
    "MAX_ROWS",
    "GroupBy",
    "Monitor",
    "Row",
    "figures_from_gramian",
    "group_modules",
    "inspect",
    "monitor",
    "parametrised_modules",
]
