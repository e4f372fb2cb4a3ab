"""Every recipe of docs/models.md runs as written (torchvision, transformers and keras recipes skip, saying
why, where the package is missing)."""

from __future__ import annotations

import os

import pytest
from doc_models import blocks

PAGE = "docs/models.md"
RECIPES = blocks(PAGE)


def _run(heading: str) -> dict:
    assert heading in RECIPES, f"{PAGE} has no python block under {heading!r}; it has {sorted(RECIPES)}"
    namespace: dict = {"__name__": "docs_models"}
    exec(compile(RECIPES[heading], f"{PAGE}: {heading}", "exec"), namespace)
    return namespace


def _torchvision() -> None:
    import torchvision_cpu

    try:
        torchvision_cpu.load()
    except ImportError as e:
        pytest.skip(f"torchvision unavailable: {e}")


def test_the_page_has_one_block_per_family():
    assert len(RECIPES) == 5


def test_plain_module_with_torch_losses():
    ns = _run("A plain `nn.Module` with PyTorch losses")
    assert {"digit", "size", "weight/digit"} <= set(ns["result"].history.keys())


def test_aux_logit_classifier():
    _torchvision()
    ns = _run("Classifiers with auxiliary logits (torchvision GoogLeNet, Inception v3)")
    assert ns["result"].history["weight/aux_logits1"] == [0.3]
    assert "out" in ns["scores"]


def test_torchvision_detection():
    _torchvision()
    ns = _run("torchvision detection (Faster R-CNN)")
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= set(
        ns["result"].history.keys()
    )


def test_hugging_face():
    pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ns = _run("Hugging Face transformers")
    assert "loss/port" in ns["result"].history and "logits" in ns["tagged"].history


def test_keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip(f"keras runs on the {keras.backend.backend()!r} backend here")
    ns = _run("Keras 3 (torch backend)")
    assert {"cls", "reg"} <= set(ns["result"].history.keys())
