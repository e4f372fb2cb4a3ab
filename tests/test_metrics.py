"""Metrics accumulated over batches: accuracy, F1, MAE, RMSE and callables, against scikit-learn and numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

from lossport.errors import LossSpecError
from lossport.metrics import F1, MAE, RMSE, Accuracy, Callable, guess_higher_is_better, metric_set, resolve


def batches(n: int, size: int):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def test_accuracy_and_macro_f1_over_batches_match_sklearn() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(53, 4, generator=g)
    target = torch.randint(0, 4, (53,), generator=g)
    target[::7] = -100  # unlabelled
    acc, f1 = Accuracy(), F1()
    for s in batches(53, 10):
        acc.update(scores[s], target[s])
        f1.update(scores[s], target[s])
    keep = (target != -100).numpy()
    y, p = target.numpy()[keep], scores.argmax(1).numpy()[keep]
    assert acc.compute() == pytest.approx(accuracy_score(y, p))
    assert f1.compute() == pytest.approx(f1_score(y, p, average="macro"))


def test_binary_probabilities_one_hot_and_threshold() -> None:
    prob = torch.tensor([[0.9], [0.2], [0.6], [0.4], [0.7]])
    y = torch.tensor([[1.0], [0.0], [0.0], [float("nan")], [1.0]])
    acc, f1 = Accuracy(), F1()
    acc.update(prob, y)
    f1.update(prob, y)
    assert acc.compute() == pytest.approx(3 / 4)
    assert f1.compute() == pytest.approx(f1_score([1, 0, 0, 1], [1, 0, 1, 1]))
    logits = torch.tensor([[2.0], [-1.0], [0.3]])
    a0 = Accuracy(threshold=0.0)
    a0.update(logits, torch.tensor([1, 0, 1]))
    assert a0.compute() == 1.0
    onehot = torch.eye(3)[[0, 2, 1]]
    a = Accuracy()
    a.update(torch.tensor([[5.0, 0, 0], [0, 0, 1], [1, 0, 0]]), onehot)
    assert a.compute() == pytest.approx(2 / 3)


def test_mae_rmse_over_batches_with_missing_elements() -> None:
    g = torch.Generator().manual_seed(1)
    out = torch.randn(31, 2, generator=g)
    y = torch.randn(31, 2, generator=g)
    y[3, 1] = float("nan")
    mae, rmse = MAE(), RMSE()
    for s in batches(31, 8):
        mae.update(out[s], y[s])
        rmse.update(out[s], y[s])
    e = (out - y).numpy().ravel()
    e = e[~np.isnan(e)]
    assert mae.compute() == pytest.approx(np.abs(e).mean())
    assert rmse.compute() == pytest.approx(np.sqrt((e**2).mean()))
    mae.reset()
    assert math.isnan(mae.compute())


def test_callable_is_batch_size_weighted_and_named() -> None:
    def bias(out: torch.Tensor, y: torch.Tensor) -> float:
        return float((out - y).mean())

    m = resolve(bias)
    assert isinstance(m, Callable) and m.name == "bias" and not m.higher_is_better
    m.update(torch.ones(3, 1), torch.zeros(3, 1))  # 1 on 3 examples
    m.update(torch.zeros(1, 1), torch.ones(1, 1))  # -1 on 1 example
    assert m.compute() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="needs a name"):
        Callable(lambda o, t: 0.0)
    assert Callable(lambda o, t: 0.0, name="iou").higher_is_better


def test_metric_set_spec_errors_and_names() -> None:
    ms = metric_set({"digit": ["accuracy", "f1"], "size": "mae"}, ["digit", "size"])
    assert ms is not None and ms.keys == ["digit/accuracy", "digit/f1", "size/mae"]
    assert ms.directions() == {"digit/accuracy": True, "digit/f1": True, "size/mae": False}
    with pytest.raises(LossSpecError, match="unknown output 'digits'"):
        metric_set({"digits": ["accuracy"]}, ["digit", "size"])
    with pytest.raises(LossSpecError, match="give a dict"):
        metric_set(["mae"], ["digit", "size"])
    with pytest.raises(ValueError, match="unknown metric 'auc'"):
        metric_set({"digit": ["auc"]}, ["digit"])
    with pytest.raises(ValueError, match="twice"):
        metric_set({"digit": ["accuracy", Accuracy()]}, ["digit"])
    single = metric_set("rmse", ["out"])
    assert single is not None and single.keys == ["out/rmse"]
    with pytest.raises(LossSpecError, match="differ"):
        MAE().update(torch.zeros(4, 2), torch.zeros(4, 3))


def test_direction_guess() -> None:
    for name in ("accuracy", "acc", "f1", "top5", "val_x/auc", "recall"):
        assert guess_higher_is_better(name)
    for name in ("mae", "rmse", "loss", "x/mse", "bias"):
        assert not guess_higher_is_better(name)
