import pytest
import torch

from model.config import ConfigError, ModelConfig
from model.networks import Detector, Refiner


@pytest.mark.parametrize("input_mode", ["appearance", "appearance+motion", "appearance+flow"])
@pytest.mark.parametrize("patch_size", [30, 16, 13])
def test_forward_shapes_and_finite(input_mode: str, patch_size: int) -> None:
    config = ModelConfig(input_mode=input_mode, patch_size=patch_size, stride=patch_size, latent_dim=12)
    refiner, detector = Refiner(config), Detector(config)
    x = torch.rand(5, config.channels, patch_size, patch_size) * 2 - 1
    refined, mu, logvar = refiner(x)
    assert refined.shape == x.shape
    assert mu.shape == logvar.shape == (5, 12)
    assert refined.abs().max() <= 1.0  # tanh output, same scale as the input
    logits = detector(x)
    assert logits.shape == (5,)
    for tensor in (refined, mu, logvar, logits):
        assert torch.isfinite(tensor).all()


def test_every_parameter_receives_a_gradient() -> None:
    config = ModelConfig(input_mode="appearance+motion")
    refiner, detector = Refiner(config), Detector(config)
    x = torch.rand(4, 2, 30, 30) * 2 - 1
    refined, mu, logvar = refiner(x)
    loss = detector(refined).mean() + refined.pow(2).mean() + mu.pow(2).mean() + logvar.mean()
    loss.backward()
    for name, parameter in [*refiner.named_parameters(), *detector.named_parameters()]:
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


def test_eval_mode_is_deterministic_and_uses_the_mean_latent() -> None:
    config = ModelConfig(input_mode="appearance")
    refiner = Refiner(config).eval()
    x = torch.rand(3, 1, 30, 30) * 2 - 1
    assert torch.equal(refiner(x)[0], refiner(x)[0])
    refiner.train()
    assert not torch.equal(refiner(x)[0], refiner(x)[0])  # reparameterised sampling


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="input_mode"):
        ModelConfig(input_mode="colour")
    with pytest.raises(ConfigError, match="stride"):
        ModelConfig(patch_size=30, stride=31)
    with pytest.raises(ConfigError, match="unknown model settings"):
        ModelConfig.from_dict({"patch_size": 30, "colour": True})


def test_config_round_trips_through_a_dict() -> None:
    config = ModelConfig(input_mode="appearance+flow", latent_dim=32, refiner_channels=(8, 16, 32))
    assert ModelConfig.from_dict(config.to_dict()) == config
