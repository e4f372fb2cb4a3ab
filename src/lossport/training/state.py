"""Everything a training run carries between rounds, as one ``state_dict``, and the checkpoint directory.

``DIR/checkpoint.pt`` is rewritten at the end of every round, atomically (:mod:`lossport.atomic`), with the
net, the optimizer, scheduler, GradScaler, balancer and monitor states, the history, the best net, the
early-stopping and best-net trackers, callbacks that have state, the RNG states (torch CPU and CUDA, numpy,
Python ``random``, the data generators) and the round number. A run holds an exclusive lock on ``DIR`` (an
``flock`` on ``DIR/.lock``, released when the process ends, even by SIGKILL), so two runs never write the same
directory; temporary files of an interrupted write are removed when a run takes the lock. Checkpoints are
pickles: load only your own.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor, nn

from ..atomic import atomic_write, remove_stale_temporaries
from ..callbacks import Callback
from ..errors import CheckpointError
from ..history import History
from .tracking import Tracker

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = 2


@dataclass
class TrainingState:
    """The state of a run. The objects are the run's own (trained in place); :meth:`state_dict` and
    :meth:`load_state_dict` cover all of them, so a new piece of state is one field here."""

    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    balancer: Any
    monitor: Any
    history: History
    stopper: Tracker | None
    best: Tracker | None
    callbacks: Sequence[Callback]
    generators: Sequence[torch.Generator]
    round: int = 0
    best_state: dict[str, Tensor] | None = None
    stopped_because: str = "completed"
    train_seconds: float = 0.0
    train_examples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def keep_best(self) -> None:
        """Copy the net's current weights as the best net's (on the CPU)."""
        self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.net.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        def sd(obj: Any) -> Any:
            return obj.state_dict() if obj is not None else None

        return {
            "format": FORMAT,
            "round": self.round,
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": sd(self.scheduler),
            "scaler": sd(self.scaler),
            "balancer_class": type(self.balancer).__name__ if self.balancer is not None else None,
            "balancer": sd(self.balancer),
            "monitor": sd(self.monitor),
            "history": self.history.state_dict(),
            "stopper": sd(self.stopper),
            "best": sd(self.best),
            "best_state": self.best_state,
            "callbacks": {f"callback{i}": sd(c) for i, c in enumerate(self.callbacks) if hasattr(c, "state_dict")},
            "rng": _get_rng(self.generators),
            "stopped_because": self.stopped_because,
            "train_seconds": self.train_seconds,
            "train_examples": self.train_examples,
        }

    def load_state_dict(
        self, ck: Mapping[str, Any], where: str = "the checkpoint", *, net_loaded: bool = False
    ) -> None:
        """Restore every piece; a checkpoint of another configuration is a :class:`CheckpointError`.
        ``net_loaded``: the net and optimizer were already loaded (from sharded files, :mod:`lossport.fsdp`)."""
        self._check_balancer(ck, where)
        try:
            if not net_loaded:
                self.net.load_state_dict(ck["net"])
                self.optimizer.load_state_dict(ck["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(
                f"{where} does not fit this run's net or optimizer ({err}); resume with the same net and optimizer "
                "as the interrupted run, or start afresh in another checkpoint directory"
            ) from err
        for obj, key in ((self.scheduler, "scheduler"), (self.scaler, "scaler"), (self.balancer, "balancer")):
            if obj is not None and ck.get(key) is not None:
                obj.load_state_dict(ck[key])
        if self.monitor is not None and ck.get("monitor") is not None:
            self.monitor.load_state_dict(ck["monitor"])
        self.history.load_state_dict(ck["history"])
        if self.stopper is not None and ck.get("stopper") is not None:
            self.stopper.load_state_dict(ck["stopper"])
        if self.best is not None and ck.get("best") is not None:
            self.best.load_state_dict(ck["best"])
            self.best_state = ck.get("best_state")
        saved = ck.get("callbacks", {})
        for i, cb in enumerate(self.callbacks):
            if hasattr(cb, "load_state_dict") and f"callback{i}" in saved:
                cb.load_state_dict(saved[f"callback{i}"])
        _set_rng(ck["rng"], self.generators)
        self.round = int(ck["round"])
        self.train_seconds = float(ck.get("train_seconds", 0.0))
        self.train_examples = int(ck.get("train_examples", 0))
        self.stopped_because = ck.get("stopped_because", "completed")

    def _check_balancer(self, ck: Mapping[str, Any], where: str) -> None:
        saved = ck.get("balancer_class")
        if saved is None and ck.get("balancer") is not None:  # format 1: no class recorded
            return
        mine = type(self.balancer).__name__ if self.balancer is not None else None
        if saved != mine:
            raise CheckpointError(
                f"{where} was written by a run balanced by {saved or 'static weights (no balancer)'}, but this run "
                f"uses {mine or 'static weights (no balancer)'}: its state would be lost or misread. Resume with "
                "the same balance= as the interrupted run, or start afresh in another checkpoint directory"
            )


class CheckpointDir:
    """A checkpoint directory owned by one run: locked while the run lives (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / CHECKPOINT_NAME
        self._lock: IO[Any] | None = None

    def acquire(self) -> None:
        """Take the directory's lock, or raise naming the process that holds it; then clear stale temporaries."""
        f = open(self.dir / ".lock", "a+")  # noqa: SIM115 - held open for the run's lifetime
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no flock on this platform: no lock
            pass
        except OSError as err:
            f.seek(0)
            owner = f.read().strip() or "another process"
            f.close()
            raise CheckpointError(
                f"{self.dir} is in use by another training run ({owner}); two runs must not write one checkpoint "
                "directory: wait for it to end or choose another directory"
            ) from err
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        self._lock = f
        for name in (CHECKPOINT_NAME, "history.csv"):
            remove_stale_temporaries(self.dir, name)

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file releases the flock
            self._lock = None

    def save(self, payload: Mapping[str, Any]) -> None:
        atomic_write(self.path, lambda f: torch.save(dict(payload), f))


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The content of a checkpoint written by :func:`lossport.train` (its directory or the file itself); a
    missing, truncated or foreign file is a :class:`~lossport.CheckpointError` naming it."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.exists():
        raise FileNotFoundError(f"{p}: no checkpoint there")
    try:
        ck = torch.load(p, map_location="cpu", weights_only=False)
    except (EOFError, pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, OSError, ValueError) as err:
        size = p.stat().st_size
        raise CheckpointError(
            f"{p} is not a readable lossport checkpoint ({size} bytes; {type(err).__name__}: {err}); it may be "
            "truncated or another kind of file. Delete it to start afresh"
        ) from err
    if not isinstance(ck, dict) or "round" not in ck or "net" not in ck:
        raise CheckpointError(f"{p} holds a {type(ck).__name__} that is not a lossport training checkpoint")
    return ck


def _get_rng(generators: Sequence[torch.Generator]) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "data": [g.get_state() for g in generators],
    }


def _set_rng(state: Mapping[str, Any], generators: Sequence[torch.Generator]) -> None:
    saved = state.get("data", [])
    if len(saved) != len(generators):
        raise CheckpointError(
            f"the checkpoint has {len(saved)} data generator states but this run shuffles with {len(generators)}; "
            "resume with the same data form and arguments as the interrupted run"
        )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    for g, s in zip(generators, saved):
        g.set_state(s)


__all__ = ["CHECKPOINT_NAME", "CheckpointDir", "TrainingState", "load_checkpoint"]
