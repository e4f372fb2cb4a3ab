"""The `lossport` command: subcommand structure and `lossport demo`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lossport.cli import build_parser, main


def test_demo_prints_table_and_writes_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--epochs", "1", "--size", "300", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    for word in ("part", "left", "right", "ink", "left/accuracy", "val (best)"):
        assert word in out
    assert f"loss plot: {tmp_path / 'loss.png'}" in out
    png = (tmp_path / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "history.csv").read_text().startswith("round,loss,left,right,ink")


def test_no_subcommand_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "demo" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["nope"])


def test_console_script_entry_point() -> None:
    r = subprocess.run([sys.executable, "-m", "lossport.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "demo" in r.stdout


def test_compare_and_inspect_subcommands(tmp_path, capsys):
    from lossport.cli import main

    assert (
        main(
            [
                "compare",
                "--methods",
                "ew,mgda",
                "--seeds",
                "1",
                "--epochs",
                "1",
                "--size",
                "256",
                "--out",
                str(tmp_path / "cmp"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "single-task" in out and "mgda" in out and "delta_m%" in out
    assert (tmp_path / "cmp" / "compare.csv").exists() and (tmp_path / "cmp" / "compare.png").exists()
    assert main(["compare", "--methods", "nope"]) == 2
    assert main(["inspect", "--batches", "2", "--batch-size", "32", "--figure", str(tmp_path / "i.png")]) == 0
    assert "ink" in capsys.readouterr().out and (tmp_path / "i.png").exists()


def test_toy_subcommand_reports_a_method_that_cannot_run_and_draws_the_others(tmp_path, capsys):
    """UW needs losses >= 0 and the toy's go down to -20: the method is listed with its error, the others run and
    are drawn, and the command exits 1 (as ``lossport compare`` does)."""
    assert main(["toy", "--methods", "uw,ew", "--steps", "20", "--out", str(tmp_path / "toy.png")]) == 1
    out = capsys.readouterr().out
    assert "uw         not run: ValueError: Uncertainty needs finite losses >= 0" in out and "ew         end" in out
    assert (tmp_path / "toy.png").exists()


def test_toy_subcommand_default_methods_all_run(tmp_path, capsys):
    args = build_parser().parse_args(["toy"])
    assert args.methods.split(",") == ["ew", "mgda", "pcgrad", "cagrad", "nash_mtl", "famo"]
    assert main(["toy", "--steps", "10", "--out", str(tmp_path / "toy.png")]) == 0
    assert "not run" not in capsys.readouterr().out


def test_toy_subcommand(tmp_path, capsys):
    from lossport.cli import main

    assert main(["toy", "--methods", "ew,mgda", "--steps", "30", "--out", str(tmp_path / "toy.png")]) == 0
    assert "mgda" in capsys.readouterr().out and (tmp_path / "toy.png").exists()


def test_cli_inspect_on_the_demo_net(tmp_path, capsys):
    import matplotlib

    from lossport.cli import main

    matplotlib.use("Agg")
    fig, js = tmp_path / "f.png", tmp_path / "r.json"
    assert main(["inspect", "--batches", "2", "--batch-size", "32", "--figure", str(fig), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "Reach and pull" in out and max(len(line) for line in out.splitlines()) <= 100
    assert fig.stat().st_size > 0
    d = json.loads(js.read_text())
    assert d["parts"] == ["left", "right", "ink"]
    assert d["reach"]["ink"] == ["trunk.0", "trunk.2", "trunk.5", "ink"]
    assert d["shared"] == ["trunk.0", "trunk.2", "trunk.5"]


def test_compare_exits_1_when_a_method_failed_after_writing_the_table(tmp_path, capsys):
    """A registered method that raises (here a user's own balancer) gets a failed row; the command still writes
    the table and the figure, and exits 1 so that a script sees the comparison is incomplete."""
    from lossport.balance import base

    class Refuses(base.Balancer):
        kind = "loss"

        def balance(self, losses):
            raise ValueError("this method refuses every batch")

    base.register("refuses_every_batch")(Refuses)
    try:
        args = ["compare", "--methods", "ew,refuses_every_batch", "--seeds", "1", "--epochs", "1", "--size", "128"]
        code = main([*args, "--out", str(tmp_path)])
    finally:
        del base._REGISTRY["refuses_every_batch"], base._CANONICAL[Refuses]
    captured = capsys.readouterr()
    assert code == 1
    assert "failed: refuses_every_batch" in captured.err
    assert "refuses_every_batch failed: seed 0: ValueError: this method refuses every batch" in captured.out
    assert (tmp_path / "compare.csv").exists() and (tmp_path / "compare.png").exists()
