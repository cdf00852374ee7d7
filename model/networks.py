"""R (refiner: encoder R1 -> Gaussian latent Z -> decoder R2) and D (detector), pure nn.Modules.

Patches of ``patch_size`` are reflect-padded to the next multiple of 8 so three stride-2 convolutions
divide evenly; R's output is cropped back, so R maps a (N, C, P, P) batch to the same shape.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from model.config import ModelConfig


def padded_size(patch_size: int) -> int:
    return int(math.ceil(patch_size / 8) * 8)


def pad_patches(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, P, P) patches reflect-padded to (N, C, padded_size(P), padded_size(P)), as R and D read them."""
    extra = padded_size(patch_size) - patch_size
    if extra == 0:
        return x
    before = extra // 2
    return F.pad(x, (before, extra - before, before, extra - before), mode="reflect")


def _conv_block(cin: int, cout: int, config: ModelConfig, norm: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 5, stride=2, padding=2, bias=not norm)]
    if norm:
        layers.append(nn.BatchNorm2d(cout, eps=config.bn_eps, momentum=config.bn_momentum))
    layers.append(nn.LeakyReLU(0.2, inplace=True))
    return nn.Sequential(*layers)


class Refiner(nn.Module):
    """R = R2(R1(X~)): a variational conv autoencoder whose latent is pulled toward N(0, I)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c1, c2, c3 = config.refiner_channels
        self.side = padded_size(config.patch_size) // 8
        self.encoder = nn.Sequential(
            _conv_block(config.channels, c1, config, norm=False),
            _conv_block(c1, c2, config),
            _conv_block(c2, c3, config),
        )
        flat = c3 * self.side * self.side
        self.to_mu = nn.Linear(flat, config.latent_dim)
        self.to_logvar = nn.Linear(flat, config.latent_dim)
        self.from_latent = nn.Linear(config.latent_dim, flat)
        self.decoder = nn.Sequential(
            nn.BatchNorm2d(c3, eps=config.bn_eps, momentum=config.bn_momentum),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(c3, c2, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c2, eps=config.bn_eps, momentum=config.bn_momentum),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c1, eps=config.bn_eps, momentum=config.bn_momentum),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(c1, config.channels, 4, stride=2, padding=1),
            nn.Tanh(),
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """R1: patches -> (mu, log-variance) of the latent Z."""
        h = self.encoder(pad_patches(x, self.config.patch_size)).flatten(1)
        return self.to_mu(h), self.to_logvar(h).clamp(-10.0, 10.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """R2: latent -> patches, cropped back to patch_size."""
        c3 = self.config.refiner_channels[2]
        h = self.from_latent(z).view(-1, c3, self.side, self.side)
        out = self.decoder(h)
        extra = out.shape[-1] - self.config.patch_size
        before = extra // 2
        return out[..., before : before + self.config.patch_size, before : before + self.config.patch_size]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (refined patches, mu, logvar). Z is sampled in training, Z = mu in eval."""
        mu, logvar = self.encode(x)
        if self.training:
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        else:
            z = mu
        return self.decode(z), mu, logvar


class Detector(nn.Module):
    """D: patches -> logit that the patch is a real target-class (normal) patch."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c1, c2, c3 = config.detector_channels
        side = padded_size(config.patch_size) // 8
        self.features = nn.Sequential(
            _conv_block(config.channels, c1, config, norm=False),
            _conv_block(c1, c2, config),
            _conv_block(c2, c3, config),
        )
        self.head = nn.Linear(c3 * side * side, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (N,); sigmoid gives D's probability of 'real normal patch'."""
        return self.head(self.features(pad_patches(x, self.config.patch_size)).flatten(1)).squeeze(1)
