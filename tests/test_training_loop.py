"""lossport.training.loop and .data: clear errors for empty data and one-example BatchNorm batches; early
stopping and best-net selection that say what they did when the watched key is NaN."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from test_train import LOSS, TwoHead, make_data
from torch import nn

from lossport import evaluate, train
from lossport.callbacks import Callback

torch.set_num_threads(1)


@pytest.mark.parametrize("form", ["dict", "list", "dataset"])
def test_empty_data_is_a_clear_error(form: str) -> None:
    empty = {k: v[:0] for k, v in make_data().items()}
    data = {"dict": empty, "list": [], "dataset": torch.utils.data.TensorDataset(torch.zeros(0, 4))}[form]
    with pytest.raises(ValueError, match="empty"):
        train(TwoHead(), data, LOSS, progress=False)
    with pytest.raises(ValueError, match="empty"):
        evaluate(TwoHead(), data, LOSS)


def test_all_targets_missing_in_the_first_round_is_a_clear_error() -> None:
    d = make_data(16)
    d["a"][:] = math.nan
    d["b"][:] = -100
    with pytest.raises(ValueError, match="every target is missing"):
        train(TwoHead(), d, LOSS, progress=False)


class BN(TwoHead):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())


def test_batchnorm_with_a_last_batch_of_one_example_is_refused_before_training() -> None:
    with pytest.raises(ValueError, match=r"1 example .*BatchNorm.*batch_size") as err:
        train(BN(), make_data(17), LOSS, batch_size=8, progress=False)
    assert "e.g. 9" in str(err.value)
    train(BN(), make_data(17), LOSS, batch_size=9, epochs=1, progress=False)  # 9 + 8: fine


def test_early_stopping_on_a_key_that_is_nan_from_the_start_stops_and_says_why() -> None:
    val = make_data(16, seed=1)
    val["x"][:] = math.nan  # NaN validation inputs: val_loss is NaN in every round

    res = train(TwoHead(), make_data(), LOSS, epochs=6, stop_on="val_loss", patience=2, validation=val, progress=False)
    assert res.rounds == 2 and "never finite" in res.stopped_because
    assert res.best_round is None and "never finite" in (res.best_reason or "")
    assert "final net" in (res.best_reason or "")


def test_best_round_passes_over_nan_validation_rounds_and_says_so() -> None:
    class NaNSometimes(TwoHead):
        poison = False

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            out = super().forward(x)
            return {k: v * math.nan for k, v in out.items()} if self.poison and not self.training else out

    def odd_rounds_validate_to_nan(state: Any) -> None:
        state.net.poison = state.round % 2 == 1

    class Poison(Callback):
        def on_round_begin(self, state: Any) -> None:
            odd_rounds_validate_to_nan(state)

    res = train(NaNSometimes(), make_data(48), LOSS, epochs=4, validation=make_data(16, seed=1), batch_size=16,
                progress=False, balance="uw", callbacks=[Poison()])  # fmt: skip
    vl = res.history["val_loss"]
    assert math.isnan(vl[0]) and math.isnan(vl[2]) and res.best_round in (2, 4)
    reason = res.best_reason or ""
    assert f"round {res.best_round} has the lowest val_loss" in reason and "2 rounds with a non-finite" in reason
    assert "static weights" in reason  # under a balancer, val_loss is not the balanced total: said


def test_targets_route_one_batch_key_to_several_outputs_in_train_and_evaluate() -> None:
    """GoogLeNet-style: the main and the auxiliary head learn the same label; no copies of it in the batch."""

    class MainAux(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.Linear(4, 8)
            self.main, self.aux = nn.Linear(8, 3), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            h = self.trunk(x).relu()
            return {"main": self.main(h), "aux": self.aux(h)} if self.training else {"main": self.main(h)}

    d = make_data(32)
    data = {"x": d["x"], "label": d["b"]}
    route = {"main": "label", "aux": "label"}
    res = train(MainAux(), data, {"main": "ce", "aux": "ce"}, weights={"main": 1.0, "aux": 0.3}, targets=route,
                epochs=2, progress=False, validation=0.25)  # fmt: skip
    assert {"main", "aux", "val_main"} <= set(res.history.keys()) and "val_aux" not in res.history
    out = evaluate(res.net, data, {"main": "ce", "aux": "ce"}, targets=route)
    assert set(out) == {"loss", "main"}  # the aux head exists only in training: absent, not an error
    with pytest.raises(Exception, match="label") as err:
        train(MainAux(), {"x": d["x"], "y": d["b"]}, {"main": "ce", "aux": "ce"}, targets=route, progress=False)
    assert "'main'" in str(err.value) or "'aux'" in str(err.value)


def test_the_table_and_plot_name_the_validation_total_of_a_balanced_run() -> None:
    """Under a balancer the training total is balanced and val_loss uses the static weights: said beside them."""
    import matplotlib

    matplotlib.use("Agg")
    d = make_data(32)
    plain = train(TwoHead(), d, LOSS, epochs=1, validation=0.25, progress=False)
    balanced = train(TwoHead(), d, LOSS, epochs=1, validation=0.25, progress=False, balance="uw")
    note = "val total: with the static weights"
    assert note in balanced.table() and note not in plain.table()
    labels = [t.get_text() for ax in balanced.plot().axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert "validation (static weights)" in labels
