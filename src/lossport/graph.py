"""What the autograd graph says: which leaf tensors (parameters) each loss part reaches."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

from torch import Tensor


def reached_parameters(part: Tensor) -> list[Tensor]:
    """The leaf tensors requiring grad that ``part`` reaches through its autograd graph, breadth first from the
    output side (so the first entries belong to the layers closest to the output)."""
    if part.grad_fn is None:
        return [part] if part.requires_grad else []
    out: list[Tensor] = []
    seen_nodes: set[int] = set()
    seen_leaves: set[int] = set()
    queue = deque([part.grad_fn])
    while queue:
        node = queue.popleft()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        var = getattr(node, "variable", None)
        if var is not None:
            if id(var) not in seen_leaves:
                seen_leaves.add(id(var))
                out.append(var)
            continue
        for nxt, _ in node.next_functions:
            if nxt is None or id(nxt) in seen_nodes:
                continue
            leaf = _leaf_through(nxt)
            if leaf is not None:  # a parameter used by this node (possibly through a transpose or view)
                if id(leaf) not in seen_leaves:
                    seen_leaves.add(id(leaf))
                    out.append(leaf)
                continue
            queue.append(nxt)
    return out


def _leaf_through(node: object, hops: int = 3) -> Tensor | None:
    """The leaf at the end of a chain of single-input nodes (``TBackward0``, views) starting at ``node``."""
    for _ in range(hops + 1):
        var = getattr(node, "variable", None)
        if var is not None:
            return var
        nxt = [n for n, _ in node.next_functions if n is not None]  # type: ignore[attr-defined]
        if len(nxt) != 1:
            return None
        node = nxt[0]
    return None


def shared_parameters(parts: Sequence[Tensor], params: Iterable[Tensor] | None = None) -> list[Tensor]:
    """Leaf tensors reached by more than one of ``parts``, ordered from the output side to the input side.

    With ``params`` given, those of them that some part reaches, in the given order (an error names any that
    no part reaches, since a Gramian on them would be zero).
    """
    reached = [reached_parameters(p) for p in parts]
    if params is not None:
        chosen = list(params)
        any_reached = {id(t) for r in reached for t in r}
        unreached = [i for i, t in enumerate(chosen) if id(t) not in any_reached]
        if unreached:
            raise ValueError(
                f"params[{unreached[0]}] (shape {tuple(chosen[unreached[0]].shape)}) is reached by no loss part; "
                "give parameters of the shared trunk"
            )
        return chosen
    count: dict[int, int] = {}
    for r in reached:
        for t in r:
            count[id(t)] = count.get(id(t), 0) + 1
    order: list[Tensor] = []
    seen: set[int] = set()
    # breadth-first merge: interleave the parts' orders so that output-side tensors come first
    for depth in range(max((len(r) for r in reached), default=0)):
        for r in reached:
            if depth < len(r):
                t = r[depth]
                if count[id(t)] > 1 and id(t) not in seen:
                    seen.add(id(t))
                    order.append(t)
    return order


__all__ = ["reached_parameters", "shared_parameters"]
