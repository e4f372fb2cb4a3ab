"""``benchmarks/gpu.py`` (the script for a CUDA machine), checked on the CPU: its smoke test reports what it is meant
to find (a state tensor off the device, a non-finite run, an error that is not a refused mode) and counts a mode
refused by name as "not supported"; its timing table has every column."""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import Tensor

from lossport import Losses
from lossport.balance import Balancer, resolve

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def gpu() -> ModuleType:
    sys.path.insert(0, str(BENCH))  # gpu.py imports benchmarks/gramian.py as `gramian`
    try:
        spec = importlib.util.spec_from_file_location("lossport_bench_gpu", BENCH / "gpu.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # its dataclass looks itself up there
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


class LeavesStateOnMeta(Balancer):
    """A buggy balancer: after following the parts it creates a state tensor on another device (as one created
    without ``device=`` lands on the CPU while the parts are on a GPU)."""

    kind = "loss"

    def __init__(self) -> None:
        super().__init__()
        self.add_state("_x", None)

    def balance(self, losses: Losses) -> Mapping[str, Tensor | float]:
        self._x = torch.zeros(2, device="meta")
        return dict.fromkeys(losses.parts, 1.0)


class InfiniteWeight(Balancer):
    kind = "loss"

    def balance(self, losses: Losses) -> Mapping[str, Tensor | float]:
        return dict.fromkeys(losses.parts, math.inf)


def run(gpu: ModuleType, make: Any, mode: str = "default") -> Any:
    rep = gpu.SmokeReport()
    gpu.smoke_one("x", mode, make, "32", CPU, rep)
    return rep


def test_a_sound_balancer_passes(gpu: ModuleType) -> None:
    rep = run(gpu, lambda: resolve("upgrad", gramian="features", features="h"), "features")
    assert rep.ok == ["x [features] precision=32"] and not rep.failures and not rep.unsupported


def test_a_state_tensor_off_the_device_is_a_failure(gpu: ModuleType) -> None:
    rep = run(gpu, LeavesStateOnMeta)
    assert not rep.ok
    assert len(rep.failures) == 1 and "state /x" in rep.failures[0] and "meta" in rep.failures[0]


def test_a_non_finite_run_is_a_failure(gpu: ModuleType) -> None:
    rep = run(gpu, InfiniteWeight)
    assert not rep.ok and len(rep.failures) == 1 and "after 0 steps" in rep.failures[0]


def test_a_refused_mode_is_not_supported_but_another_value_error_fails(gpu: ModuleType) -> None:
    rep = run(gpu, lambda: resolve("moco", gramian="features", features="h"), "features")
    assert len(rep.unsupported) == 1 and "features mode" in rep.unsupported[0] and not rep.failures

    def bad() -> Balancer:
        raise ValueError("some other problem")

    rep = run(gpu, bad, "features")
    assert not rep.unsupported and len(rep.failures) == 1 and "some other problem" in rep.failures[0]


def test_check_run_finds_a_non_finite_parameter(gpu: ModuleType) -> None:
    net = gpu.SmokeNet()
    bal = resolve("ew")
    x, y = gpu.smoke_data()
    import lossport

    result = lossport.train(
        net, (x, y), gpu.LOSS, balance=bal, epochs=1, batch_size=gpu.BATCH, device="cpu", progress=False
    )
    assert gpu.check_run(net, bal, result, gpu.STEPS, CPU) == []
    with torch.no_grad():
        net.heads["a"].bias.fill_(math.nan)
    assert gpu.check_run(net, bal, result, 2, CPU) == [
        f"2 steps taken, expected {gpu.STEPS}",
        "net parameter heads.a.bias is not finite",
    ]


def test_the_timing_table_has_every_variant(gpu: ModuleType) -> None:
    failures: list[str] = []
    med, mem = gpu.time_T(2, 1, CPU, failures)
    assert failures == []
    expected = ["sum", "upgrad exact", "upgrad features"]
    if gpu.HAVE_TORCHJD:
        expected += ["torchjd backward", "torchjd mtl_backward", "torchjd autogram"]
    assert sorted(med) == sorted(expected) and all(v > 0 for v in med.values())
    assert mem == {}  # device memory is measured on CUDA only
    table = gpu.markdown({2: med}).splitlines()
    assert table[0].startswith("| T | sum-backward | lossport UPGrad (exact) |")
    assert len(table) == 3 and table[2].startswith("| 2 | ") and table[2].count("x sum") == len(expected) - 1
