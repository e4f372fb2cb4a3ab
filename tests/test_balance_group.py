"""GO4Align (lossport.balance.group): the authors' update computed by hand over three steps."""

import itertools
import math

import pytest
import torch
from torch import nn

import lossport
from lossport.balance import GO4Align, resolve
from lossport.balance.group import kmeans_1d

NAMES = ["a", "b", "c", "d"]
SPEC = dict.fromkeys(NAMES, "mse")


def fake(values, missing=()):
    return lossport.Losses(
        parts={k: torch.tensor(float(v), dtype=torch.float64, requires_grad=True) for k, v in values.items()},
        weights=dict.fromkeys(values, 1.0),
        missing=tuple(missing),
    )


def brute_force_kmeans(x, k):
    """Every assignment of the values to at most k labels; the one of least within-cluster squared error."""
    best, best_cost = None, math.inf
    for labels in itertools.product(range(k), repeat=len(x)):
        cost, means = 0.0, {}
        for g in set(labels):
            members = [v for v, lab in zip(x, labels) if lab == g]
            means[g] = sum(members) / len(members)
            cost += sum((v - means[g]) ** 2 for v in members)
        if cost < best_cost - 1e-12:
            best, best_cost = [means[lab] for lab in labels], cost
    return best, best_cost


def sse(x, centers):
    return sum((v - c) ** 2 for v, c in zip(x, centers))


@pytest.mark.parametrize("seed", range(20))
def test_exact_kmeans_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n = 2 + seed % 6
    x = (torch.rand(n, generator=g) * 10).tolist()
    for k in range(1, min(n, 4) + 1):
        got = kmeans_1d(x, k)
        expected, cost = brute_force_kmeans(x, k)
        assert sse(x, got) == pytest.approx(cost, abs=1e-9)
        assert got == pytest.approx(expected)
    assert kmeans_1d(x, 1) == pytest.approx([sum(x) / n] * n)
    assert kmeans_1d(x, n + 2) == pytest.approx(x)


def test_three_steps_by_hand():
    eta, K = 0.3, 2
    steps = [
        {"a": 1.0, "b": 4.0, "c": 0.5, "d": 2.0},
        {"a": 0.8, "b": 3.0, "c": 0.6, "d": 1.0},
        {"a": 0.5, "b": 2.5, "c": 0.4, "d": 1.2},
    ]
    bal = GO4Align(num_groups=K, robust_step_size=eta)
    p = [0.25] * 4
    for vals in steps:
        L = [vals[k] for k in NAMES]
        p = [pi * math.exp(-eta * li) for pi, li in zip(p, L)]
        p = [pi / sum(p) for pi in p]
        indicators = [pi * sum(L) / li for pi, li in zip(p, L)]
        expected, _ = brute_force_kmeans(indicators, K)
        got = bal(fake(vals)).weights
        assert [got[k] for k in NAMES] == pytest.approx(expected, rel=1e-12)
        assert bal.state_dict()["p"] == pytest.approx(dict(zip(NAMES, p)), rel=1e-12)
    assert len(set(got.values())) == 2  # two groups


def test_one_group_and_uniform_probabilities_give_the_plain_sums_value():
    bal = GO4Align(num_groups=1, robust_step_size=0.0)
    vals = {"a": 1.0, "b": 4.0, "c": 0.5, "d": 2.0}
    losses = bal(fake(vals))
    mean_indicator = sum(sum(vals.values()) / 4 / v for v in vals.values()) / 4
    assert losses.weights == pytest.approx(dict.fromkeys(NAMES, mean_indicator))
    every = GO4Align(num_groups=4, robust_step_size=0.0)(fake(vals))
    assert every.total.item() == pytest.approx(sum(vals.values()))  # each weighted part is mean_j L_j


def test_missing_part_keeps_its_probability_and_no_grad_reads_only():
    bal = GO4Align(num_groups=2, robust_step_size=0.5)
    bal(fake({"a": 1.0, "b": 2.0, "c": 3.0}, missing=["d"]))
    p1 = bal.state_dict()["p"]
    assert p1["d"] == pytest.approx(0.25) and sum(p1.values()) == pytest.approx(1.0)
    bal(fake({"a": 1.0, "b": 2.0, "d": 3.0}, missing=["c"]))
    p2 = bal.state_dict()["p"]
    assert p2["c"] == p1["c"]
    assert p2["a"] + p2["b"] + p2["d"] == pytest.approx(p1["a"] + p1["b"] + p1["d"])
    with torch.no_grad():
        w = bal(fake({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0})).weights
    assert bal.state_dict()["p"] == p2 and len(w) == 4


def test_state_round_trip_and_errors():
    bal = GO4Align(num_groups=2, robust_step_size=0.2)
    g = torch.Generator().manual_seed(0)
    seq = [dict(zip(NAMES, (torch.rand(4, generator=g) + 0.1).tolist())) for _ in range(6)]
    for vals in seq[:3]:
        bal(fake(vals))
    twin = resolve("go4align", num_groups=2, robust_step_size=0.2)
    twin.load_state_dict(bal.state_dict())
    for vals in seq[3:]:
        assert bal(fake(vals)).weights == twin(fake(vals)).weights
    with pytest.raises(ValueError, match=r"GO4Align needs finite losses >= 0.*'b'"):
        bal(fake({"a": 1.0, "b": -1.0}))
    with pytest.raises(ValueError, match="num_groups"):
        GO4Align(num_groups=0)
    with pytest.raises(ValueError, match="robust_step_size"):
        GO4Align(robust_step_size=-1.0)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(4, 16), nn.Tanh())
        self.heads = nn.ModuleDict({k: nn.Linear(16, 1) for k in NAMES})

    def forward(self, x):
        h = self.trunk(x)
        return {k: m(h) for k, m in self.heads.items()}


def test_train_three_steps_with_finite_weights():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, generator=g)
    data = {"x": x, **{k: (i + 1) * x[:, i : i + 1] + 0.1 * i for i, k in enumerate(NAMES)}}
    net = Net()
    r = lossport.train(
        net, data, SPEC, balance="go4align", epochs=1, batch_size=16, shuffle=False, progress=False, seed=0
    )
    assert len(r.history.batch_values("loss")) == 3
    assert all(math.isfinite(r.history[f"weight/{k}"][-1]) and r.history[f"weight/{k}"][-1] > 0 for k in NAMES)
    assert all(torch.isfinite(p).all() for p in net.parameters())
