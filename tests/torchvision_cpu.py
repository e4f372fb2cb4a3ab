"""Load the real torchvision next to a CPU-only torch, for the model tests.

PyPI's x86_64 torchvision wheels are CUDA builds: their compiled extension ``_C.so`` links
``libtorch_cuda.so`` and does not load next to the CPU torch wheel. torchvision's Python code then
fails at import (``operator torchvision::nms does not exist``), because its fake-tensor registrations
name that operator. This helper

1. loads the compiled extension when it can (a CPU build, or a CUDA torch): then nothing is replaced;
2. otherwise defines ``torchvision::nms`` (and ``qnms``, which the import also names) with a greedy
   pure-Python kernel, the algorithm of torchvision's C++ CPU kernel: boxes in decreasing score order,
   each kept box suppresses the later ones whose IoU with it exceeds the threshold.

``torchvision.ops.boxes._assert_has_ops`` (its check that ``_C.so`` loaded) is replaced by a check
that ``torchvision::nms`` exists. Everything else is the real torchvision code; ``roi_align`` already
falls back to torchvision's own pure-Python ``_roi_align`` when the extension is missing (run here
eagerly, without its lazy ``torch.compile``). Because a broken torchvision in site-packages would break
every ``import transformers`` or ``import torchmetrics`` of other tests, the Makefile installs
torchvision outside site-packages, in ``<venv>/torchvision-cpu`` (``pip install --no-deps --target``);
``load()`` adds that folder to ``sys.path`` and defines the operators before it imports torchvision.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

import numpy as np
import torch

SIDE_DIR = os.environ.get("LOSSPORT_TORCHVISION_DIR", os.path.join(sys.prefix, "torchvision-cpu"))
_LIB: torch.library.Library | None = None
NMS_SOURCE = "none"


def _greedy_nms(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of the kept boxes, in decreasing score order (torchvision's CPU kernel, in Python)."""
    if dets.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=dets.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    boxes = dets[order].detach().to(torch.float64).cpu()
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    rows = []
    for start in range(0, len(boxes), 1024):  # the IoU > threshold matrix, 1024 rows at a time
        b = boxes[start : start + 1024]
        lt = torch.maximum(b[:, None, :2], boxes[None, :, :2])
        rb = torch.minimum(b[:, None, 2:], boxes[None, :, 2:])
        inter = (rb - lt).clamp(min=0).prod(dim=2)
        rows.append((inter / (area[start : start + 1024, None] + area[None, :] - inter) > iou_threshold).numpy())
    over = np.concatenate(rows)
    suppressed = np.zeros(len(boxes), dtype=bool)
    keep: list[int] = []
    for i in range(len(boxes)):
        if not suppressed[i]:
            keep.append(i)
            suppressed |= over[i]  # boxes before i are kept or already suppressed: no change to them
    return order[torch.tensor(keep, dtype=torch.long, device=dets.device)]


def _define_ops() -> None:
    global _LIB
    lib = torch.library.Library("torchvision", "DEF")
    for name in ("nms", "qnms"):
        lib.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.impl(name, _greedy_nms, "CPU")
    _LIB = lib


def _extension_loads(package_dir: str) -> bool:
    names = [n for n in os.listdir(package_dir) if n.startswith("_C") and n.endswith(".so")]
    for name in names:
        try:
            torch.ops.load_library(os.path.join(package_dir, name))
            return True
        except (OSError, RuntimeError):
            continue
    return False


def load() -> ModuleType:
    """Import torchvision (site-packages first, then ``SIDE_DIR``); raise ImportError saying why not."""
    global NMS_SOURCE
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    spec = importlib.util.find_spec("torchvision")
    if spec is None and os.path.isdir(os.path.join(SIDE_DIR, "torchvision")):
        sys.path.append(SIDE_DIR)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"torchvision is not installed (nor in {SIDE_DIR}); run `make test` to install it there")
    if _extension_loads(next(iter(spec.submodule_search_locations))):
        NMS_SOURCE = "torchvision's compiled extension"
    elif not hasattr(torch.ops.torchvision, "nms"):
        _define_ops()
        NMS_SOURCE = "pure-Python greedy NMS (tests/torchvision_cpu.py)"
    import torchvision

    if SIDE_DIR in sys.path:
        # loaded: its submodules are found through the package itself. Off the path, so that processes spawned
        # later (DDP tests) whose imports probe for torchvision (torchmetrics does) do not load it without the ops
        sys.path.remove(SIDE_DIR)
    if _LIB is not None:
        # torchvision.ops.nms checks that the compiled extension loaded; the operator it calls is ours.
        torchvision.ops.boxes._assert_has_ops = _assert_nms_defined
        # torchvision's pure-Python roi_align compiles itself with inductor on first use (seconds to minutes on
        # a CPU, again for new shapes); its eager form is the same code, faster for the tiny tests here.
        module = sys.modules["torchvision.ops.roi_align"]
        module._roi_align = getattr(module._roi_align, "__wrapped__", module._roi_align)
    return torchvision


def _assert_nms_defined() -> None:
    if not hasattr(torch.ops.torchvision, "nms"):
        raise RuntimeError("torchvision::nms is not defined")
