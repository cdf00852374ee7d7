"""The inference-fused copy of R and D (model/inference.py) scores like the modules it was built from."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.config import ModelConfig
from model.inference import ORT_TOLERANCE, FusedNets, InferenceEngine, onnxruntime_available, phase_weight
from model.networks import Detector, Refiner
from model.scoring import COMPONENTS, PatchScorer

# float32 rounding only: relative to each component's scale over the batch
TOLERANCE = 1e-4


def _randomised(module: nn.Module, seed: int) -> nn.Module:
    """Non-trivial batch-norm statistics and affine terms, so folding has something to fold."""
    generator = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) * 2 + 0.2)
            m.weight.data.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=generator) * 0.2)
    return module.eval()


def _pair(config: ModelConfig, seed: int = 0) -> tuple[Refiner, Detector]:
    torch.manual_seed(seed)
    return _randomised(Refiner(config), seed), _randomised(Detector(config), seed + 1)  # type: ignore[return-value]


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().amax(0).clamp_min(1e-3)
    return float(((out - ref).abs() / scale).max())


@pytest.mark.parametrize("input_mode", ["appearance", "appearance+flow"])
@pytest.mark.parametrize("patch_size", [30, 16, 13])
@pytest.mark.parametrize("channels_last", [True, False])
def test_folded_networks_equal_the_modules(input_mode: str, patch_size: int, channels_last: bool) -> None:
    config = ModelConfig(input_mode=input_mode, patch_size=patch_size, stride=patch_size, latent_dim=16)
    refiner, detector = _pair(config)
    scorer = PatchScorer(refiner, detector, config, fused=False)
    x = torch.rand(37, config.channels, patch_size, patch_size) * 2 - 1
    reference = scorer.reference_scores(x)  # the network components, by their definition
    for phase in (0, 4, 64):  # transposed convolutions native, the narrow one as phases, all as phases
        nets = FusedNets(refiner, detector, channels_last=channels_last, phase_max_cout=phase)
        with torch.inference_mode():
            out = nets(x)
        assert out.shape == reference.shape
        assert _relative_error(out, reference) < TOLERANCE, (phase, (out - reference).abs().amax(0))


def test_the_scorer_serves_the_fused_copy_and_keeps_the_contract() -> None:
    config = ModelConfig(input_mode="appearance+motion")
    refiner, detector = _pair(config, seed=3)
    fused, plain = PatchScorer(refiner, detector, config), PatchScorer(refiner, detector, config, fused=False)
    assert fused.engine is not None and plain.engine is None
    x = torch.rand(200, 2, 30, 30) * 2 - 1
    a, b = fused.raw_scores(x, batch_size=64), plain.raw_scores(x)
    assert a.shape == (200, len(COMPONENTS)) and a.dtype == torch.float32 and a.device.type == "cpu"
    assert _relative_error(a, b) < TOLERANCE
    assert fused.raw_scores(x[:0]).shape == (0, len(COMPONENTS))
    # the original modules keep their weights and their batch norms (training is unaffected)
    assert any(isinstance(m, nn.BatchNorm2d) for m in fused.refiner.modules())


def test_transposed_convolution_as_phases() -> None:
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(6, 3, 4, stride=2, padding=1)
    x = torch.randn(5, 6, 7, 9)
    weight = phase_weight(conv.weight.detach())
    out = nn.functional.pixel_shuffle(nn.functional.conv2d(x, weight, conv.bias.repeat_interleave(4), padding=1), 2)
    assert torch.allclose(out, conv(x), atol=1e-5)


@pytest.mark.skipif(not onnxruntime_available(), reason="onnx / onnxruntime not installed (the [onnx] extra)")
def test_onnxruntime_backend_scores_like_torch() -> None:
    config = ModelConfig(input_mode="appearance+flow")
    refiner, detector = _pair(config, seed=5)
    reference = PatchScorer(refiner, detector, config, fused=False)
    x = torch.rand(300, 2, 30, 30) * 2 - 1
    expected = reference.raw_scores(x)
    for workers in (1, 2):
        engine = InferenceEngine(refiner, detector, backend="onnxruntime", cpu_workers=workers)
        assert engine.backend == "onnxruntime"
        out = engine.raw_scores(x, batch_size=256)
        assert _relative_error(out, expected[:, : out.shape[1]]) < ORT_TOLERANCE
    forced = InferenceEngine(refiner, detector, backend="torch")
    assert forced.backend == "torch" and forced.ort is None
