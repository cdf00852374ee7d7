import math

import torch

from model.losses import detector_loss, kl_loss, reconstruction_loss, refiner_adversarial_loss, refiner_loss


def test_detector_loss_at_even_odds_is_two_log_two() -> None:
    zeros = torch.zeros(4)
    assert math.isclose(detector_loss(zeros, zeros).item(), 2 * math.log(2), rel_tol=1e-6)


def test_detector_loss_rewards_the_right_answer() -> None:
    confident_right = detector_loss(torch.full((3,), 10.0), torch.full((3,), -10.0))
    confident_wrong = detector_loss(torch.full((3,), -10.0), torch.full((3,), 10.0))
    assert confident_right.item() < 1e-3
    assert math.isclose(confident_wrong.item(), 20.0, rel_tol=1e-3)


def test_refiner_adversarial_loss_is_minus_log_d() -> None:
    logit = torch.tensor([math.log(3.0)])  # D = 0.75
    assert math.isclose(refiner_adversarial_loss(logit).item(), -math.log(0.75), rel_tol=1e-6)


def test_reconstruction_is_the_squared_norm_per_patch_averaged_over_the_batch() -> None:
    target = torch.zeros(2, 1, 2, 2)
    refined = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]]], [[[0.0, 0.0], [0.0, 3.0]]]])
    assert math.isclose(reconstruction_loss(target, refined).item(), ((1 + 4) + 9) / 2)


def test_kl_is_zero_at_the_prior_and_hand_computed_elsewhere() -> None:
    assert kl_loss(torch.zeros(2, 3), torch.zeros(2, 3)).item() == 0.0
    # per dimension: 0.5 * (mu^2 + e^lv - 1 - lv), summed over dimensions; mu = 1, lv = 0 -> 3 * 0.5
    assert math.isclose(kl_loss(torch.ones(2, 3), torch.zeros(2, 3)).item(), 1.5)
    # mu = 0, lv = log 2 -> 4 * 0.5 * (2 - 1 - log 2)
    expected = 4 * 0.5 * (1 - math.log(2))
    assert math.isclose(kl_loss(torch.zeros(1, 4), torch.full((1, 4), math.log(2))).item(), expected, rel_tol=1e-6)


def test_refiner_loss_weights_the_terms_as_eq_5() -> None:
    target = torch.zeros(1, 1, 2, 2)
    refined = torch.ones(1, 1, 2, 2)  # rec = 4 (four pixels, error 1 each)
    mu, logvar = torch.ones(1, 2), torch.zeros(1, 2)  # kl = 2 * 0.5
    logits = torch.zeros(1)  # adv = log 2
    total, terms = refiner_loss(logits, target, refined, mu, logvar, lambda_rec=0.4, lambda_kl=0.2)
    assert math.isclose(total.item(), math.log(2) + 0.4 * 4 + 0.2 * 1.0, rel_tol=1e-6)
    assert terms["rec"] == 4.0 and terms["kl"] == 1.0
