"""lossport.training.step: what a failed check says is true, and a non-finite net never ends "completed"."""

from __future__ import annotations

import math

import pytest
import torch
from test_train import LOSS, TwoHead, make_data
from torch import nn

from lossport import NonFiniteLossError, train

torch.set_num_threads(1)


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
def test_an_optimizer_step_that_overflows_the_weights_is_reported_as_such(on_nonfinite: str) -> None:
    """Finite losses and gradients, but lr = 1e38 pushes float32 weights to inf: the error says the step was
    taken and cannot be undone (not "the net keeps its last good weights"), in both modes."""
    net = TwoHead()
    d = make_data()
    d["a"] = d["a"] * 1e3  # gradients of order 1e3: lr * g overflows float32
    sgd = lambda p: torch.optim.SGD(p, lr=1e38)  # noqa: E731
    with pytest.raises(NonFiniteLossError, match="An optimizer step made them so") as err:
        train(net, d, LOSS, optimizer=sgd, epochs=2, progress=False, on_nonfinite=on_nonfinite)
    assert "cannot restore" in str(err.value) and "keeps the weights" not in str(err.value)
    assert not all(bool(p.isfinite().all()) for p in net.parameters())  # the message is true


def test_a_skipped_batch_leaves_the_weights_as_they_were() -> None:
    """The skip path's promise: a batch with a NaN part takes no step."""
    d = make_data(16)
    d["x"][8:] = math.nan  # NaN inputs -> NaN outputs -> NaN parts
    net = TwoHead()
    res = train(net, d, LOSS, epochs=1, batch_size=8, shuffle=False, on_nonfinite="skip", progress=False)
    assert res.history["skipped"] == [1.0] and res.stopped_because == "completed"
    assert all(bool(p.isfinite().all()) for p in net.parameters())


def test_float16_net_overflowing_under_adam_is_not_a_false_promise() -> None:
    """A float16 net whose Adam step overflows: the error is the parameter one, never a promise of good weights."""

    class Half(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2).half()

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"y": self.lin(x.half()).float()}

    d = {"x": torch.randn(16, 4), "y": torch.randn(16, 2)}
    adam = lambda p: torch.optim.Adam(p, lr=1e5)  # noqa: E731
    net = Half()
    try:
        train(net, d, {"y": "mse"}, optimizer=adam, epochs=20, progress=False, on_nonfinite="skip")
    except NonFiniteLossError as err:
        msg = str(err)
        finite = all(bool(p.isfinite().all()) for p in net.parameters())
        assert ("keeps the weights" in msg) == finite, msg
    else:
        assert all(bool(p.isfinite().all()) for p in net.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fused", [False, True])
def test_all_finite_finds_nan_and_inf_in_every_dtype_and_leaves_values_unchanged(dtype, fused: bool) -> None:
    from lossport.training.step import all_finite

    ts = [torch.randn(5, 3).to(dtype), torch.randn(7).to(dtype), torch.randn(2, 2, dtype=torch.float64)]
    before = [t.clone() for t in ts]
    assert all_finite(ts, fused=fused)
    assert all(torch.equal(a, b) for a, b in zip(ts, before))
    for bad in (math.nan, math.inf, -math.inf):
        ts[1][3] = bad
        assert not all_finite(ts, fused=fused)
        ts[1][3] = 0.0


@pytest.mark.parametrize("method", ["nash_mtl", "fairgrad", "cagrad", "upgrad"])
def test_gramian_weights_under_float16_mixed_precision_match_float32(method: str) -> None:
    """'16-mixed': the Gramian is taken on the unscaled parts (the GradScaler scales only the total's backward),
    so scale-sensitive methods give the float32 weights to float16 accuracy; in a training step as well."""
    from lossport import Objective
    from lossport.training.setup import autocast, grad_scaler

    d = make_data(32)
    batch = {k: v[:16] for k, v in d.items()}
    weights = {}
    for prec in ("32", "16-mixed"):
        net = TwoHead(seed=4)
        obj = Objective(LOSS, balance=method)
        with autocast(prec, torch.device("cpu")):
            losses = obj(net, batch)
        weights[prec] = {k: float(w) for k, w in losses.weights.items()}
        scaler = grad_scaler(prec, torch.device("cpu"))
        if scaler is not None:  # the backward of the scaled total leaves the weights as they were
            scaler.scale(losses.total).backward()
            assert {k: float(w) for k, w in losses.weights.items()} == weights[prec]
    for k in weights["32"]:
        assert weights["16-mixed"][k] == pytest.approx(weights["32"][k], rel=2e-2, abs=1e-3), (method, k)
