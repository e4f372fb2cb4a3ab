"""Balancers follow the device and dtype of their inputs (tests/ mirror of lossport.balance's state rules).

No GPU is needed. On a GPU, a tensor that lossport code creates without saying its device lands on the default
device (the CPU) while the parts live on the GPU; here the same mistake is caught where it is made:

* :class:`DefaultDeviceGuard` (a ``TorchFunctionMode``) fails the test when code in ``src/lossport`` calls a
  tensor factory (``torch.tensor``, ``zeros``, ``full``, ``eye``, ``arange``, ``randperm``, ``rand``, ...)
  without ``device=``, or gets a floating tensor without ``dtype=`` (it would take the default dtype, float32,
  while the parts here are float64). It names the file and line.
* the net, the batch and the parts are float64 while ``torch.get_default_dtype()`` is float32: the weights,
  the learned parameters and every floating tensor of the state must be float64.
* ``.to(torch.float64)`` casts every floating tensor of the state, and the balancer goes on; at a call with
  parts on another device (``meta`` here) the state moves there first.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

import lossport
from lossport import Losses
from lossport.balance import Context, available, resolve

SRC = str(Path(lossport.__file__).resolve().parent)
FACTORIES = _device_constructors()
KEEPS_DEVICE = {torch.as_tensor, torch.asarray}  # given a tensor, these keep its device


class DefaultDeviceGuard(TorchFunctionMode):
    """Raise when lossport code creates a tensor on the default device or in the default floating dtype."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func not in FACTORIES or (func in KEEPS_DEVICE and args and isinstance(args[0], Tensor)):
            return out
        caller = sys._getframe(1)
        where = str(Path(caller.f_code.co_filename).resolve())
        if not where.startswith(SRC):
            return out
        line = f"{Path(where).relative_to(SRC)}:{caller.f_lineno}"
        if kwargs.get("device") is None:
            raise AssertionError(
                f"torch.{func.__name__} at {line} creates a tensor without device=: on a GPU it lands on the "
                "default device, not the parts'"
            )
        if isinstance(out, Tensor) and out.is_floating_point() and kwargs.get("dtype") is None:
            raise AssertionError(
                f"torch.{func.__name__} at {line} creates a {out.dtype} tensor without dtype=: it takes the default "
                "dtype, not the parts'"
            )
        return out


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.heads = nn.ModuleDict({k: nn.Linear(8, 1) for k in "abc"})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.trunk(x)
        return {"h": h, **{k: head(h) for k, head in self.heads.items()}}


def batch(dtype: torch.dtype, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, generator=g)
    ys = {k: s * torch.randn(16, 1, generator=g) + 1 for k, s in zip("abc", (1, 5, 9))}
    return {"x": x.to(dtype), **{k: y.to(dtype) for k, y in ys.items()}}


def evaluate(net: Net, b: dict[str, Tensor]) -> Losses:
    out = net(b["x"])
    parts = {k: nn.functional.mse_loss(out[k], b[k]) for k in "abc"}
    return Losses(parts=parts, weights=dict.fromkeys(parts, 1.0), outputs=out)


def train(bal: Any, net: Net, steps: int, dtype: torch.dtype) -> list[Losses]:
    """``steps`` steps of the balancer protocol (balance, backward, optimizer step, balancer step)."""
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    seen = []
    for t in range(steps):
        b = batch(dtype, seed=t)
        ctx = Context(
            extra=tuple(
                (lambda s=s, t=t: evaluate(net, batch(dtype, seed=100 * s + t))) for s in range(1, bal.batches)
            ),
            meta=lambda t=t: evaluate(net, batch(dtype, seed=1000 + t)),
            train=lambda b=b: evaluate(net, b),
            optimizer=opt,
        )
        out = bal(evaluate(net, b), ctx)
        opt.zero_grad()
        out.total.backward()
        opt.step()

        def recompute(b: dict[str, Tensor] = b) -> Losses:
            with torch.no_grad():
                return evaluate(net, b)

        bal.step(recompute)
        bal.end_round({})
        seen.append(out)
    return seen


def state_tensors(state: Any, key: str = "") -> Iterator[tuple[str, Tensor]]:
    """The floating tensors of a state dict, with their paths (Adam's ``step`` counts stay on the CPU by torch's
    design, so they are left out; generator states are uint8)."""
    if isinstance(state, Tensor):
        if state.is_floating_point() and not key.endswith("/step"):
            yield key, state
    elif isinstance(state, dict):
        for k, v in state.items():
            yield from state_tensors(v, f"{key}/{k}")
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            yield from state_tensors(v, f"{key}/{i}")


def make(name: str, extra: dict[str, Any]) -> Any:
    return resolve(name, **extra)


FEATURES = {"gramian": "features", "features": "h"}
CASES = [(n, {}) for n in available()] + [
    ("upgrad", FEATURES),
    ("graddrop", FEATURES),
    ("db_mtl", FEATURES),
    ("nash_mtl", {"every": 2}),
]
IDS = [n + ("-" + "-".join(f"{k}={v}" for k, v in kw.items()) if kw else "") for n, kw in CASES]


@pytest.fixture
def float32_default() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize(("name", "extra"), CASES, ids=IDS)
def test_no_tensor_on_the_default_device_or_dtype(name: str, extra: dict[str, Any], float32_default: None) -> None:
    net = Net().double()
    bal = make(name, extra)
    with DefaultDeviceGuard():
        seen = train(bal, net, 3, torch.float64)
    for out in seen:
        for k, w in out.weights.items():
            if isinstance(w, Tensor):
                assert w.dtype == torch.float64, f"{name}: weight of {k} is {w.dtype}"
        assert out.total.dtype == torch.float64
    for p in bal.parameters():
        assert p.dtype == torch.float64, f"{name}: learned parameter in {p.dtype}, the parts are float64"
    for path, t in state_tensors(bal.state_dict()):
        assert t.dtype == torch.float64, f"{name}: state {path} is {t.dtype}, the parts are float64"


@pytest.mark.parametrize(("name", "extra"), CASES, ids=IDS)
def test_to_moves_the_state_and_the_next_call_follows_the_parts(name: str, extra: dict[str, Any]) -> None:
    net = Net()
    bal = make(name, extra)
    train(bal, net, 3, torch.float32)
    before = list(state_tensors(bal.state_dict()))
    if bal.kind == "learned" or (name == "db_mtl" and not extra):
        assert before, f"{name} should hold tensors in its state"

    assert bal.to(torch.float64) is bal
    moved = list(state_tensors(bal.state_dict()))
    assert [p for p, _ in moved] == [p for p, _ in before]
    for path, t in moved:
        assert t.dtype == torch.float64, f"{name}: .to(float64) left {path} in {t.dtype}"
    for p in bal.parameters():
        assert p.dtype == torch.float64

    train(bal, net.double(), 1, torch.float64)  # and it goes on with float64 parts

    # the call's first move: the state follows the parts to their device (here meta, which holds no values)
    meta = {k: torch.zeros((), device="meta", dtype=torch.float64) for k in "abc"}
    bal.follow(Losses(parts=meta, weights=dict.fromkeys(meta, 1.0)))
    for path, t in state_tensors(bal.state_dict()):
        assert t.device.type == "meta", f"{name}: {path} stayed on {t.device}, the parts are on meta"
    for p in bal.parameters():
        assert p.device.type == "meta"
