"""History (keys, CSV, JSON) and Result (table, plot)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from torch import nn

from lossport.history import History, Result


def make_history() -> History:
    h = History()
    h.rounds = [
        {"round": 1.0, "loss": 3.0, "a": 2.0, "b": 1.0, "weight/a": 1.0, "val_loss": 3.5, "val_a": 2.5},
        {"round": 2.0, "loss": 2.0, "b": 0.5, "weight/a": 1.0, "val_loss": 2.5, "val_a": 2.0},  # a missing
        {"round": 3.0, "loss": 1.0, "a": 0.5, "b": -0.2, "weight/a": 1.0, "val_loss": 2.8, "val_a": 2.2},
    ]
    h.batches = [
        {"round": 1.0, "batch": 0.0, "loss": 3.0, "a": 2.0},
        {"round": 1.0, "batch": 1.0, "loss": 3.0},
    ]
    return h


def test_getitem_keys_and_missing_values() -> None:
    h = make_history()
    assert h.keys()[:4] == ["round", "loss", "a", "b"]
    a = h["a"]
    assert a[0] == 2.0 and math.isnan(a[1]) and a[2] == 0.5
    assert "val_a" in h and "val_b" not in h
    with pytest.raises(KeyError, match="no history key 'c'"):
        h["c"]
    assert len(h) == 3 and h.last["loss"] == 1.0
    assert math.isnan(h.batch_values("a")[1])


def test_csv_and_json_round_trip(tmp_path: Path) -> None:
    h = make_history()
    text = h.to_csv(tmp_path / "h.csv")
    lines = (tmp_path / "h.csv").read_text().splitlines()
    assert lines[0] == "round,loss,a,b,weight/a,val_loss,val_a" and text.splitlines() == lines
    assert lines[2].split(",")[2] == ""  # a absent in round 2: empty cell, not 0
    h.to_json(tmp_path / "h.json")
    raw = json.loads((tmp_path / "h.json").read_text())
    assert "a" not in raw["rounds"][1] and len(raw["batches"]) == 2
    back = History.from_json(tmp_path / "h.json")
    assert back.rounds == h.rounds and back.batches == h.batches
    h.rounds[0]["b"] = float("nan")
    assert "b" not in json.loads(h.to_json())["rounds"][0]  # NaN is left out, the JSON stays valid


def test_table_and_plot(tmp_path: Path) -> None:
    net = nn.Linear(1, 1)
    r = Result(
        net=net,
        final_net=net,
        history=make_history(),
        best_round=2,
        best_key="val_loss",
        part_names=["a", "b"],
    )
    t = r.table()
    assert "best round 2" in t and t.splitlines()[1].split()[:5] == ["part", "weight", "train", "val", "val"]
    fig = r.plot(tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert set(axes) == {"total", "a", "b"}
    assert axes["total"].get_yscale() == "log" and axes["a"].get_yscale() == "log"
    assert axes["b"].get_yscale() == "linear"  # b has a negative value
    assert len(axes["a"].get_lines()) == 3  # train, validation and the best-round marker
    assert len(axes["b"].get_lines()) == 2  # train and marker: no validation of b
    assert "3 rounds" in repr(r)
