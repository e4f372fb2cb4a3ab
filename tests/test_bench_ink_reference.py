"""The reference runs on multidigits (``benchmarks/ink_reference.py``, issue 15): its hand loop is the same run as
``lossport.train`` (so its figures can stand beside ``lossport compare``'s), and its Krum reference gives each
head its plain gradient, or the method's weight times it with ``heads="weighted"``."""

import importlib.util
from pathlib import Path

import pytest
import torch

import lossport
from lossport.data import MultiDigitsNet, multidigits

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "ink_reference.py"
_spec = importlib.util.spec_from_file_location("bench_ink_reference", _PATH)
assert _spec is not None and _spec.loader is not None
ir = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ir)

SPEC = {"left": "auto", "right": "auto", "ink": "auto"}


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(ir, "SIZE", 192)  # three batches of 64 per round


@pytest.mark.parametrize("method,balance", [("sum", "ew"), ("si", "si")])
def test_hand_loop_is_the_run_of_lossport_train(small, method, balance):
    torch.manual_seed(1)
    net = MultiDigitsNet(width=16)
    lossport.train(
        net, multidigits("train", size=192), SPEC, balance=balance, epochs=2, batch_size=64, lr=2e-3,
        device="cpu", seed=1, progress=False,
    )  # fmt: skip
    ours = ir.score(net, multidigits("test"))
    assert ir.run(method, 1, 2, "plain", None) == ours
    assert ir.run(f"lossport:{balance}", 1, 2, "plain", None) == ours


def test_standardised_ink_has_the_training_sets_mean_0_and_std_1_and_the_unit_is_its_std(small):
    train, test, unit = ir.data(True)
    raw = multidigits("train", size=192)["ink"]
    assert abs(float(train["ink"].mean())) < 1e-5 and abs(float(train["ink"].std()) - 1) < 1e-5
    assert unit == pytest.approx(float(raw.std()))
    assert torch.allclose(test["ink"] * unit + raw.mean(), multidigits("test")["ink"], atol=1e-4)


def test_krum_reference_heads_plain_or_weighted(small):
    torch.manual_seed(0)
    net = MultiDigitsNet(width=16)
    step = ir.torchjd_step(net, "krum")
    batch = {k: v[:64] for k, v in multidigits("train", size=64).items()}
    L, net._z = ir.losses(net, batch)
    w = step(L, [], 0)
    assert sorted(w.tolist()) == [0.0, 0.0, 3.0]  # one part selected, lossport's factor T
    for i, head in enumerate(ir.heads(net)):  # mtl_backward: every head its own loss's plain gradient
        plain = torch.autograd.grad(ir.losses(net, batch)[0][i], list(head.parameters()))
        assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(head.parameters(), plain, strict=True))
    unselected = ir.heads(net)[int(w.argmin())]
    assert any(p.grad.abs().sum() > 0 for p in unselected.parameters())
    ir.weigh_heads(net, w)  # heads="weighted": lossport's convention, the unselected heads get nothing
    for head, wi in zip(ir.heads(net), w.tolist(), strict=True):
        assert all(bool((p.grad == 0).all()) == (wi == 0) for p in head.parameters())
