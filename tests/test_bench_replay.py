"""The replay benchmark (``benchmarks/replay.py``): it records a training run's Gramians and replays them."""

import importlib.util
import sys
from pathlib import Path

import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "replay.py"
_spec = importlib.util.spec_from_file_location("bench_replay", _PATH)
assert _spec is not None and _spec.loader is not None
rp = importlib.util.module_from_spec(_spec)
sys.modules["bench_replay"] = rp  # its dataclass looks its module up
_spec.loader.exec_module(rp)


def test_record_keeps_one_gramian_per_training_step_and_they_move():
    Gs = rp.record(18, 4, "features")
    assert len(Gs) == 4 and all(G.shape == (18, 18) and G.dtype == torch.float64 for G in Gs)
    for G in Gs:
        assert torch.allclose(G, G.T) and float(torch.linalg.eigvalsh(G).min()) >= -1e-9 * float(G.diagonal().max())
    assert not torch.equal(Gs[0], Gs[3])  # the net trains between the recorded steps


def test_replay_times_every_step_and_warm_weights_equal_cold_and_torchjd(capsys):
    Gs = rp.record(18, 7, "features")
    r = rp.replay(Gs, every=3)
    assert len(r["warm"].wall) == 6 and len(r["warm_sub"].wall) == 2 and len(r["cold"].wall) == 2
    assert r["diff_cold"] < 1e-9 and r["diff_tj"] < 1e-5
    rp.main(["--sizes", "18", "--steps", "4", "--every", "2"])
    row = capsys.readouterr().out.strip().splitlines()[-1].split()
    # m, warm ms, ..., diff torchjd, diff cold, (recording N s)
    assert row[0] == "18" and float(row[1]) > 0 and float(row[-5]) < 1e-5 and float(row[-4]) < 1e-9
