import numpy as np
import pytest

from model.calibrate import threshold_from_normal
from model.scoring import causal_mean
from model.stopping import StoppingRule


def test_stopping_rule_on_a_synthetic_run() -> None:
    """R improves for three epochs then plateaus; D reaches the target at epoch 4."""
    rule = StoppingRule(patience=2, separation_target=0.9)
    reconstruction = [0.30, 0.20, 0.15, 0.16, 0.17, 0.18, 0.14]
    separation = [0.60, 0.70, 0.85, 0.95, 0.80, 0.99, 0.99]
    d_loss = [1.00, 0.90, 0.70, 0.50, 0.60, 0.40, 0.30]
    kept_r, kept_d, stopped_at = [], [], None
    for epoch, (rec, sep, loss) in enumerate(zip(reconstruction, separation, d_loss), start=1):
        if rule.observe_reconstruction(rec):
            kept_r.append(epoch)
        if rule.observe_detector(sep, loss):
            kept_d.append(epoch)
        if rule.should_stop:
            stopped_at = epoch
            break
    assert kept_r == [1, 2, 3]  # condition 1: best held-out reconstruction
    assert kept_d == [1, 2, 3, 4]  # best held-out D loss (epoch 5 got worse: not kept)
    assert stopped_at == 5  # R stale for 2 epochs and D separated
    assert rule.best_reconstruction == 0.15 and rule.best_separation == 0.95


def test_stopping_rule_keeps_going_while_d_does_not_separate() -> None:
    rule = StoppingRule(patience=1, separation_target=0.9)
    for rec in (0.1, 0.2, 0.3, 0.4):
        rule.observe_reconstruction(rec)
        rule.observe_detector(0.6, 0.5)
        assert not rule.should_stop
    rule.observe_detector(0.91, 0.6)
    assert rule.should_stop


def test_d_is_kept_by_loss_once_the_auc_saturates() -> None:
    rule = StoppingRule(patience=1, separation_target=0.9)
    assert rule.observe_detector(1.0, 0.30)
    assert rule.observe_detector(1.0, 0.10)  # same AUC, better D: kept
    assert not rule.observe_detector(1.0, 0.20)


def test_threshold_is_the_false_alarm_quantile_of_normal_scores() -> None:
    scores = np.random.default_rng(0).standard_normal(200_000)
    tau, (low, high) = threshold_from_normal(scores, 0.01, (0.005, 0.05))
    assert tau == pytest.approx(2.326, abs=0.03)  # N(0,1) upper 1% point
    assert low == pytest.approx(1.645, abs=0.03)  # 5%
    assert high == pytest.approx(2.576, abs=0.03)  # 0.5%
    assert (scores > tau).mean() == pytest.approx(0.01, abs=0.001)


def test_threshold_needs_scores() -> None:
    with pytest.raises(ValueError, match="no normal frame scores"):
        threshold_from_normal(np.array([]), 0.01, (0.005, 0.05))


def test_causal_mean_never_looks_ahead() -> None:
    scores = np.array([0.0, 0.0, 9.0, 0.0, 0.0])
    smoothed = causal_mean(scores, 3)
    assert smoothed.tolist() == [0.0, 0.0, 3.0, 3.0, 3.0]
    assert causal_mean(scores, 1).tolist() == scores.tolist()
