"""The three terms of eq. (5): L = L_GAN(R, D) + lambda1 * ||X - R(X~)||^2 + lambda2 * KL(Z || N(0, I))."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def detector_loss(real_logits: torch.Tensor, refined_logits: torch.Tensor) -> torch.Tensor:
    """D's side of L_GAN: real target patches -> 1, R's output -> 0 (binary cross-entropy)."""
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    refined = F.binary_cross_entropy_with_logits(refined_logits, torch.zeros_like(refined_logits))
    return real + refined


def refiner_adversarial_loss(refined_logits: torch.Tensor) -> torch.Tensor:
    """R's side of L_GAN (non-saturating form): R wants D to call its output real."""
    return F.binary_cross_entropy_with_logits(refined_logits, torch.ones_like(refined_logits))


def reconstruction_loss(target: torch.Tensor, refined: torch.Tensor) -> torch.Tensor:
    """||X - R(X~)||^2, averaged over pixels and batch."""
    return F.mse_loss(refined, target)


def kl_loss(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)), averaged over latent dimensions and batch.

    A per-dimension mean, like the per-pixel mean of the reconstruction term, so lambda1 and lambda2
    weigh quantities of the same scale whatever |Z| and the patch size are (a sum over 64+ dimensions
    against a per-pixel mean collapses the latent and R outputs the mean patch).
    """
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).mean()


def refiner_loss(
    refined_logits: torch.Tensor,
    target: torch.Tensor,
    refined: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    lambda_rec: float,
    lambda_kl: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. (5) for R; returns the total and each term for logging."""
    adversarial = refiner_adversarial_loss(refined_logits)
    reconstruction = reconstruction_loss(target, refined)
    kl = kl_loss(mu, logvar)
    total = adversarial + lambda_rec * reconstruction + lambda_kl * kl
    terms = {"adv": adversarial.item(), "rec": reconstruction.item(), "kl": kl.item()}
    return total, terms
