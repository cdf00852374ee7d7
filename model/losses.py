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
    """||X - R(X~)||^2: the squared L2 norm of each patch's error, averaged over the batch.

    A sum over pixels, as eq. (5) writes it. (A per-pixel mean would shrink this term ~1800-fold for
    a 2-channel 30x30 patch and leave R to the adversarial term alone: measured, R then reconstructs
    held-out patches at an MSE of ~0.15 on the [-1, 1] scale and the reconstruction score is noise.)
    """
    return (refined - target).pow(2).flatten(1).sum(1).mean()


def kl_loss(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)), summed over latent dimensions, averaged over the batch."""
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)).mean()


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
