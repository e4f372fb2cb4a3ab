"""The cross Gramian J_1 J_2^T of two batches (lossport.gramian.cross_gramian) against explicit Jacobians."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lossport.gramian import _find_layers, _match_layers, cross_gramian

MODES = [False, True]  # sequential passes, batched (vmap) backward


def explicit(parts, params):
    """The T x P Jacobian from plain backward passes (zero rows and columns where a part does not reach)."""
    rows = []
    for part in parts:
        gs = [None] * len(params)
        if part.requires_grad:
            gs = torch.autograd.grad(part, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, gs)]))
    return torch.stack(rows).to(torch.float64)


def reference(parts1, parts2, params):
    return explicit(parts1, params) @ explicit(parts2, params).T


def close(a, b, rtol=1e-10):
    return float((a - b).abs().max()) <= rtol * max(float(b.abs().max()), 1e-300)


class MLP(nn.Module):
    def __init__(self, T=4, width=16, bias=True):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, width, bias=bias), nn.Tanh(), nn.Linear(width, width, bias=bias))
        self.heads = nn.ModuleList([nn.Linear(width, 2) for _ in range(T)])

    def parts(self, x, names=None):
        h = torch.relu(self.trunk(x))
        names = range(len(self.heads)) if names is None else names
        return [self.heads[t](h).sub(t).pow(2).mean() * (t + 1) for t in names]


def data(n, seed, *shape):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("batched", MODES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch,width", [(3, 32), (40, 4)])  # contraction cheaper / explicit cheaper
def test_mlp_two_batches_matches_explicit_jacobians(batched, bias, batch, width):
    torch.manual_seed(0)
    net = MLP(width=width, bias=bias).double()
    params = list(net.trunk.parameters())
    p1, p2 = net.parts(data(batch, 1, 6)), net.parts(data(batch + 5, 2, 6))  # different batch sizes
    assert len(_match_layers(_find_layers(p1, params), _find_layers(p2, params))) == 2  # both layers contracted
    M = cross_gramian(p1, p2, params, batched=batched)
    R = reference(p1, p2, params)
    assert M.dtype == torch.float64 and M.shape == (4, 4)
    assert not torch.allclose(R, R.T)  # two batches: not symmetric
    assert close(M, R)


def test_same_batch_twice_is_the_gramian():
    torch.manual_seed(0)
    net = MLP().double()
    params = list(net.trunk.parameters())
    parts = net.parts(data(7, 1, 6))
    J = explicit(parts, params)
    assert close(cross_gramian(parts, parts, params), J @ J.T)


@pytest.mark.parametrize("batched", MODES)
def test_cnn_with_strided_convs_batchnorm_and_heads_on_all_parameters(batched):
    torch.manual_seed(1)
    trunk = nn.Sequential(
        nn.Conv2d(3, 5, 3, stride=2, padding=1),
        nn.BatchNorm2d(5),  # neither Linear nor Conv: explicit gradients
        nn.ReLU(),
        nn.Conv2d(5, 4, 3, dilation=2, padding=2, bias=False),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 12),
    ).double()
    heads = nn.ModuleList([nn.Linear(12, 1) for _ in range(3)]).double()

    def parts(x):
        h = trunk(x)
        return [heads[t](h).pow(2).mean() for t in range(3)]

    p1, p2 = parts(data(4, 3, 3, 8, 8)), parts(data(6, 4, 3, 8, 8))
    shared = list(trunk.parameters())
    assert len(_match_layers(_find_layers(p1, shared), _find_layers(p2, shared))) == 3
    assert close(cross_gramian(p1, p2, shared, batched=batched), reference(p1, p2, shared))
    every = [*shared, *heads.parameters()]  # heads: each reached by one part only
    assert close(cross_gramian(p1, p2, every, batched=batched), reference(p1, p2, every))


def test_weights_used_twice_or_differently_in_the_two_graphs():
    torch.manual_seed(2)
    lin = nn.Linear(5, 5).double()  # applied twice in batch 1, once in batch 2
    other = nn.Linear(5, 5).double()
    w = nn.Parameter(torch.randn(5, 5, dtype=torch.float64))  # x @ w in batch 1, F.linear(x, w) in batch 2
    heads = [nn.Linear(5, 1).double() for _ in range(3)]
    x1, x2 = data(6, 5, 5), data(9, 6, 5)
    h1 = torch.tanh(other(lin(torch.tanh(lin(x1))))) @ w
    h2 = F.linear(torch.tanh(other(lin(x2))), w)
    p1 = [heads[t](h1).pow(2).mean() for t in range(3)]
    p2 = [heads[t](h2).pow(2).mean() for t in range(3)]
    params = [*lin.parameters(), *other.parameters(), w]
    pairs = _match_layers(_find_layers(p1, params), _find_layers(p2, params))
    assert [a.weight is other.weight for a, _ in pairs] == [True]  # lin reused, w transposed: explicit
    assert close(cross_gramian(p1, p2, params), reference(p1, p2, params))


def test_missing_parts_constants_and_parts_that_skip_a_layer():
    torch.manual_seed(3)
    net = MLP(T=3).double()
    params = list(net.trunk.parameters())
    x1, x2 = data(5, 7, 6), data(8, 8, 6)
    p1 = net.parts(x1, names=[0, 2])  # part 1 absent from batch 1
    p2 = net.parts(x2)
    p1.append(torch.tensor(0.5, dtype=torch.float64))  # a constant part (no graph)
    skip = net.trunk[0](x2).pow(2).mean()  # reaches the first layer only
    p2.append(skip)
    M = cross_gramian(p1, p2, params)
    assert M.shape == (3, 4)
    assert torch.equal(M[2], torch.zeros(4, dtype=torch.float64))
    assert close(M, reference(p1, p2, params))


def test_float32_parts_agree_to_float32_precision():
    torch.manual_seed(4)
    net = MLP()
    params = list(net.trunk.parameters())
    p1, p2 = net.parts(data(5, 1, 6).float()), net.parts(data(6, 2, 6).float())
    M = cross_gramian(p1, p2, params)
    assert M.dtype == torch.float64
    assert close(M, reference(p1, p2, params), rtol=1e-5)


def test_errors_and_empty_inputs():
    torch.manual_seed(5)
    net = MLP().double()
    params = list(net.trunk.parameters())
    p = net.parts(data(4, 1, 6))
    with pytest.raises(ValueError, match="params lists a tensor twice"):
        cross_gramian(p, p, [params[0], params[0]])
    with pytest.raises(ValueError, match="part 0 has shape"):
        cross_gramian([net.trunk(data(4, 1, 6)).sum(1)], p, params)
    assert cross_gramian([], p, params).shape == (0, 4)
    assert torch.equal(cross_gramian(p, p[:2], []), torch.zeros(4, 2, dtype=torch.float64))
