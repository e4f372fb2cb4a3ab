"""The Gramian ``G = J J^T`` of the loss parts' gradients, without materialising the ``T x P`` Jacobian ``J``.

Row ``t`` of ``J`` is the gradient of part ``L_t`` on the chosen parameters; ``G[t, s] = <g_t, g_s>`` is all the
gradient-level balancers need (Jacobian descent, Quinton & Rey 2024, section 6; MGDA-UB, Sener & Koltun 2018).

**Linear layers.** For ``Y = X W^T + b`` with ``R`` rows (``R = B`` for a batch of vectors, ``B * S`` for a
sequence batch) the gradient of part ``t`` on ``(W, b)`` is ``D_t^T [X, 1]`` with ``D_t = dL_t/dY`` (``R x out``),
so the layer's share of the Gramian is

    G_l[t, s] = <D_t^T [X, 1], D_s^T [X, 1]> = <D_t, K D_s>,   K = X X^T + 1   (R x R),

a Frobenius product. Contracting ``K`` first costs ``R^2 in + T R^2 out + T^2 R out`` multiply-adds; forming
the ``T`` weight gradients explicitly costs ``T R out in + T^2 out in``. :func:`gramian` picks the cheaper one
per layer. **Convolutions** (2-D, any stride/padding/dilation, ``groups=1``) are the same with ``X`` replaced by
the unfolded input (``R = N * L`` patches, ``in = C_in k_h k_w``).

**Output gradients without weight gradients.** The layers are found in the autograd graph (no hooks, no
module types: an ``addmm``/``mm`` node whose right factor is a chosen parameter, or a convolution node), and the
``D_t`` are requested at the layers' outputs (autograd ``GradientEdge`` s), so autograd computes only input
gradients through the trunk, never a weight gradient. Parameters that are neither (norm layers, embeddings,
weights used more than once) get their ``T`` gradients explicitly from the same passes, one parameter at a
time (``T x numel`` at most).

**Heads once, trunk batched.** A node of the graph reached by one part only carries that part's gradient, so
one backward of ``sum_t L_t`` with post-hooks on the last part-owned nodes yields every part's gradient where
the heads enter the shared trunk (:func:`_split`). From there one backward ``vmap``-ed over the ``T`` parts
(``torch.autograd.grad(..., is_grads_batched=True)``) runs through the trunk, with an automatic fallback (and
a warning) to ``T`` sequential passes where ``vmap`` cannot run the backward (some compiled modules, RNN
kernels, custom autograd functions); ``batched=False`` runs the sequential passes directly. When the split
does not apply (a part computed from another part, or non-shared parameters requested) the per-part passes
start from the parts themselves (:func:`batched_grads`).

:func:`gramian_reference` is the definition (``T`` backward passes, explicit ``J``, ``J J^T``), used by the tests.

**torch.compile.** A compiled net is ONE autograd node (``CompiledFunctionBackward``) between its inputs and
parameters and its outputs: no layer is visible, so every parameter gets its ``T`` gradients explicitly through
the compiled backward, in sequential passes (``vmap`` cannot run it). Graphs compiled inside lossport's
forward pass are compiled so that their backward can run several times (:func:`retainable_compile`), since
these passes retain the graph; a graph compiled elsewhere with donated buffers raises an error that says so.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge

from .graph import _COMPILED, _SHARED, _owners, has_compiled_node
from .graph import retained_grad as _grad

__all__ = [
    "batched_grads",
    "check_reached",
    "cross_gramian",
    "feature_gramian",
    "gramian",
    "gramian_reference",
    "has_compiled_node",
    "jacobian",
    "retainable_compile",
]


# ---------------------------------------------------------------------------------------------------------
# torch.compile'd graphs
# ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def retainable_compile(*, donated: bool = False) -> Iterator[None]:
    """Inside: graphs that ``torch.compile`` compiles (forward, or a backward compiled lazily at its first run)
    can run their backward several times with ``retain_graph=True``, as the Gramian balancers,
    :func:`lossport.inspection.monitor` and the surgery methods do: no donated buffers
    (``torch._functorch.config.donated_buffer = False``, unless ``donated=True``) and no reuse of the saved
    activations' memory by the inductor kernels (``torch._inductor.config.inplace_buffers`` and
    ``allow_buffer_reuse`` False: with them, torch 2.13's inductor on the CPU overwrites saved activations and a
    second retained pass returns wrong gradients). Scoped: the settings are restored on exit and graphs compiled
    outside are not affected. :class:`lossport.Objective` runs the net's forward inside it, and the retained
    passes run inside it; nothing is imported when torch.compile was never used."""
    keys = _KEYS if donated else _KEYS_DONATED
    changed: list[tuple[Any, str]] = []
    try:
        for name, key in keys:
            config = sys.modules.get(name)  # loaded by torch.compile: absent, no net is compiled
            if config is not None and getattr(config, key, False):
                setattr(config, key, False)  # plain attributes: config.patch costs ~80 us a call
                changed.append((config, key))
        yield
    finally:
        for config, key in changed:
            setattr(config, key, True)


_KEYS = (("torch._inductor.config", "inplace_buffers"), ("torch._inductor.config", "allow_buffer_reuse"))
_KEYS_DONATED = (*_KEYS, ("torch._functorch.config", "donated_buffer"))


def check_reached(parts: Sequence[Tensor], features: Sequence[Tensor]) -> None:
    """Raise ``ValueError`` when no part's autograd graph consumes one of the ``features`` tensors (its Gramian
    would be zero, silently)."""
    edges: set[_Key] = set()
    stop = {id(f.grad_fn) for f in features if f.grad_fn is not None}  # the trunk below is not walked
    seen: set[int] = set()
    stack = [p.grad_fn for p in parts if p.grad_fn is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for nxt, nr in node.next_functions:
            if nxt is not None:
                edges.add((id(nxt), int(nr)))
                if id(nxt) not in stop:
                    stack.append(nxt)
    for k, f in enumerate(features):
        if _key(f) in edges:
            continue
        hint = ""
        if type(f.grad_fn).__name__ == _COMPILED:
            hint = (
                " It is an output of a torch.compile'd graph that also computes the heads, whose graph is hidden "
                "inside it: give features= the module that computes the representation (lossport then splits the "
                "compiled graph there), or compile the trunk and the heads separately"
            )
        raise ValueError(
            f"feature_gramian: no loss part is computed from the representation (tensor {k}, shape "
            f"{tuple(f.shape)}), so its Gramian would be zero; give the representation the heads read.{hint}"
        )


# ---------------------------------------------------------------------------------------------------------
# batched vector-Jacobian products
# ---------------------------------------------------------------------------------------------------------
def batched_grads(
    parts: Sequence[Tensor], inputs: Sequence[Tensor | GradientEdge], *, batched: bool | None = None
) -> list[Tensor | None]:
    """Per-part gradients of the scalar ``parts`` with respect to each of ``inputs``: entry ``k`` has shape
    ``(T, *inputs[k].shape)`` (row ``t`` is ``dL_t / d inputs[k]``), or is ``None`` if no part reaches it.

    ``batched=True``: one backward ``vmap``-ed over the ``T`` unit vectors, falling back (with a warning) to
    ``T`` sequential passes where ``vmap`` cannot run the backward. ``batched=False``: the ``T`` sequential
    passes. ``None`` (default): sequential on the CPU, where it measured faster for whole graphs (``vmap`` runs
    some loss backward formulas through a per-example loop and does ``T^2`` work in the heads), batched
    elsewhere. (:func:`gramian` first splits the heads off in one backward and then runs the trunk batched by
    default: there the batched pass measured about 10-15% faster on the CPU as well.)
    The graph is always retained (the balanced backward comes after).
    """
    T = len(parts)
    live = [t for t, p in enumerate(parts) if p.requires_grad]
    if not inputs or not live:
        return [None] * len(inputs)
    outs = [parts[t] for t in live]
    _check_scalars(parts)
    if batched is None:  # vmap cannot run a compiled backward: sequential passes there
        batched = outs[0].device.type != "cpu" and not has_compiled_node(outs)
    if batched and len(live) > 1:
        eye = torch.eye(len(live), dtype=outs[0].dtype, device=outs[0].device)
        try:
            gs = torch.autograd.grad(
                outs,
                list(inputs),  # type: ignore[arg-type]  # tensors and edges mixed: accepted at run time
                grad_outputs=[eye[:, i].reshape((len(live), *o.shape)) for i, o in enumerate(outs)],
                is_grads_batched=True,
                retain_graph=True,
                allow_unused=True,
            )
            return [_scatter(g, live, T) for g in gs]
        except (RuntimeError, NotImplementedError) as err:
            warnings.warn(
                f"lossport.gramian: the batched backward failed ({type(err).__name__}: {str(err)[:200]}); "
                "using one backward pass per part instead (pass batched=False to skip the attempt)",
                RuntimeWarning,
                stacklevel=3,
            )
    rows: list[list[Tensor | None]] = [[None] * len(live) for _ in inputs]
    for i, out in enumerate(outs):
        gs = _grad(out, list(inputs), retain_graph=True, allow_unused=True)
        for k, g in enumerate(gs):
            rows[k][i] = g
    result: list[Tensor | None] = []
    for r in rows:
        first = next((g for g in r if g is not None), None)
        if first is None:
            result.append(None)
        else:
            result.append(_scatter(torch.stack([torch.zeros_like(first) if g is None else g for g in r]), live, T))
    return result


def _check_scalars(parts: Sequence[Tensor]) -> None:
    for t, p in enumerate(parts):
        if p.numel() != 1:
            raise ValueError(f"part {t} has shape {tuple(p.shape)}: loss parts must be scalars (reduce them first)")


def _scatter(g: Tensor | None, live: list[int], T: int) -> Tensor | None:
    if g is None or len(live) == T:
        return g
    out = g.new_zeros((T, *g.shape[1:]))
    out[live] = g
    return out


def _vjps(
    outputs: Sequence[Tensor | GradientEdge],
    cotangents: Sequence[Tensor],
    inputs: Sequence[Tensor | GradientEdge],
    batched: bool,
) -> list[Tensor | None]:
    """Entry ``k``: ``(T, *inputs[k].shape)`` with row ``t`` = ``sum_j cotangents[j][t] . d outputs[j] / d inputs[k]``
    (``None`` where no output reaches ``inputs[k]``). Batched with sequential fallback, or sequential."""
    T = cotangents[0].shape[0]
    if not inputs:
        return []
    if batched and T > 1:
        try:
            return list(
                torch.autograd.grad(
                    list(outputs),  # type: ignore[arg-type]
                    list(inputs),  # type: ignore[arg-type]
                    grad_outputs=list(cotangents),
                    is_grads_batched=True,
                    retain_graph=True,
                    allow_unused=True,
                )
            )
        except (RuntimeError, NotImplementedError) as err:
            warnings.warn(
                f"lossport.gramian: the batched backward failed ({type(err).__name__}: {str(err)[:200]}); "
                "using one backward pass per part instead (pass batched=False to skip the attempt)",
                RuntimeWarning,
                stacklevel=3,
            )
    rows: list[list[Tensor | None]] = [[None] * T for _ in inputs]
    for t in range(T):
        gs = _grad(
            list(outputs),
            list(inputs),
            grad_outputs=[c[t] for c in cotangents],
            retain_graph=True,
            allow_unused=True,
        )
        for k, g in enumerate(gs):
            rows[k][t] = g
    out: list[Tensor | None] = []
    for r in rows:
        first = next((g for g in r if g is not None), None)
        out.append(None if first is None else torch.stack([torch.zeros_like(first) if g is None else g for g in r]))
    return out


# ---------------------------------------------------------------------------------------------------------
# splitting the parts from the shared trunk in one backward
# ---------------------------------------------------------------------------------------------------------
_Key = tuple[int, int]


@dataclass
class _Split:
    """Per-part gradients at the edges where the parts' own graphs (heads) enter the shared graph (trunk)."""

    targets: list[tuple[object, int]]  # (node, output_nr) of the shared side of each frontier edge
    grads: list[Tensor]  # per target: T x shape, row t = dL_t / d(target), zero where part t does not reach it

    def index(self) -> dict[_Key, int]:
        return {(id(n), nr): k for k, (n, nr) in enumerate(self.targets)}


def _split(parts: Sequence[Tensor], owner: dict[int, int] | None = None) -> _Split | None:
    """Per-part gradients at the frontier between part-owned nodes and shared nodes, from ONE backward of
    ``sum_t L_t``: a node reached by a single part only carries that part's gradient, so post-hooks on the
    frontier nodes (the last ones owned by a part) read each part's contribution separately. ``None`` when a
    part's own output node is shared (a part computed from another part) or a part is a leaf."""
    T = len(parts)
    live = [t for t, p in enumerate(parts) if p.requires_grad]
    if len(live) < 2 or any(parts[t].grad_fn is None for t in live):
        return None
    if owner is None:
        owner = _owners([parts[t] for t in live])
    roots = [parts[t].grad_fn for t in live]
    if any(owner.get(id(r)) == _SHARED for r in roots):
        return None
    frontier: list[tuple[object, int, list[tuple[int, _Key]]]] = []  # node, live index, (input slot, target)
    targets: dict[_Key, tuple[object, int]] = {}
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        own = owner[id(node)]
        slots = []
        for i, (nxt, nr) in enumerate(node.next_functions):  # type: ignore[union-attr]
            if nxt is None:
                continue
            if owner.get(id(nxt)) == _SHARED:
                key = (id(nxt), int(nr))
                targets.setdefault(key, (nxt, int(nr)))
                slots.append((i, key))
            elif id(nxt) not in seen:
                stack.append(nxt)
        if slots:
            frontier.append((node, own, slots))
    if not targets:
        return None
    keys = list(targets)
    pos = {k: j for j, k in enumerate(keys)}
    acc: list[list[Tensor | None]] = [[None] * T for _ in keys]

    def make_hook(t: int, slots: list[tuple[int, _Key]]):  # type: ignore[no-untyped-def]
        def hook(grad_inputs: tuple[Tensor | None, ...], grad_outputs: tuple[Tensor | None, ...]) -> None:
            for i, key in slots:
                g = grad_inputs[i]
                if g is not None:
                    j = pos[key]
                    prev = acc[j][t]
                    acc[j][t] = g if prev is None else prev + g

        return hook

    handles = [
        node.register_hook(make_hook(live[own], slots))  # type: ignore[attr-defined]
        for node, own, slots in frontier
    ]
    try:
        total = parts[live[0]]
        for t in live[1:]:
            total = total + parts[t]
        _grad(
            total,
            [GradientEdge(*targets[k]) for k in keys],  # type: ignore[arg-type]
            retain_graph=True,
            allow_unused=True,
        )
    finally:
        for h in handles:
            h.remove()
    grads = []
    for row in acc:
        first = next((g for g in row if g is not None), None)
        if first is None:
            return None
        grads.append(torch.stack([torch.zeros_like(first) if g is None else g for g in row]))
    return _Split([targets[k] for k in keys], grads)


# ---------------------------------------------------------------------------------------------------------
# finding the layers whose share of G can be contracted
# ---------------------------------------------------------------------------------------------------------
@dataclass
class _Layer:
    """A Linear or Conv2d application: ``out = node(x; weight, bias)``; ``D`` is read at ``(node, 0)``."""

    node: object
    weight: Tensor | None  # None when the weight is not one of the chosen parameters
    bias: Tensor | None
    x: Tensor
    conv: tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]] | None = None
    """(kernel, stride, padding, dilation) of a convolution."""


def _var(node: object | None) -> Tensor | None:
    return getattr(node, "variable", None) if node is not None else None


def _graph(parts: Sequence[Tensor]) -> tuple[list[object], dict[int, int]]:
    """Every autograd node reachable from ``parts`` and the number of edges entering each (by id)."""
    nodes: list[object] = []
    seen: set[int] = set()
    incoming: dict[int, int] = {}
    stack = [p.grad_fn for p in parts if p.grad_fn is not None]
    for n in stack:
        incoming[id(n)] = incoming.get(id(n), 0) + 1
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            incoming[id(nxt)] = incoming.get(id(nxt), 0) + 1
            if id(nxt) not in seen:
                stack.append(nxt)
    return nodes, incoming


def _find_layers(parts: Sequence[Tensor], params: Sequence[Tensor]) -> list[_Layer]:
    """Linear (``addmm``/``mm`` with the weight as the right factor) and 2-D convolution nodes whose weight or
    bias is among ``params`` and used by that node only (a parameter reused elsewhere stays explicit)."""
    wanted = {id(p) for p in params}
    nodes, incoming = _graph(parts)

    def owned(acc: object | None) -> Tensor | None:
        v = _var(acc)
        if v is not None and id(v) in wanted and incoming.get(id(acc), 0) == 1:
            return v
        return None

    layers: list[_Layer] = []
    for node in nodes:
        name = type(node).__name__
        nxt = node.next_functions  # type: ignore[attr-defined]
        if name in ("AddmmBackward0", "MmBackward0"):
            if name == "AddmmBackward0" and (node._saved_alpha != 1 or node._saved_beta != 1):  # type: ignore[attr-defined]
                continue
            w_edge = nxt[-1][0]
            if w_edge is not None and type(w_edge).__name__ == "TBackward0" and incoming.get(id(w_edge), 0) == 1:
                w_edge = w_edge.next_functions[0][0]
            weight = owned(w_edge)
            x = node._saved_mat1 if name == "AddmmBackward0" else node._saved_self  # type: ignore[attr-defined]
            bias = None
            if name == "AddmmBackward0":
                b = owned(nxt[0][0])
                n_out = node._saved_mat2_sym_sizes[1]  # type: ignore[attr-defined]
                if b is not None and b.numel() == n_out and b.dim() <= 2:
                    bias = b
            if (weight is not None and weight.dim() == 2) or bias is not None:
                if weight is not None and weight.dim() != 2:
                    weight = None
                if x is not None and x.dim() == 2:
                    layers.append(_Layer(node, weight, bias, x))
        elif name == "ConvolutionBackward0":
            if node._saved_transposed or node._saved_groups != 1:  # type: ignore[attr-defined]
                continue
            weight, bias = owned(nxt[1][0]), owned(nxt[2][0])
            x = node._saved_input  # type: ignore[attr-defined]
            if (weight is None and bias is None) or x is None or x.dim() != 4:
                continue
            w_shape = node._saved_weight.shape  # type: ignore[attr-defined]
            conv = (
                (int(w_shape[2]), int(w_shape[3])),
                tuple(int(s) for s in node._saved_stride),  # type: ignore[attr-defined]
                tuple(int(s) for s in node._saved_padding),  # type: ignore[attr-defined]
                tuple(int(s) for s in node._saved_dilation),  # type: ignore[attr-defined]
            )
            if any(len(c) != 2 for c in conv):
                continue
            layers.append(_Layer(node, weight, bias, x, conv))  # type: ignore[arg-type]
    return layers


# ---------------------------------------------------------------------------------------------------------
# one layer's share of G
# ---------------------------------------------------------------------------------------------------------
def _rows(layer: _Layer, D: Tensor) -> tuple[Tensor, Tensor]:
    """``(A, D)`` with ``A`` (``R x in``) the layer's input rows and ``D`` (``T x R x out``) its output gradients."""
    T = D.shape[0]
    if layer.conv is None:
        return layer.x, D.reshape(T, -1, D.shape[-1])
    kernel, stride, padding, dilation = layer.conv
    U = F.unfold(layer.x, kernel, dilation=dilation, padding=padding, stride=stride)  # N x in x L
    A = U.transpose(1, 2).reshape(-1, U.shape[1])  # (N L) x in
    Dr = D.reshape(T, D.shape[1], D.shape[2], -1).permute(0, 1, 3, 2).reshape(T, -1, D.shape[2])  # T x (N L) x out
    return A, Dr


def _layer_gramian(layer: _Layer, D: Tensor) -> Tensor:
    """``G_l`` of one layer: the Gramian of its per-part weight (and bias) gradients, in ``D``'s dtype."""
    A, D = _rows(layer, D)
    A = A.detach().to(D.dtype)
    T, R, n_out = D.shape
    n_in = A.shape[1]
    has_w, has_b = layer.weight is not None, layer.bias is not None
    if not has_w:  # bias only: its gradient is the column sum of D
        gb = D.sum(1)
        return gb @ gb.T
    contract = R * R * n_in + T * R * R * n_out + T * T * R * n_out
    explicit = T * R * n_out * n_in + T * T * n_out * n_in
    if contract < explicit:
        K = A @ A.T
        if has_b:
            K = K + 1.0
        Dr = D.transpose(0, 1).contiguous()  # R x T x out: K D_t for every t is then one matrix product
        KD = (K @ Dr.reshape(R, T * n_out)).reshape(R, T, n_out)
        return torch.bmm(Dr, KD.transpose(1, 2)).sum(0)
    gw = (D.transpose(1, 2).reshape(T * n_out, R) @ A).reshape(T, n_out * n_in)
    if has_b:
        gw = torch.cat([gw, D.sum(1)], dim=1)
    return gw @ gw.T


# ---------------------------------------------------------------------------------------------------------
# the cross Gramian J_1 J_2^T of two batches (params path)
# ---------------------------------------------------------------------------------------------------------
def cross_gramian(
    parts1: Sequence[Tensor], parts2: Sequence[Tensor], params: Sequence[Tensor], *, batched: bool | None = None
) -> Tensor:
    """``M = J_1 J_2^T`` (``T_1 x T_2``, float64): ``M[t, s] = <grad_params L^1_t, grad_params L^2_s>`` for the
    parts of two different forward passes (two batches) through the same ``params``, without forming ``J_1`` or
    ``J_2``. SDMGrad's and MoDo's weights move on it (an unbiased estimate of ``E[J] E[J]^T``: Xiao et al. 2023,
    Algorithm 1; Chen et al. 2024, Algorithm 1).

    A Linear or Conv2d layer whose weight (and bias) each graph uses in one node only contributes, with ``X_i``
    its input rows and ``D^i_t`` its output gradients in batch ``i``,

        M_l[t, s] = <D^1_t^T [X_1, 1], D^2_s^T [X_2, 1]> = <D^1_t, K_12 D^2_s>,   K_12 = X_1 X_2^T + 1  (R_1 x R_2),

    or ``<g^1_t, g^2_s>`` from the explicit weight gradients when that is cheaper (as :func:`gramian` decides
    per layer). Other parameters (norm layers, embeddings, weights used twice, or a layer found in one graph
    only) get their per-part gradients explicitly in both graphs. A part that does not reach a parameter has a
    zero gradient there. The products are formed in float64 from the parameters' dtype (SDMGrad's inner loop
    amplifies rounding in ``M`` about a hundredfold). ``batched``: :func:`batched_grads`. Both graphs are
    retained."""
    params = list(params)
    T1, T2 = len(parts1), len(parts2)
    ref = [*parts1, *parts2]
    M = torch.zeros(T1, T2, dtype=torch.float64, device=ref[0].device if ref else None)
    if T1 == 0 or T2 == 0 or not params:
        return M
    _check_scalars(parts1)
    _check_scalars(parts2)
    ids = [id(p) for p in params]
    if len(set(ids)) != len(ids):
        raise ValueError("cross_gramian: params lists a tensor twice; give each parameter once")
    pairs = _match_layers(_find_layers(parts1, params), _find_layers(parts2, params))
    covered = {id(t) for lay, _ in pairs for t in (lay.weight, lay.bias) if t is not None}
    explicit: list[Tensor | GradientEdge] = [p for p in params if id(p) not in covered]
    n = len(pairs)
    edges1: list[Tensor | GradientEdge] = [GradientEdge(a.node, 0) for a, _ in pairs]  # type: ignore[arg-type]
    edges2: list[Tensor | GradientEdge] = [GradientEdge(b.node, 0) for _, b in pairs]  # type: ignore[arg-type]
    g1 = _per_part_grads(parts1, [*edges1, *explicit], params, batched)
    g2 = _per_part_grads(parts2, [*edges2, *explicit], params, batched)
    for (a, b), D1, D2 in zip(pairs, g1[:n], g2[:n]):
        if D1 is not None and D2 is not None:
            M += _layer_cross(a, D1, b, D2)
    for x, y in zip(g1[n:], g2[n:]):
        if x is not None and y is not None:
            M += x.reshape(T1, -1).to(torch.float64) @ y.reshape(T2, -1).to(torch.float64).T
    return M


def _match_layers(one: list[_Layer], two: list[_Layer]) -> list[tuple[_Layer, _Layer]]:
    """Pairs of layers of the two graphs with the same weight and bias (same orientation of a Linear weight)."""

    def key(lay: _Layer) -> tuple[int | None, int | None, str]:
        w_edge = lay.node.next_functions[-1][0]  # type: ignore[attr-defined]
        kind = "conv" if lay.conv is not None else type(w_edge).__name__  # TBackward0: x W^T; else x W
        w, b = lay.weight, lay.bias
        return (None if w is None else id(w), None if b is None else id(b), kind if w is not None else "")

    by_key = {key(b): b for b in two}
    return [(a, by_key[key(a)]) for a in one if key(a) in by_key]


def _weight_rows(A: Tensor, D: Tensor, bias: bool) -> Tensor:
    """The ``T`` explicit gradients (``T x out*in`` [+ ``out``]) of a layer with input rows ``A`` and output
    gradients ``D`` (``T x R x out``)."""
    T, R, n_out = D.shape
    g = (D.transpose(1, 2).reshape(T * n_out, R) @ A).reshape(T, -1)
    return torch.cat([g, D.sum(1)], dim=1) if bias else g


def _layer_cross(one: _Layer, D1: Tensor, two: _Layer, D2: Tensor) -> Tensor:
    """One layer's share of ``J_1 J_2^T`` (``T_1 x T_2``), by the cheaper of the two ways, in float64."""
    A1, D1 = _rows(one, D1)
    A2, D2 = _rows(two, D2)
    f64 = torch.float64
    A1, A2, D1, D2 = A1.detach().to(f64), A2.detach().to(f64), D1.to(f64), D2.to(f64)
    T1, R1, n_out = D1.shape
    T2, R2, _ = D2.shape
    n_in = A1.shape[1]
    has_b = one.bias is not None
    if one.weight is None:  # bias only: its gradient is the column sum of D
        return D1.sum(1) @ D2.sum(1).T
    contract = R1 * R2 * n_in + T2 * R1 * R2 * n_out + T1 * T2 * R1 * n_out
    explicit = (T1 * R1 + T2 * R2) * n_out * n_in + T1 * T2 * n_out * n_in
    if contract < explicit:
        K = A1 @ A2.T
        if has_b:
            K = K + 1.0
        KD = (K @ D2.transpose(0, 1).reshape(R2, T2 * n_out)).reshape(R1, T2, n_out)
        return torch.bmm(D1.transpose(0, 1), KD.transpose(1, 2)).sum(0)  # R1 x T1 x T2, summed over rows
    return _weight_rows(A1, D1, has_b) @ _weight_rows(A2, D2, has_b).T


# ---------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------
def gramian(parts: Sequence[Tensor], params: Sequence[Tensor], *, batched: bool | None = None) -> Tensor:
    """Exact ``G[t, s] = <grad_params L_t, grad_params L_s>`` (``T x T``, float64), accumulated layer by layer.

    ``parts``: the ``T`` scalar loss parts (attached to the graph, which is retained). ``params``: the
    parameters the gradients are taken on (usually :func:`lossport.graph.shared_parameters`). A part that does
    not reach a parameter contributes a zero gradient there. Products are formed in the parameters' dtype and
    summed in float64. ``batched``: see :func:`batched_grads`.
    """
    params = list(params)
    T = len(parts)
    device = parts[0].device if parts else None
    G = torch.zeros(T, T, dtype=torch.float64, device=device)
    if T == 0 or not params:
        return G
    _check_scalars(parts)
    ids = [id(p) for p in params]
    if len(set(ids)) != len(ids):
        raise ValueError("gramian: params lists a tensor twice; give each parameter once")
    return _assemble(parts, params, [], [], params, batched)


def _assemble(
    parts: Sequence[Tensor],
    params: list[Tensor],
    layers: list[_Layer],
    ys: list[Tensor],
    rest: list[Tensor],
    batched: bool | None,
) -> Tensor:
    """Sum of the layers' shares (``D`` read at ``ys``) and of the graph-found layers and explicit blocks."""
    T = len(parts)
    G = torch.zeros(T, T, dtype=torch.float64, device=parts[0].device)
    found = _find_layers(parts, rest)
    layers = layers + found
    covered = {id(t) for lay in found for t in (lay.weight, lay.bias) if t is not None}
    explicit = [p for p in rest if id(p) not in covered]
    edges: list[Tensor | GradientEdge] = [*ys, *(GradientEdge(lay.node, 0) for lay in found)]  # type: ignore[arg-type]
    grads = _per_part_grads(parts, [*edges, *explicit], params, batched)
    for lay, D in zip(layers, grads[: len(layers)]):
        if D is not None:
            G += _layer_gramian(lay, D).to(torch.float64)
    for g in grads[len(layers) :]:
        if g is not None:
            Jp = g.reshape(T, -1)
            G += (Jp @ Jp.T).to(torch.float64)
    return G


def _linear_heads_gramian(parts: Sequence[Tensor], z: Tensor) -> Tensor | None:
    """:func:`feature_gramian` when every part reaches the 2-D representation ``z`` through exactly one Linear
    node of its own (``addmm``/``mm`` with ``z`` as left factor); ``None`` otherwise."""
    T = len(parts)
    live = [t for t, p in enumerate(parts) if p.requires_grad]
    if z.dim() != 2 or z.grad_fn is None or len(live) < 2 or any(parts[t].grad_fn is None for t in live):
        return None
    heads = _linear_heads(parts, live, z)
    if heads is None:
        return None
    order = sorted(heads)
    outs = [parts[live[i]] for i in order]  # one backward from every part at once (no chain of additions)
    E = _grad(
        outs,
        [GradientEdge(heads[i], 0) for i in order],  # type: ignore[arg-type]
        grad_outputs=[torch.ones_like(p) for p in outs],
        retain_graph=True,
    )
    V = [heads[i]._saved_mat2.detach() for i in order]  # type: ignore[attr-defined]  # width x o_t: Y_t = z @ V
    rows = [live[i] for i in order]
    G = torch.zeros(T, T, dtype=torch.float64, device=z.device)
    if len({e.shape[1] for e in E}) == 1:
        Es, Vs = torch.stack(E), torch.stack(V)  # h x B x o, h x width x o
        C = torch.einsum("tbo,sbp->tsop", Es, Es)
        M = torch.einsum("two,swp->tsop", Vs, Vs)
        sub = (C * M).sum((2, 3))
    else:
        g = torch.stack([(e @ v.T).reshape(-1) for e, v in zip(E, V)])
        sub = g @ g.T
    idx = torch.tensor(rows, device=z.device)
    G[idx.unsqueeze(1), idx.unsqueeze(0)] = sub.to(torch.float64)
    return G


def _linear_heads(parts: Sequence[Tensor], live: list[int], z: Tensor) -> dict[int, object] | None:
    """``{i: node}``: the one ``addmm``/``mm`` node through which live part ``live[i]`` reaches ``z`` (as the
    left factor, unscaled), for the parts that reach ``z``; ``None`` when some part reaches ``z`` otherwise
    (twice, through another op, through another output of ``z``'s node) or when two parts meet above ``z``
    (then their gradients at a head's output would mix). One walk of the graph above ``z``, stopping at it."""
    zid, znr = id(z.grad_fn), int(z.output_nr)
    owner: dict[int, int] = {}  # node above z -> the live index of the part reaching it
    z_edges: dict[int, list[tuple[object, int]]] = {}  # live index -> [(node, input slot)] pointing at z's node
    for i, t in enumerate(live):
        root: Any = parts[t].grad_fn
        if id(root) == zid:
            return None  # a part computed from z by no op of its own
        stack = [root]
        while stack:
            node = stack.pop()
            o = owner.get(id(node))
            if o == i:
                continue
            if o is not None:
                return None  # two parts meet above z
            owner[id(node)] = i
            for slot, (nxt, nr) in enumerate(node.next_functions):
                if nxt is None:
                    continue
                if id(nxt) == zid:
                    if int(nr) != znr:
                        return None
                    z_edges.setdefault(i, []).append((node, slot))
                else:
                    stack.append(nxt)
    heads: dict[int, object] = {}
    for i, found in z_edges.items():
        if len(found) != 1:
            return None
        head: Any = found[0][0]
        name = type(head).__name__
        if found[0][1] != {"AddmmBackward0": 1, "MmBackward0": 0}.get(name):
            return None
        if name == "AddmmBackward0" and (head._saved_alpha != 1 or head._saved_beta != 1):
            return None
        heads[i] = head
    return heads or None


def _key(x: Tensor | GradientEdge) -> _Key:
    e = x if isinstance(x, GradientEdge) else get_gradient_edge(x)
    return (id(e.node), int(e.output_nr))


def _per_part_grads(
    parts: Sequence[Tensor], inputs: list[Tensor | GradientEdge], params: list[Tensor], batched: bool | None
) -> list[Tensor | None]:
    """``batched_grads(parts, inputs)``, in two stages when every parameter is shared by several parts: one
    backward through all heads at once (:func:`_split`), then ``T`` backward passes (or one batched) through
    the trunk only, starting from the frontier with each part's gradient there."""
    live = [p for p in parts if p.requires_grad]
    if len(live) < 2 or any(p.grad_fn is None for p in live):
        return batched_grads(parts, inputs, batched=batched)
    owner = _owners(live)
    if any(owner.get(_key(p)[0]) != _SHARED for p in params):
        return batched_grads(parts, inputs, batched=batched)
    sp = _split(parts, owner)
    if sp is None:
        return batched_grads(parts, inputs, batched=batched)
    index = sp.index()
    trunk = [(GradientEdge(n, nr), g) for (n, nr), g in zip(sp.targets, sp.grads) if _var(n) is None]  # type: ignore[arg-type]
    below, compiled = _below([e.node for e, _ in trunk])
    if any(_var(n) is None and id(n) in below for n, _ in sp.targets):
        # a frontier node that is also fed from another frontier node: not two clean stages
        return batched_grads(parts, inputs, batched=batched)
    out: list[Tensor | None] = [None] * len(inputs)
    rest = []
    for k, x in enumerate(inputs):
        key = _key(x)
        j = index.get(key)
        if j is not None:
            out[k] = sp.grads[j]  # a parameter the heads use directly (e.g. tied weights) ...
        if j is None or key[0] in below:
            rest.append(k)  # ... may also be used inside the trunk: both contributions add
    if rest and trunk:
        if batched is None:  # through the trunk only, vmap wins on the CPU too (one big matrix product per layer)
            batched = not compiled  # vmap cannot run a compiled backward
        res = _vjps([e for e, _ in trunk], [g for _, g in trunk], [inputs[k] for k in rest], batched)
        for k, g in zip(rest, res):
            if g is not None:
                prev = out[k]
                out[k] = g if prev is None else prev + g
    return out


def _below(nodes: Sequence[object]) -> tuple[set[int], bool]:
    """Ids of the nodes strictly below ``nodes`` (reachable through their ``next_functions``), and whether
    ``nodes`` or those hold a ``torch.compile``'d node."""
    seen: set[int] = set()
    compiled = any(type(n).__name__ == _COMPILED for n in nodes)
    stack = [n for node in nodes for n, _ in node.next_functions if n is not None]  # type: ignore[attr-defined]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        compiled = compiled or type(node).__name__ == _COMPILED
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return seen, compiled


def jacobian(parts: Sequence[Tensor], params: Sequence[Tensor], *, batched: bool | None = None) -> Tensor:
    """The explicit ``T x P`` Jacobian (row ``t``: the gradient of part ``t`` on ``params``, flattened and
    concatenated in the given order; zeros where a part does not reach a parameter). For methods that need more
    than the Gramian (GradDrop's sign masks, DB-MTL's gradient history). Memory ``T x P``: prefer :func:`gramian`.
    """
    params = list(params)
    T = len(parts)
    _check_scalars(parts)
    grads = _per_part_grads(parts, list(params), params, batched)  # heads once, then the trunk batched
    cols = [
        (torch.zeros((T, p.numel()), dtype=p.dtype, device=p.device) if g is None else g.reshape(T, -1))
        for p, g in zip(params, grads)
    ]
    if not cols:
        return torch.zeros((T, 0), dtype=parts[0].dtype if parts else None, device=parts[0].device if parts else None)
    return torch.cat(cols, dim=1)


def gramian_reference(parts: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    """``J J^T`` (float64) from ``T`` plain backward passes: the definition, for tests."""
    params = list(params)
    rows = []
    for part in parts:
        gs: Sequence[Tensor | None] = [None] * len(params)
        if part.requires_grad:
            gs = torch.autograd.grad(part, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, gs)]))
    J = torch.stack(rows).to(torch.float64)
    return J @ J.T


def feature_gramian(
    parts: Sequence[Tensor], features: Tensor | Sequence[Tensor], *, batched: bool | None = None
) -> Tensor:
    """Gramian (float64, ``T x T``) of the parts' gradients with respect to a shared representation ``features``
    (one tensor or several, e.g. a pyramid): MGDA-UB's upper bound (Sener & Koltun 2018, section 3.3).

    When the parts' graphs meet only at ``features`` (separate heads on a shared representation), ONE backward
    of ``sum_t L_t`` through the heads yields every part's gradient at once (:func:`_split`); otherwise one
    backward per part through the heads (or one batched backward). When moreover each head starts with a Linear
    layer on ``z`` (``Y_t = z V_t^T + c_t``), ``dL_t/dz = E_t V_t`` with ``E_t = dL_t/dY_t``, and
    ``G[t, s] = <E_t^T E_s, V_t V_s^T>``: the backward stops at the heads' outputs and the ``B x width``
    gradients are never formed. The trunk below ``features`` is never traversed."""
    feats = [features] if isinstance(features, Tensor) else list(features)
    T = len(parts)
    G = torch.zeros(T, T, dtype=torch.float64, device=parts[0].device if parts else None)
    for f in feats:
        if not f.requires_grad:
            raise ValueError("feature_gramian: the representation does not require grad (is it detached?)")
    _check_scalars(parts)
    if len(feats) == 1:
        G_heads = _linear_heads_gramian(parts, feats[0])
        if G_heads is not None:  # some part reaches z through its head: no need to check_reached
            return G_heads
    check_reached(parts, feats)
    grads: list[Tensor | None] | None = None
    sp = _split(parts)
    if sp is not None:
        index = sp.index()
        keys = [_key(f) for f in feats]
        # one backward through all heads suffices when the heads meet only at the representation
        if all(k in keys for k in index):
            grads = [sp.grads[index[k]] if k in index else None for k in keys]
    if grads is None:
        grads = batched_grads(parts, feats, batched=batched)
    for g in grads:
        if g is not None:
            Jf = g.reshape(T, -1)
            G += (Jf @ Jf.T).to(torch.float64)
    return G
