"""lossport.training.state: checkpoints that name their file when unreadable, refuse another run's balancer,
lock their directory, and clear an interrupted write's temporary file."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_train import LOSS, TwoHead, make_data

from lossport import CheckpointError, load_checkpoint, train
from lossport.training.state import CheckpointDir

torch.set_num_threads(1)
KW = {"epochs": 2, "batch_size": 8, "seed": 0, "progress": False}


@pytest.mark.parametrize(
    ("first", "second"), [("famo", "uw"), ("uw", None), (None, "uw"), ("uw", "pcgrad"), ("dwa", "famo")]
)
def test_resume_with_another_balancer_is_refused_naming_both(tmp_path: Path, first, second) -> None:
    d = make_data()
    train(TwoHead(), d, LOSS, balance=first, checkpoint=tmp_path, **KW)
    with pytest.raises(CheckpointError, match="balanced by") as err:
        train(TwoHead(), d, LOSS, balance=second, checkpoint=tmp_path, resume=True, **{**KW, "epochs": 3})
    msg = str(err.value)
    assert str(tmp_path / "checkpoint.pt") in msg and "same balance=" in msg
    assert ("static weights" in msg) == (first is None or second is None)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all\n", "half"])
def test_unreadable_checkpoint_names_the_file(tmp_path: Path, content) -> None:
    d = make_data()
    train(TwoHead(), d, LOSS, checkpoint=tmp_path, **KW)
    path = tmp_path / "checkpoint.pt"
    if content == "half":
        data = path.read_bytes()
        content = data[: len(data) // 2]
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable lossport checkpoint") as err:
        load_checkpoint(tmp_path)
    assert str(path) in str(err.value)
    with pytest.raises(CheckpointError, match=str(path)):
        train(TwoHead(), d, LOSS, checkpoint=tmp_path, resume=True, **KW)


def test_foreign_pickle_and_missing_file(tmp_path: Path) -> None:
    torch.save({"weights": torch.ones(2)}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="not a lossport training checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint there"):
        load_checkpoint(tmp_path / "elsewhere")


def test_resume_with_another_net_is_a_checkpoint_error(tmp_path: Path) -> None:
    d = make_data()
    train(TwoHead(), d, LOSS, checkpoint=tmp_path, **KW)

    class Wider(TwoHead):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))

    with pytest.raises(CheckpointError, match="does not fit this run's net"):
        train(Wider(), d, LOSS, checkpoint=tmp_path, resume=True, **{**KW, "epochs": 3})


def test_directory_is_locked_while_a_run_holds_it(tmp_path: Path) -> None:
    """A second process cannot take the directory while the first holds it; the lock dies with the holder."""
    holder = CheckpointDir(tmp_path)
    holder.acquire()
    script = textwrap.dedent(
        f"""
        from lossport.training.state import CheckpointDir
        from lossport import CheckpointError
        try:
            CheckpointDir({str(tmp_path)!r}).acquire()
        except CheckpointError as e:
            print("refused:", e)
        else:
            print("acquired")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("refused:") and "in use by another training run" in out, out
    holder.release()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("acquired"), out


def test_stale_temporary_files_are_removed_when_a_run_starts(tmp_path: Path) -> None:
    stale = [tmp_path / ".checkpoint.pt.abc123.tmp", tmp_path / ".history.csv.x1.tmp"]
    for p in stale:
        p.write_bytes(b"partial")
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    train(TwoHead(), make_data(), LOSS, checkpoint=tmp_path, **KW)
    assert not any(p.exists() for p in stale) and keep.exists()
    assert load_checkpoint(tmp_path)["round"] == 2


def test_monitor_schedule_is_checkpointed(tmp_path: Path) -> None:
    """The monitor samples every K steps across rounds; a resumed run samples the same steps."""
    d = make_data(48)
    full = train(TwoHead(), d, LOSS, monitor=5, **{**KW, "epochs": 4})
    train(TwoHead(), d, LOSS, monitor=5, checkpoint=tmp_path, **KW)
    resumed = train(TwoHead(), d, LOSS, monitor=5, checkpoint=tmp_path, resume=True, **{**KW, "epochs": 4})
    key = "monitor/cos/a/b"
    assert full.history[key] == pytest.approx(resumed.history[key], nan_ok=True)
