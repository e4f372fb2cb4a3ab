import pytest
import torch
from torch import nn

from lossport.graph import reached_parameters, shared_parameters


def ids(ts):
    return {id(t) for t in ts}


def test_seed_net_reach_and_shared_parameters():
    """The seed's net: A -> B shared, heads C (loss1) and D (loss2)."""
    A, B, C, D = nn.Linear(2, 3), nn.Linear(3, 3), nn.Linear(3, 1), nn.Linear(3, 1)
    h = B(A(torch.randn(5, 2)))
    l1, l2 = C(h).pow(2).mean(), D(h).pow(2).mean()
    assert ids(reached_parameters(l1)) == ids([*A.parameters(), *B.parameters(), *C.parameters()])
    assert ids(reached_parameters(l2)) == ids([*A.parameters(), *B.parameters(), *D.parameters()])
    shared = shared_parameters([l1, l2])
    assert ids(shared) == ids([*A.parameters(), *B.parameters()])
    assert len(shared) == 4
    # output side first: B's parameters before A's
    assert ids(shared[:2]) == ids(B.parameters())


def test_given_params_are_checked_and_kept_in_order():
    A, C, D = nn.Linear(2, 3), nn.Linear(3, 1), nn.Linear(3, 1)
    h = A(torch.randn(4, 2))
    l1, l2 = C(h).sum(), D(h).sum()
    chosen = [A.bias, A.weight]
    assert shared_parameters([l1, l2], params=chosen) == chosen
    with pytest.raises(ValueError, match="reached by no loss part"):
        shared_parameters([l1, l2], params=[nn.Parameter(torch.zeros(1))])


def test_no_sharing_constant_part_and_leaf_part():
    a, b = nn.Linear(2, 1), nn.Linear(2, 1)
    x = torch.randn(3, 2)
    l1, l2 = a(x).sum(), b(x).sum()
    assert shared_parameters([l1, l2]) == []
    assert reached_parameters(torch.tensor(1.0)) == []
    leaf = torch.zeros((), requires_grad=True)
    assert reached_parameters(leaf) == [leaf]


def test_three_parts_with_partial_sharing_and_reuse():
    A, B = nn.Linear(2, 2), nn.Linear(2, 2)
    x = torch.randn(3, 2)
    h = A(x)
    l1 = B(h).sum()
    l2 = B(B(h)).sum()  # B reused within one part counts once
    l3 = (h * 2).sum()
    assert ids(shared_parameters([l1, l2])) == ids([*A.parameters(), *B.parameters()])
    assert ids(shared_parameters([l1, l3])) == ids(A.parameters())
    assert ids(shared_parameters([l1, l2, l3])) == ids([*A.parameters(), *B.parameters()])
