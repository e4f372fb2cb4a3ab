import pytest
import torch
from torch import nn

from lossport.gramian import feature_gramian, gramian, gramian_reference
from lossport.graph import reached_parameters, shared_parameters


def mlp_parts(T=4, bias=True):
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, 16, bias=bias), nn.Tanh(), nn.Linear(16, 16, bias=bias), nn.ReLU())
    heads = nn.ModuleList([nn.Linear(16, 2) for _ in range(T)])
    x = torch.randn(10, 6)
    h = trunk(x)
    return [heads[t](h).pow(2).mean() * (t + 1) for t in range(T)], trunk, heads


@pytest.mark.parametrize("bias", [True, False])
def test_mlp_gramian_matches_definition(bias):
    parts, trunk, _ = mlp_parts(bias=bias)
    params = list(trunk.parameters())
    G, R = gramian(parts, params), gramian_reference(parts, params)
    assert torch.allclose(G, R, rtol=1e-9, atol=1e-12)


def test_cnn_and_norm_layers_use_explicit_blocks():
    torch.manual_seed(1)
    trunk = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.ReLU()
    )
    heads = [nn.Linear(8, 1) for _ in range(3)]
    h = trunk(torch.randn(5, 1, 8, 8))
    parts = [heads[t](h).mean() ** 2 for t in range(3)]
    params = list(trunk.parameters())
    assert torch.allclose(gramian(parts, params), gramian_reference(parts, params), rtol=1e-8, atol=1e-12)


def test_small_transformer():
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
    heads = [nn.Linear(8, 1) for _ in range(3)]
    h = layer(torch.randn(4, 5, 8)).mean(1)
    parts = [(heads[t](h) - t).pow(2).mean() for t in range(3)]
    params = list(layer.parameters())
    assert torch.allclose(gramian(parts, params), gramian_reference(parts, params), rtol=1e-7, atol=1e-10)


def test_part_that_misses_a_layer_and_shared_weight_reuse():
    torch.manual_seed(3)
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    x = torch.randn(4, 3)
    y = b(a(x))
    parts = [y.sum(), a(x).pow(2).sum(), b(b(x)).mean()]  # b used twice in part 3
    params = list(a.parameters()) + list(b.parameters())
    assert torch.allclose(gramian(parts, params), gramian_reference(parts, params), rtol=1e-9, atol=1e-12)


def test_seed_net_reach_and_shared_parameters():
    """The seed's net: A -> B shared, heads C (loss1) and D (loss2)."""
    A, B, C, D = nn.Linear(2, 3), nn.Linear(3, 3), nn.Linear(3, 1), nn.Linear(3, 1)
    h = B(A(torch.randn(5, 2)))
    l1, l2 = C(h).pow(2).mean(), D(h).pow(2).mean()
    ids = lambda ts: {id(t) for t in ts}  # noqa: E731
    assert ids(reached_parameters(l1)) == ids([*A.parameters(), *B.parameters(), *C.parameters()])
    assert ids(reached_parameters(l2)) == ids([*A.parameters(), *B.parameters(), *D.parameters()])
    shared = shared_parameters([l1, l2])
    assert ids(shared) == ids([*A.parameters(), *B.parameters()])
    # output side first: B's parameters before A's
    assert {id(p) for p in shared[:2]} == ids(B.parameters())
    with pytest.raises(ValueError, match="reached by no loss part"):
        shared_parameters([l1, l2], params=[nn.Parameter(torch.zeros(1))])


def test_feature_gramian_is_gram_of_representation_gradients():
    torch.manual_seed(4)
    z = torch.randn(6, 4, requires_grad=True)
    heads = [nn.Linear(4, 1) for _ in range(3)]
    parts = [heads[t](z).pow(2).mean() for t in range(3)]
    J = torch.stack([torch.autograd.grad(p, z, retain_graph=True)[0].reshape(-1) for p in parts]).double()
    assert torch.allclose(feature_gramian(parts, z), J @ J.T)
