"""The many-tasks benchmark (``benchmarks/many_tasks.py``): its steps train, its skip rule skips what it says."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "many_tasks.py"
_spec = importlib.util.spec_from_file_location("bench_many_tasks", _PATH)
assert _spec is not None and _spec.loader is not None
mt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mt)


@pytest.mark.parametrize("name", mt.VARIANTS)
def test_every_variant_step_gives_finite_gradients_to_trunk_and_heads(name):
    torch.manual_seed(0)
    m = mt.Model(4, batch=16)
    step = mt.make_step(m, name)
    step()
    step()  # the second call too (balancer state after one step: UW's Adam, FAMO's logits, warm starts)
    grads = [p.grad for p in m.params]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert float(m.trunk[0].weight.grad.abs().sum()) > 0 and float(m.heads[3].weight.grad.abs().sum()) > 0


def test_sum_step_is_the_plain_backward_of_the_sum():
    m = mt.Model(3, batch=8)
    mt.make_step(m, "sum")()
    got = m.trunk[0].weight.grad.clone()
    m.zero()
    _, ls = m.forward()
    (ls[0] + ls[1] + ls[2]).backward()
    torch.testing.assert_close(got, m.trunk[0].weight.grad)


def test_step_gramian_is_the_gramian_of_the_mode():
    m = mt.Model(3, batch=8)
    G = mt.step_gramian(m, "features")
    h, ls = m.forward()
    rows = [torch.autograd.grad(v, h, retain_graph=True)[0].reshape(-1) for v in ls]
    J = torch.stack(rows).double()
    torch.testing.assert_close(G, J @ J.T, rtol=1e-5, atol=1e-9)


def test_clock_skips_a_variant_predicted_over_the_cap_and_says_why(capsys):
    clock = mt.Clock(budget=100.0, max_step=20.0)
    clock.record("slow", 128, 0.5)
    clock.record("slow", 512, 8.0)  # growth T^2: 32 s predicted at 1024
    clock.record("fast", 512, 1.0)  # one point: T^2 assumed, 4 s at 1024
    assert clock.allowed("fast", 1024) and clock.allowed("new", 1024)
    assert not clock.allowed("slow", 1024)
    pred, p = clock.predict("slow", 1024)
    assert math.isclose(p, 2.0) and math.isclose(pred, 32.0)
    assert "slow" in clock.skipped and "32 s" in clock.skipped["slow"]
    assert "slow: skipped from T = 1024" in capsys.readouterr().out
    assert not clock.allowed("slow", 2048)  # stays skipped


def test_clock_clamps_the_growth_exponent():
    clock = mt.Clock(budget=100.0, max_step=20.0)
    clock.record("a", 8, 1.0)
    clock.record("a", 16, 1000.0)  # T^10 measured: clamped to T^3
    assert math.isclose(clock.predict("a", 32)[1], 3.0)
    clock.record("b", 8, 1.0)
    clock.record("b", 16, 0.5)  # shrinking: clamped to T^1
    assert math.isclose(clock.predict("b", 32)[0], 1.0)
