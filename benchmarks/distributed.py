"""Step time of `lossport.train` on the demo problem: 1 process against 2 torchrun processes (gloo, CPU).

Both runs see the same global batch (64 examples: 1 x 64 or 2 x 32), one thread per process, MultiDigitsNet
on 2000 multidigits examples, 3 rounds. Printed: seconds per optimizer step (training time / steps, from
the result of rank 0) for each balancer given.

    .venv/bin/python benchmarks/distributed.py [--methods ew,uw,upgrad,upgrad@features] [--distributed fsdp]

``--distributed fsdp`` shards the net of the 2-process run with FSDP2 (``lossport.fsdp``) instead of DDP;
``method@features`` is a Gramian method with ``gramian="features"`` on the trunk's output.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

SCRIPT = r"""
import json, sys, torch, lossport
from lossport.data import MultiDigitsNet, multidigits
torch.set_num_threads(1)
method, batch, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
net = MultiDigitsNet(width=16)
name, _, gram = method.partition("@")
balance = lossport.balance.resolve(name, gramian="features", features=net.trunk) if gram else name
balance = None if name == "ew" else balance
res = lossport.train(
    net, multidigits("train", size=2000), balance=balance,
    epochs=3, batch_size=batch, progress=False, seed=0, device="cpu", distributed=mode,
)
steps = len(res.history.batches)
if lossport.distributed.rank() == 0:
    print(json.dumps({"seconds_per_step": res.seconds / steps, "loss": res.history.rounds[-1]["loss"]}))
"""


def run(cmd: list[str]) -> dict:
    import json

    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="ew,uw,upgrad")
    ap.add_argument("--distributed", default="ddp", choices=("ddp", "fsdp"))
    args = ap.parse_args()
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(SCRIPT)
        script = f.name
    print(f"{'method':16s} {'1 proc ms/step':>15s} {'2 procs ms/step':>16s} {'ratio':>6s} {'final loss 1 / 2':>20s}")
    for m in args.methods.split(","):
        one = run([sys.executable, script, m, "64", "auto"])
        two = run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node=2",
                "--master_port=29533",
                script,
                m,
                "32",
                args.distributed,
            ]
        )
        print(
            f"{m:16s} {one['seconds_per_step'] * 1e3:15.1f} {two['seconds_per_step'] * 1e3:16.1f} "
            f"{two['seconds_per_step'] / one['seconds_per_step']:6.2f} {one['loss']:9.4f} / {two['loss']:.4f}"
        )
    os.unlink(script)


if __name__ == "__main__":
    main()
