"""The Gramian ``G = J J^T`` of the loss parts' gradients, without materialising the ``T x P`` Jacobian ``J``.

For a Linear layer ``Y = X W^T + b`` (batch of ``B`` rows) the gradient of part ``t`` on ``(W, b)`` is
``D_t^T [X, 1]`` with ``D_t = dL_t/dY`` (``B x out``), so its contribution to the Gramian is

    G_l[t, s] = <D_t^T [X, 1], D_s^T [X, 1]> = <D_t, (X X^T + 1) D_s>

(Frobenius product). With ``K = X X^T + 1`` (``B x B``) the cost is ``B^2 in + T B^2 out + T^2 B out``, against
``T B out in`` for explicit per-part weight gradients; :func:`gramian` picks the cheaper per layer. The ``D_t``
come from ``T`` backward passes that compute only input gradients through the trunk (no weight gradients):
pre-hooks on the layers' autograd nodes record ``dL_t/dY``. Parameters that are not the weight and bias of a
2-D Linear layer used once (convolutions, norms, embeddings, attention projections on 3-D inputs, shared
weights) get explicit per-part gradients from the same passes, one block at a time.

:func:`gramian_reference` is the plain definition (one backward per part, dot products), used by the tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class _Linear:
    node: object  # the AddmmBackward0 / MmBackward0 node of Y = X W^T (+ b)
    weight: Tensor
    bias: Tensor | None
    x: Tensor
    grads: list[Tensor | None] = field(default_factory=list)


def _acc_var(node: object) -> Tensor | None:
    return getattr(node, "variable", None)


def _find_linears(parts: Sequence[Tensor], params: Sequence[Tensor]) -> list[_Linear]:
    """Linear layers (2-D addmm/mm with a transposed weight) whose weight is in ``params``, used exactly once."""
    wanted = {id(p) for p in params}
    uses: dict[int, int] = {}
    found: dict[int, _Linear] = {}
    seen: set[int] = set()
    stack = [p.grad_fn for p in parts if p.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        nxt = node.next_functions
        for n, _ in nxt:
            v = _acc_var(n) if n is not None else None
            if v is not None and id(v) in wanted:
                uses[id(v)] = uses.get(id(v), 0) + 1
        name = type(node).__name__
        if name in ("AddmmBackward0", "MmBackward0"):
            w_slot = 2 if name == "AddmmBackward0" else 1
            t_node = nxt[w_slot][0] if len(nxt) > w_slot else None
            if t_node is not None and type(t_node).__name__ == "TBackward0":
                w = _acc_var(t_node.next_functions[0][0]) if t_node.next_functions[0][0] is not None else None
                b = None
                if name == "AddmmBackward0" and nxt[0][0] is not None:
                    b = _acc_var(nxt[0][0])
                if w is not None and id(w) in wanted and (b is None or id(b) in wanted):
                    x = node._saved_mat1 if name == "AddmmBackward0" else node._saved_self  # type: ignore[attr-defined]
                    if name == "AddmmBackward0" and getattr(node, "_saved_beta", 1) != 1:
                        x = None
                    if x is not None and x.dim() == 2:
                        found[id(w)] = _Linear(node, w, b, x)
        for n, _ in nxt:
            if n is not None and id(n) not in seen:
                stack.append(n)
    # the weight's TBackward0 is one use: a layer whose weight or bias is also used elsewhere is left explicit
    out = []
    for wid, lin in found.items():
        if uses.get(id(lin.weight), 0) == 0 and (lin.bias is None or uses.get(id(lin.bias), 0) == 1):
            out.append(lin)
    return out


def _contract(lin: _Linear, T: int) -> Tensor:
    """``G_l`` of one Linear layer from its recorded output gradients ``D_t`` (float64)."""
    x = lin.x.detach().to(torch.float64)
    B, n_in = x.shape
    first = next(g for g in lin.grads if g is not None)
    D = torch.stack([torch.zeros_like(first) if g is None else g for g in lin.grads]).to(torch.float64)
    n_out = D.shape[2]
    if B * B * n_in + T * B * B * n_out + T * T * B * n_out <= T * B * n_out * n_in:
        K = x @ x.T
        if lin.bias is not None:
            K = K + 1.0
        M = torch.einsum("ab,tbo->tao", K, D)
        return torch.einsum("tao,sao->ts", D, M)
    gw = torch.einsum("tbo,bi->toi", D, x).reshape(T, -1)
    if lin.bias is not None:
        gw = torch.cat([gw, D.sum(1)], dim=1)
    return gw @ gw.T


def gramian(parts: Sequence[Tensor], params: Sequence[Tensor], *, retain_graph: bool = True) -> Tensor:
    """Exact ``G[t, s] = <grad_params L_t, grad_params L_s>`` (float64, ``T x T``), layer by layer."""
    T = len(parts)
    params = list(params)
    linears = _find_linears(parts, params)
    covered = {id(lin.weight) for lin in linears} | {id(lin.bias) for lin in linears if lin.bias is not None}
    explicit = [p for p in params if id(p) not in covered]
    # anchors: cheap inputs whose gradients force the backward through every recorded layer
    anchors = [lin.bias if lin.bias is not None else lin.weight for lin in linears]
    inputs = explicit + [a for a in anchors if all(a is not e for e in explicit)]
    G = torch.zeros(T, T, dtype=torch.float64, device=parts[0].device if parts else None)
    if not inputs:
        return G
    handles = []
    current: list[int] = [0]

    def make_hook(lin: _Linear):
        def hook(grad_outputs: tuple[Tensor | None, ...]) -> None:
            lin.grads[current[0]] = grad_outputs[0]

        return hook

    for lin in linears:
        lin.grads = [None] * T
        handles.append(lin.node.register_prehook(make_hook(lin)))  # type: ignore[attr-defined]
    blocks: list[list[Tensor | None]] = []
    try:
        for t, part in enumerate(parts):
            current[0] = t
            gs = torch.autograd.grad(part, inputs, retain_graph=retain_graph or t < T - 1, allow_unused=True)
            blocks.append(list(gs[: len(explicit)]))
    finally:
        for h in handles:
            h.remove()
    for lin in linears:
        if any(g is not None for g in lin.grads):
            G += _contract(lin, T)
    for k, p in enumerate(explicit):
        rows = [b[k] for b in blocks]
        if all(r is None for r in rows):
            continue
        Jp = torch.stack([torch.zeros_like(p) if r is None else r for r in rows]).reshape(T, -1).to(torch.float64)
        G += Jp @ Jp.T
    return G


def jacobian(parts: Sequence[Tensor], params: Sequence[Tensor], *, retain_graph: bool = True) -> Tensor:
    """The explicit ``T x P`` Jacobian (rows: the parts' gradients on ``params``, flattened and concatenated)."""
    rows = []
    for t, part in enumerate(parts):
        gs = torch.autograd.grad(part, list(params), retain_graph=retain_graph or t < len(parts) - 1, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, gs)]))
    return torch.stack(rows)


def gramian_reference(parts: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    """``J J^T`` from the explicit Jacobian: the definition, for tests."""
    J = jacobian(parts, params).to(torch.float64)
    return J @ J.T


def feature_gramian(parts: Sequence[Tensor], features: Tensor, *, retain_graph: bool = True) -> Tensor:
    """Gramian of the parts' gradients with respect to a representation ``features`` (MGDA-UB, Sener & Koltun
    2018): ``T`` backward passes through the heads only."""
    rows = []
    for t, part in enumerate(parts):
        (g,) = torch.autograd.grad(part, [features], retain_graph=True, allow_unused=True)
        rows.append(torch.zeros_like(features).reshape(-1) if g is None else g.reshape(-1))
    J = torch.stack(rows).to(torch.float64)
    return J @ J.T


__all__ = ["gramian", "gramian_reference", "jacobian", "feature_gramian"]
