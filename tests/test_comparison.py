import importlib

import pytest

from lossport.comparison import delta_m
from lossport.metrics import higher_is_better


def test_delta_m_by_hand():
    # NYUv2-like mix: one higher-is-better, one lower-is-better metric
    base = {"seg/accuracy": 0.50, "depth/mae": 0.40}
    method = {"seg/accuracy": 0.55, "depth/mae": 0.44}
    # accuracy +10% (improves: contributes -10), mae +10% (worse: contributes +10) -> mean 0
    assert delta_m(method, base) == pytest.approx(0.0)
    method = {"seg/accuracy": 0.45, "depth/mae": 0.30}
    # accuracy -10% -> +10 ; mae -25% -> -25 ; mean -7.5
    assert delta_m(method, base) == pytest.approx(-7.5)


def test_directions_and_errors():
    assert higher_is_better("left/accuracy") and higher_is_better("x/f1")
    assert not higher_is_better("ink/mae") and not higher_is_better("ink/rmse") and not higher_is_better("val_loss")
    with pytest.raises(ValueError, match="no value"):
        delta_m({}, {"a/mae": 1.0})
    with pytest.raises(ValueError, match="is 0"):
        delta_m({"a/mae": 1.0}, {"a/mae": 0.0})


def test_compare_trains_each_baseline_once_per_seed_and_scores_methods():
    import torch
    from torch import nn

    import lossport

    C = importlib.import_module("lossport.comparison")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Linear(3, 8)
            self.a = nn.Linear(8, 1)
            self.b = nn.Sequential(nn.Linear(8, 2), nn.Softmax(dim=1))

        def forward(self, x):
            h = torch.relu(self.trunk(x))
            return {"a": self.a(h), "b": self.b(h)}

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    data = {"x": x, "a": x[:, :1] * 3, "b": (x[:, 1] > 0).long()}
    calls = []
    real = C._train_eval

    def counting(make_net, d, loss, balance, seed, test, metrics, kw):
        calls.append((tuple(loss), balance, seed))
        return real(make_net, d, loss, balance, seed, test, metrics, kw)

    C._train_eval = counting
    try:
        table = lossport.compare(
            Net,
            data,
            {"a": "mse", "b": "auto"},
            methods=["ew", "uw", "mgda"],
            metrics={"a": ["mae"], "b": ["accuracy"]},
            test=data,
            seeds=2,
            epochs=1,
            batch_size=16,
        )
    finally:
        C._train_eval = real
    baselines = [c for c in calls if len(c[0]) == 1]
    assert sorted(baselines, key=str) == sorted(
        [(("a",), None, s) for s in (0, 1)] + [(("b",), None, s) for s in (0, 1)], key=str
    )
    assert len(calls) == 4 + 3 * 2  # each baseline once per seed, reused by the three methods
    row = table.row("mgda")
    assert len(row.delta) == 2 and set(row.metrics) == {"a/mae", "b/accuracy"}
    # Delta-m% of each seed against the mean baseline, recomputed by hand
    for s in range(2):
        scores = {k: row.metrics[k][s] for k in row.metrics}
        assert row.delta[s] == pytest.approx(delta_m(scores, table.baseline))
    assert "single-task" in table.table() and "mgda" in table.table()


def test_a_failing_method_gets_a_failed_row_and_the_others_run(tmp_path):
    """A method whose training raises (PCD with a primary part the spec lacks) is reported in the table and the
    CSV with its error; the methods after it still run and score."""
    import csv

    import torch
    from torch import nn

    import lossport
    from lossport.balance import PCD

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Linear(3, 8)
            self.a = nn.Linear(8, 1)
            self.b = nn.Linear(8, 1)

        def forward(self, x):
            h = torch.relu(self.trunk(x))
            return {"a": self.a(h), "b": self.b(h)}

    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 3, generator=g)
    data = {"x": x, "a": x[:, :1] * 3, "b": x[:, 1:2] - x[:, 2:]}

    def bad_pcd():
        return PCD(primary="zz")

    table = lossport.compare(
        Net,
        data,
        {"a": "mse", "b": "mse"},
        methods=["ew", bad_pcd, "mgda"],
        metrics={"a": ["mae"], "b": ["mae"]},
        test=data,
        seeds=2,
        epochs=1,
        batch_size=16,
    )
    failed = table.row("bad_pcd")
    assert failed.error is not None and failed.error.startswith("seed 0: ValueError:") and "'zz'" in failed.error
    assert not failed.metrics and not failed.delta and not failed.seconds_per_step
    for ok in ("ew", "mgda"):
        assert table.row(ok).error is None and len(table.row(ok).delta) == 2
    text = table.table()
    assert any(line.startswith("bad_pcd") and "failed" in line for line in text.splitlines())
    assert f"bad_pcd failed: {failed.error}" in text
    table.to_csv(str(tmp_path / "t.csv"))
    with open(tmp_path / "t.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert rows["bad_pcd"]["error"] == failed.error and rows["bad_pcd"]["delta_m_mean"] == ""
    assert rows["mgda"]["error"] == "" and float(rows["mgda"]["delta_m_mean"]) == pytest.approx(
        sum(table.row("mgda").delta) / 2
    )
    fig = table.plot()  # the failed row (no Delta-m%) is left out of the figure
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["ew", "mgda"]
