"""The Gramian engine against the definition J J^T (T plain backward passes, explicit Jacobian)."""

import warnings

import pytest
import torch
from torch import nn

from lossport.gramian import (
    _find_layers,
    _linear_heads_gramian,
    _split,
    batched_grads,
    feature_gramian,
    gramian,
    gramian_reference,
    jacobian,
)

MODES = [False, True]  # sequential passes, batched (vmap) backward


def close(a, b, rtol=1e-10):
    scale = float(b.abs().max())
    return float((a - b).abs().max()) <= rtol * max(scale, 1e-300)


def mlp_parts(T=4, bias=True, batch=10, width=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(6, width, bias=bias), nn.Tanh(), nn.Linear(width, width, bias=bias), nn.ReLU()).to(
        dtype
    )
    heads = nn.ModuleList([nn.Linear(width, 2) for _ in range(T)]).to(dtype)
    x = torch.randn(batch, 6, generator=g, dtype=dtype)
    h = trunk(x)
    parts = [heads[t](h).sub(t).pow(2).mean() * (t + 1) for t in range(T)]
    return parts, trunk


@pytest.mark.parametrize("batched", MODES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch,width", [(3, 32), (40, 4)])  # contraction cheaper / explicit cheaper
def test_mlp_matches_definition(batched, bias, batch, width):
    parts, trunk = mlp_parts(bias=bias, batch=batch, width=width)
    params = list(trunk.parameters())
    assert len(_find_layers(parts, params)) == 2  # both Linear layers take the fast path
    assert close(gramian(parts, params, batched=batched), gramian_reference(parts, params))


def test_float32_net_agrees_to_float32_precision():
    parts, trunk = mlp_parts(dtype=torch.float32, batch=12, width=24)
    params = list(trunk.parameters())
    G, R = gramian(parts, params), gramian_reference(parts, params)
    assert G.dtype == torch.float64
    assert close(G, R, rtol=1e-5)


def test_cnn_with_strided_padded_dilated_convs_and_batchnorm():
    torch.manual_seed(1)
    trunk = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 3, (3, 2), dilation=(1, 2), bias=False),
        nn.ReLU(),
        nn.Flatten(),
    ).double()
    x = torch.randn(3, 2, 9, 9, dtype=torch.float64)
    h = trunk(x)
    heads = [nn.Linear(h.shape[1], 1).double() for _ in range(3)]
    parts = [(heads[t](h) - t).pow(2).mean() for t in range(3)]
    params = list(trunk.parameters())
    assert sum(lay.conv is not None for lay in _find_layers(parts, params)) == 2
    for batched in MODES:
        assert close(gramian(parts, params, batched=batched), gramian_reference(parts, params))


def test_small_transformer():
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True).double()
    layer.train()
    heads = [nn.Linear(8, 1).double() for _ in range(3)]
    h = layer(torch.randn(4, 5, 8, dtype=torch.float64)).mean(1)
    parts = [(heads[t](h) - t).pow(2).mean() for t in range(3)]
    params = list(layer.parameters())
    assert len(_find_layers(parts, params)) >= 2  # the feed-forward Linears on 3-D input
    for batched in MODES:
        assert close(gramian(parts, params, batched=batched), gramian_reference(parts, params), rtol=1e-9)


def test_reused_weight_part_missing_a_layer_and_plain_matmul():
    torch.manual_seed(3)
    a, b = nn.Linear(3, 3).double(), nn.Linear(3, 3).double()
    W = nn.Parameter(torch.randn(3, 2, dtype=torch.float64))  # used as x @ W (no transpose)
    x = torch.randn(4, 3, dtype=torch.float64)
    y = b(a(x))
    parts = [(y @ W).sum(), a(x).pow(2).sum(), b(b(x)).mean()]  # part 2 misses b and W; b used twice in part 3
    params = [*a.parameters(), *b.parameters(), W]
    for batched in MODES:
        assert close(gramian(parts, params, batched=batched), gramian_reference(parts, params))


def test_part_that_reaches_nothing_has_zero_row_and_duplicate_params_raise():
    parts, trunk = mlp_parts(T=2)
    const = torch.tensor(3.0, dtype=torch.float64)
    params = list(trunk.parameters())
    G = gramian([parts[0], const, parts[1]], params)
    assert torch.all(G[1] == 0) and torch.all(G[:, 1] == 0)
    assert close(G[[0, 2]][:, [0, 2]], gramian_reference(parts, params))
    with pytest.raises(ValueError, match="twice"):
        gramian(parts, params + params[:1])


class _NumpyScale(torch.autograd.Function):
    """Backward through numpy: vmap cannot batch it."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return torch.as_tensor(g.detach().numpy() * 2).reshape(g.shape)


def test_batched_falls_back_to_sequential_with_a_warning():
    torch.manual_seed(6)
    trunk = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 5)).double()
    heads = [nn.Linear(5, 1).double() for _ in range(3)]
    h = _NumpyScale.apply(trunk(torch.randn(4, 3, dtype=torch.float64)))  # vmap cannot run the trunk's backward
    parts = [(heads[t](h) - t).pow(2).mean() for t in range(3)]
    params = list(trunk.parameters())
    with pytest.warns(RuntimeWarning, match="one backward pass per part"):
        G = gramian(parts, params, batched=True)
    assert close(G, gramian_reference(parts, params))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert close(gramian(parts, params, batched=False), G)


@pytest.mark.parametrize("batched", MODES)
def test_split_at_the_trunk_output_in_awkward_graphs(batched):
    """The one-backward split through the heads, where the frontier is a Linear output, a parameter used
    directly by the heads, or absent (a part computed from another part; head parameters requested)."""
    torch.manual_seed(7)
    trunk = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 4)).double()  # ends with a Linear
    scale = nn.Parameter(torch.randn(4, dtype=torch.float64))  # shared, used directly by every head
    heads = [nn.Linear(4, 2).double() for _ in range(3)]
    h = trunk(torch.randn(5, 3, dtype=torch.float64))
    parts = [heads[t](h * scale).sub(t).pow(2).mean() for t in range(3)]
    params = [*trunk.parameters(), scale]
    assert _split(parts) is not None
    assert close(gramian(parts, params, batched=batched), gramian_reference(parts, params))
    with_head = [*params, *heads[0].parameters()]
    assert close(gramian(parts, with_head, batched=batched), gramian_reference(parts, with_head))
    chained = [parts[0], parts[0] * 2 + parts[1], parts[2]]
    assert _split(chained) is None
    assert close(gramian(chained, params, batched=batched), gramian_reference(chained, params))


def test_jacobian_rows_are_the_gradients():
    parts, trunk = mlp_parts(T=3)
    params = list(trunk.parameters())
    for batched in MODES:
        J = jacobian(parts, params, batched=batched)
        assert J.shape == (3, sum(p.numel() for p in params))
        g1 = torch.cat([g.reshape(-1) for g in torch.autograd.grad(parts[1], params, retain_graph=True)])
        assert torch.allclose(J[1], g1, rtol=1e-12, atol=0)


def test_batched_grads_shape_and_unused_input():
    parts, trunk = mlp_parts(T=3)
    unused = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    gs = batched_grads(parts, [trunk[0].weight, unused], batched=True)
    assert gs[0] is not None and gs[0].shape == (3, *trunk[0].weight.shape)
    assert gs[1] is None


@pytest.mark.parametrize("batched", MODES)
def test_feature_gramian_is_gram_of_representation_gradients(batched):
    torch.manual_seed(4)
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    heads = [nn.Linear(4, 1).double() for _ in range(3)]
    parts = [heads[t](z).pow(2).mean() for t in range(3)]
    J = torch.stack([torch.autograd.grad(p, z, retain_graph=True)[0].reshape(-1) for p in parts])
    assert close(feature_gramian(parts, z, batched=batched), J @ J.T)
    with pytest.raises(ValueError, match="does not require grad"):
        feature_gramian(parts, z.detach())


def test_graph_is_retained_for_the_balanced_backward():
    parts, trunk = mlp_parts(T=2)
    gramian(parts, list(trunk.parameters()))
    (parts[0] + parts[1]).backward()
    assert trunk[0].weight.grad is not None


def test_feature_gramian_one_backward_split_and_fallback():
    torch.manual_seed(8)
    trunk = nn.Linear(3, 4).double()
    z = torch.tanh(trunk(torch.randn(5, 3, dtype=torch.float64)))
    heads = [nn.Linear(4, 1).double() for _ in range(3)]
    parts = [heads[t](z).sub(t).pow(2).mean() for t in range(3)]
    J = torch.stack([torch.autograd.grad(p, z, retain_graph=True)[0].reshape(-1) for p in parts])
    assert _split(parts) is not None
    assert close(feature_gramian(parts, z), J @ J.T)
    # heads that meet again above z (a shared op after z): per-part passes
    zz = z * 2
    parts2 = [heads[t](zz).sum() + heads[t](z).mean() for t in range(3)]
    J2 = torch.stack([torch.autograd.grad(p, z, retain_graph=True)[0].reshape(-1) for p in parts2])
    assert close(feature_gramian(parts2, z), J2 @ J2.T)


@pytest.mark.parametrize("outs", [(1, 1, 1), (2, 2, 2), (1, 3, 2)])
def test_feature_gramian_linear_heads_shortcut(outs):
    torch.manual_seed(9)
    trunk = nn.Linear(3, 6).double()
    z = torch.relu(trunk(torch.randn(5, 3, dtype=torch.float64)))
    heads = [nn.Linear(6, o, bias=(o != 3)).double() for o in outs]
    parts = [heads[t](z).sub(t).pow(2).mean() for t in range(len(outs))]
    const = torch.tensor(1.0, dtype=torch.float64)
    parts = [parts[0], const, *parts[1:]]  # a part reaching nothing: zero row
    assert _linear_heads_gramian(parts, z) is not None
    rows = [
        torch.autograd.grad(p, z, retain_graph=True)[0].reshape(-1)
        if p.requires_grad
        else torch.zeros(30, dtype=torch.float64)
        for p in parts
    ]
    J = torch.stack(rows)
    assert close(feature_gramian(parts, z), J @ J.T)
    # a head with two Linear layers on z is not a single Linear: the general path, same result
    parts2 = [parts[0], parts[2] + heads[1](z).sum() * 0.1]
    assert _linear_heads_gramian(parts2, z) is None
    J2 = torch.stack([torch.autograd.grad(p, z, retain_graph=True)[0].reshape(-1) for p in parts2])
    assert close(feature_gramian(parts2, z), J2 @ J2.T)


def test_results_are_detached():
    parts, trunk = mlp_parts(T=3)
    assert not gramian(parts, list(trunk.parameters())).requires_grad
    z = torch.tanh(torch.randn(4, 2, dtype=torch.float64, requires_grad=True) * 2)
    heads = [nn.Linear(2, 1).double() for _ in range(2)]
    assert not feature_gramian([heads[t](z).sum() for t in range(2)], z).requires_grad


@pytest.mark.parametrize("batched", MODES)
def test_tied_weight_used_in_trunk_and_heads_and_trunk_output_reused(batched):
    torch.manual_seed(10)
    emb = nn.Parameter(torch.randn(7, 4, dtype=torch.float64))  # input embedding tied with the output head
    lin = nn.Linear(4, 4).double()
    tok = torch.randint(0, 7, (5,))
    h = torch.tanh(lin(emb[tok]))
    parts = [(h @ emb.T).logsumexp(1).mean(), h.pow(2).mean(), (h @ emb.T)[:, 2].mean()]
    params = [emb, *lin.parameters()]
    assert close(gramian(parts, params, batched=batched), gramian_reference(parts, params))
    # the trunk output feeds the heads both directly and through a shared op
    g = lin(torch.randn(5, 4, dtype=torch.float64))
    s = g * 3
    parts = [(g + s)[:, 0].sum(), (g - s)[:, 1].pow(2).sum(), g[:, 2].mean()]
    params = list(lin.parameters())
    assert close(gramian(parts, params, batched=batched), gramian_reference(parts, params))


def test_feature_gramian_linear_heads_walk_falls_back_where_the_closed_form_does_not_hold():
    torch.manual_seed(10)
    z = torch.tanh(nn.Linear(3, 4).double()(torch.randn(6, 3, dtype=torch.float64)))
    heads = [nn.Linear(4, 1).double() for _ in range(3)]
    shared_head = heads[0](z)
    cases = {
        "a part is z itself, reduced": [heads[1](z).sum(), z.sum()],
        "two parts read one head": [shared_head.sum(), shared_head.pow(2).mean(), heads[2](z).mean()],
        "a part reads z twice": [heads[1](z).sum(), heads[2](z).sum() + heads[2](z * 1).mean()],
    }
    for why, parts in cases.items():
        assert _linear_heads_gramian(parts, z) is None, why
        J = torch.stack([torch.autograd.grad(p, z, retain_graph=True)[0].reshape(-1) for p in parts])
        assert close(feature_gramian(parts, z), J @ J.T), why
    parts = [heads[t](z).sub(t).pow(2).mean() for t in range(3)]
    assert _linear_heads_gramian(parts, z) is not None
