import pytest

from lossport.compare import delta_m, higher_is_better


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
