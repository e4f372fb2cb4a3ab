"""What the autograd graph says: which leaf tensors (parameters) each loss part reaches.

A part reaches a leaf when the leaf's ``AccumulateGrad`` node is reachable from the part's ``grad_fn`` through
``next_functions``: exactly the leaves its backward would write a gradient to. No caches and no global state:
every call walks the graph it is given.

A ``torch.compile``'d region is one opaque node (``CompiledFunctionBackward``) in that graph: every part through
it reaches every parameter it uses. :func:`shared_parameters` then asks the gradients (see
:func:`_shared_by_gradient`); :func:`reached_parameters` reports what the graph shows (``lossport.inspect`` runs
compiled nets eagerly for that reason).
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["has_compiled_node", "reached_parameters", "retained_grad", "shared_parameters"]

_SHARED = -1


def reached_parameters(part: Tensor) -> list[Tensor]:
    """The leaf tensors requiring grad that ``part`` reaches through its autograd graph, breadth first from
    the output side (so the first entries belong to the layers closest to the output)."""
    if part.grad_fn is None:
        return [part] if part.requires_grad else []
    out: list[Tensor] = []
    seen: set[int] = {id(part.grad_fn)}
    queue = deque([part.grad_fn])
    while queue:
        node = queue.popleft()
        var = getattr(node, "variable", None)
        if var is not None:
            out.append(var)
            continue
        for nxt, _ in node.next_functions:
            if nxt is not None and id(nxt) not in seen:
                seen.add(id(nxt))
                queue.append(nxt)
    return out


def _owners(parts: Sequence[Tensor]) -> dict[int, int]:
    """For every node reachable from ``parts``: the index of the only part reaching it, or ``_SHARED``.

    One walk per part that stops at nodes it has seen or that are already shared (every node below a shared
    node is shared), so the whole graph is traversed about twice whatever the number of parts.
    """
    owner: dict[int, int] = {}
    for i, part in enumerate(parts):
        if part.grad_fn is None:
            continue
        stack = [part.grad_fn]
        while stack:
            node = stack.pop()
            o = owner.get(id(node))
            if o in (i, _SHARED):
                continue
            owner[id(node)] = i if o is None else _SHARED
            for nxt, _ in node.next_functions:
                if nxt is not None:
                    stack.append(nxt)
    return owner


_COMPILED = "CompiledFunctionBackward"


def has_compiled_node(parts: Sequence[Tensor]) -> bool:
    """Whether the autograd graph of ``parts`` holds a ``torch.compile``'d region (one opaque node)."""
    return _has_compiled([p.grad_fn for p in parts if p.grad_fn is not None])


def _has_compiled(roots: Sequence[object]) -> bool:
    return any(type(node).__name__ == _COMPILED for node in _walk(roots))


def _walk(roots: Sequence[object]) -> Iterator[object]:
    """Every autograd node reachable from ``roots``, once each (depth first)."""
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        stack.extend(n for n, _ in node.next_functions if n is not None)  # type: ignore[attr-defined]


_FREE: weakref.WeakSet[type] = weakref.WeakSet()  # compiled graphs known to donate no buffer to their backward


def retained_grad(*args: Any, **kwargs: Any) -> Any:
    """``torch.autograd.grad``, for the retained passes through a ``torch.compile``'d graph too.

    torch checks ``torch._functorch.config.donated_buffer`` when a compiled backward runs with ``retain_graph``
    and refuses unless the flag is off, even for a graph compiled without donated buffers (as the ones compiled
    in :class:`lossport.Objective`'s forward are). For such graphs the pass runs with the flag off for its
    duration (the graphs found so are remembered, so later passes skip the refused attempt); a graph that really
    donates buffers (compiled elsewhere) raises an error that says so."""
    from .gramian import retainable_compile

    if _FREE:
        found = _compiled_graphs(_roots(args[0]))
        if found and all(c in _FREE for c in found):
            with retainable_compile():
                return torch.autograd.grad(*args, **kwargs)
    try:
        with retainable_compile(donated=True):  # a backward compiled lazily here keeps its saved activations
            return torch.autograd.grad(*args, **kwargs)
    except RuntimeError as err:
        if "donated buffer" not in str(err):
            raise
        found = _compiled_graphs(_roots(args[0]))
        if found and not any(_donates(c) for c in found):
            _FREE.update(found)
            with retainable_compile():
                return torch.autograd.grad(*args, **kwargs)
        raise RuntimeError(
            "lossport needs several backward passes through this torch.compile'd graph (retain_graph=True), "
            "but its backward was compiled with donated buffers, which allow one pass only: the net was compiled "
            "by a call outside the objective. Let the objective make the compiled net's first call "
            "(objective(net, batch) compiles it for several passes), or make that first call inside "
            "lossport.gramian.retainable_compile()"
        ) from err


def _roots(outputs: Any) -> list[object]:
    items = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    nodes = [getattr(r, "grad_fn", None) if isinstance(r, Tensor) else getattr(r, "node", None) for r in items]
    return [n for n in nodes if n is not None]


def _compiled_graphs(roots: Sequence[object]) -> list[type]:
    """The compiled-function classes of the compiled nodes below ``roots`` (one per compiled graph)."""
    found: list[type] = []
    for node in _walk(roots):
        if type(node).__name__ == _COMPILED:
            cls = getattr(node, "_forward_cls", None)
            found.append(cls if isinstance(cls, type) else type(node))
    return found


def _donates(cls: type) -> bool:
    """Whether a compiled graph was compiled with donated buffers (unknown counts as yes)."""
    meta = getattr(cls, "metadata", None)
    return meta is None or bool(getattr(meta, "bw_donated_idxs", [0]))


def shared_parameters(parts: Sequence[Tensor], params: Iterable[Tensor] | None = None) -> list[Tensor]:
    """Leaf tensors requiring grad reached by more than one of the scalar ``parts``, ordered from the output
    side to the input side (breadth first from all parts at once: the first entries are the parameters of the
    last shared layer).

    With ``params`` given: those, in the given order, after checking that some part reaches each (a Gramian
    on a parameter no part reaches would be zero, which is always a mistake); an error names the first one.
    """
    owner = _owners(parts)
    if params is not None:
        chosen = list(params)
        reached = {id(getattr(n, "variable", None)) for n in _nodes(parts) if getattr(n, "variable", None) is not None}
        for k, t in enumerate(chosen):
            if id(t) not in reached:
                raise ValueError(
                    f"params[{k}] (shape {tuple(t.shape)}) is reached by no loss part; "
                    "give parameters of the shared trunk"
                )
        return chosen
    out: list[Tensor] = []
    nodes = _nodes(parts)
    for node in nodes:
        var = getattr(node, "variable", None)
        if var is not None and owner.get(id(node)) == _SHARED:
            out.append(var)
    if out and any(type(n).__name__ == _COMPILED for n in nodes):
        out = _shared_by_gradient(parts, out)
    return out


def _shared_by_gradient(parts: Sequence[Tensor], candidates: list[Tensor]) -> list[Tensor]:
    """The ``candidates`` on which two parts or more have a nonzero gradient.

    A ``torch.compile``'d region is one autograd node that every part passing through it reaches, with every
    parameter it uses behind it: its graph cannot tell the heads from the trunk. There the gradients decide (one
    retained backward per part); they agree with the eager graph except where a part's gradient on a whole
    parameter tensor is exactly zero although the part reaches it."""
    hits = torch.zeros(len(candidates), dtype=torch.long)
    for part in parts:
        if part.grad_fn is None:
            continue
        gs = retained_grad(part, candidates, retain_graph=True, allow_unused=True)
        flags = [torch.zeros((), dtype=torch.bool) if g is None else g.ne(0).any().cpu() for g in gs]
        hits += torch.stack(flags).long()
    return [p for p, n in zip(candidates, hits.tolist()) if n >= 2]


def _leaf_behind(node: object) -> object | None:
    """The ``AccumulateGrad`` node at the end of a short single-input chain from ``node`` (``W.t()``, a view or
    an expand of a parameter), so that a layer's weight and bias are listed at the same depth."""
    for _ in range(4):
        if getattr(node, "variable", None) is not None:
            return node
        nxt = [n for n, _ in node.next_functions if n is not None]  # type: ignore[attr-defined]
        if len(nxt) != 1:
            return None
        node = nxt[0]
    return None


def _nodes(parts: Sequence[Tensor]) -> list[object]:
    """All nodes reachable from ``parts``, breadth first from all of them at once; the ``AccumulateGrad`` node
    of a parameter is listed right after the layer node that consumes it (directly or through a transpose)."""
    roots = [p.grad_fn for p in parts if p.grad_fn is not None]
    seen = {id(r) for r in roots}
    queue = deque(roots)
    order: list[object] = []
    while queue:
        node = queue.popleft()
        order.append(node)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            leaf = _leaf_behind(nxt)
            if leaf is not None and id(leaf) not in seen:
                seen.add(id(leaf))
                order.append(leaf)
            if id(nxt) not in seen:
                seen.add(id(nxt))
                queue.append(nxt)
    return order
