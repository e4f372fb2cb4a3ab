"""COSMOS and PBI (lossport.balance.preference) against TorchJD 0.18's scalarizers: the balancer's weights are the
gradient of torchjd.scalarization.COSMOS / PBI with respect to the losses, times the stated factor."""

import math

import pytest
import torch
from multihead import MultiHead, multihead_batch
from torchjd import scalarization as S

import lossport
from lossport.balance import COSMOS, PBI, resolve

NAMES = ["a", "b", "c", "d", "e"]


def L(names, values, requires_grad=False):
    v = torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)
    return v, lossport.Losses(parts={k: v[i] * 1 for i, k in enumerate(names)}, weights=dict.fromkeys(names, 1.0))


def weights(bal, names, values):
    _, losses = L(names, values)
    out = bal(losses)
    return torch.tensor([float(out.weights[k]) for k in names], dtype=torch.float64)


def torchjd_grad(scalarizer, values):
    v = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(scalarizer(v), v)
    return g


def cases(seed):
    g = torch.Generator().manual_seed(seed)
    T = 2 + seed % 4
    names = NAMES[:T]
    values = (torch.rand(T, generator=g, dtype=torch.float64) * 3 + 0.01).tolist()
    ray = (torch.rand(T, generator=g, dtype=torch.float64) + 0.05).tolist()
    return names, values, ray


# ------------------------------------------------------------------------------------------------ COSMOS
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("lambda_", [0.0, 0.01, 1.0, 8.0])
def test_cosmos_is_t_times_torchjds_gradient(seed, lambda_):
    names, values, ray = cases(seed)
    T = len(names)
    mine = weights(COSMOS(lambda_=lambda_, ray=dict(zip(names, ray))), names, values)
    r = torch.tensor(ray, dtype=torch.float64)
    ref = torchjd_grad(S.COSMOS(lambda_, weights=r / r.sum()), values)
    assert torch.allclose(mine, T * ref, rtol=1e-9, atol=1e-12)


def test_cosmos_ray_scale_is_normalised_and_uniform_lambda_zero_is_equal_weighting():
    names, values, ray = cases(3)
    a = weights(COSMOS(lambda_=2.0, ray=dict(zip(names, ray))), names, values)
    b = weights(COSMOS(lambda_=2.0, ray={k: 7 * r for k, r in zip(names, ray)}), names, values)
    assert torch.allclose(a, b)
    assert weights(COSMOS(lambda_=0.0), names, values).tolist() == pytest.approx([1.0] * len(names))


def test_cosmos_total_gradient_is_the_scalarizations_and_the_penalty_pulls_towards_the_ray():
    names, vals = ["a", "b"], [1.0, 3.0]
    v, losses = L(names, vals, requires_grad=True)
    out = COSMOS(lambda_=4.0, ray={"a": 0.5, "b": 0.5})(losses)
    (g,) = torch.autograd.grad(out.total, v)
    vv = v.detach().clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(S.COSMOS(4.0, torch.tensor([0.5, 0.5], dtype=torch.float64))(vv), vv)
    assert torch.allclose(g, 2 * gr)
    # b is above the ray (L_b > L_a): the penalty weighs it more than a, and more than linear scalarization does
    assert float(out.weights["b"]) > 1.0 > float(out.weights["a"])
    zero = weights(COSMOS(lambda_=4.0), names, [0.0, 0.0])  # cosine undefined: the ray alone
    assert zero.tolist() == [1.0, 1.0]


def test_cosmos_missing_part_uses_the_ray_of_the_parts_present():
    ray = {"a": 0.2, "b": 0.5, "c": 0.3}
    got = weights(COSMOS(lambda_=1.0, ray=ray), ["a", "c"], [1.0, 2.0])
    ref = weights(COSMOS(lambda_=1.0, ray={"a": 0.2, "c": 0.3}), ["a", "c"], [1.0, 2.0])
    assert torch.equal(got, ref)


# ------------------------------------------------------------------------------------------------ PBI
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("theta", [0.0, 0.5, 5.0])
@pytest.mark.parametrize("with_reference", [False, True])
def test_pbi_is_sqrt_t_times_torchjds_gradient(seed, theta, with_reference):
    names, values, ray = cases(seed)
    T = len(names)
    ref_point = [0.5 * v - 0.1 for v in values] if with_reference else None
    bal = PBI(theta=theta, ray=dict(zip(names, ray)), reference=dict(zip(names, ref_point)) if ref_point else None)
    mine = weights(bal, names, values)
    z = torch.tensor(ref_point, dtype=torch.float64) if ref_point else None
    ref = torchjd_grad(S.PBI(theta, weights=torch.tensor(ray, dtype=torch.float64), reference=z), values)
    assert torch.allclose(mine, math.sqrt(T) * ref, rtol=1e-9, atol=1e-12)


def test_pbi_closed_form_on_and_off_the_ray():
    # on the uniform ray the perpendicular part is 0: b = sqrt(T) w = 1 for every theta
    assert weights(PBI(theta=5.0), ["a", "b"], [2.0, 2.0]).tolist() == pytest.approx([1.0, 1.0])
    assert weights(PBI(theta=0.0), ["a", "b"], [1.0, 3.0]).tolist() == pytest.approx([1.0, 1.0])
    # off the ray: w = (1, 1)/sqrt 2, f = (1, 3): p = (-1, 1), so b = sqrt 2 (w + theta p / sqrt 2) = 1 -/+ theta
    assert weights(PBI(theta=0.5), ["a", "b"], [1.0, 3.0]).tolist() == pytest.approx([0.5, 1.5])


def test_pbi_ideal_reference_tracks_the_minimum_in_training_only_and_round_trips():
    bal = PBI(theta=2.0, reference="ideal")
    weights(bal, ["a", "b"], [2.0, 3.0])
    weights(bal, ["a", "b"], [1.0, 4.0])
    assert bal.ideal == {"a": 1.0, "b": 3.0}
    with torch.no_grad():
        weights(bal, ["a", "b"], [0.1, 0.1])
    assert bal.ideal == {"a": 1.0, "b": 3.0}  # evaluations read the ideal point, they do not move it
    got = weights(bal, ["a", "b"], [1.5, 3.5])
    ref = weights(PBI(theta=2.0, reference={"a": 1.0, "b": 3.0}), ["a", "b"], [1.5, 3.5])
    assert torch.equal(got, ref)
    twin = PBI(theta=2.0, reference="ideal")
    twin.load_state_dict(bal.state_dict())
    for vals in ([0.7, 5.0], [2.0, 2.0]):
        assert torch.equal(weights(bal, ["a", "b"], vals), weights(twin, ["a", "b"], vals))
    assert twin.ideal == bal.ideal == {"a": 0.7, "b": 2.0}


# ------------------------------------------------------------------------------------------------ both
def test_errors_name_the_part_and_the_fix():
    with pytest.raises(ValueError, match="lambda_"):
        COSMOS(lambda_=-1.0)
    with pytest.raises(ValueError, match="theta"):
        PBI(theta=-0.1)
    with pytest.raises(ValueError, match=r"ray entry of part 'b' is 0\.0"):
        COSMOS(ray={"a": 1.0, "b": 0.0})
    with pytest.raises(ValueError, match="reference must be None"):
        PBI(reference="nadir")
    with pytest.raises(ValueError, match="no entry for the parts \\['b'\\]"):
        weights(COSMOS(ray={"a": 1.0}), ["a", "b"], [1.0, 2.0])
    with pytest.raises(ValueError, match="reference has no entry for the parts \\['b'\\]"):
        weights(PBI(reference={"a": 0.0}), ["a", "b"], [1.0, 2.0])
    with pytest.raises(ValueError, match="not finite"):
        weights(PBI(), ["a", "b"], [1.0, float("nan")])


@pytest.mark.parametrize("name", ["cosmos", "pbi"])
def test_train_three_steps(name):
    names = ["a", "b", "c"]
    net = MultiHead(names)
    bal = resolve(name)
    assert bal.kind == "loss"
    r = lossport.train(
        net,
        multihead_batch(names, 7, 48),
        dict.fromkeys(names, "mse"),
        balance=bal,
        epochs=1,
        batch_size=16,
        shuffle=False,
        progress=False,
        seed=0,
    )
    assert len(r.history.batch_values("loss")) == 3
    assert all(math.isfinite(r.history[f"weight/{k}"][-1]) for k in names)
    assert r.history["weight/a"][-1] != r.history["weight/c"][-1]
    assert all(torch.isfinite(p).all() for p in net.parameters())
