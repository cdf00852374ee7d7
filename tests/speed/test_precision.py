"""CPU precisions behind VAD_PRECISION (model/inference.py, precision.py, quantize.py, cpu_features.py):
what the CPU offers is read correctly, a precision is kept only when it passes the check against float32
(else float32 with a warning saying why), int8 calibrates on exactly the footage it is given, and
VAD_PRECISION refuses what it does not know. No speed is asserted."""

from __future__ import annotations

import logging

import pytest
import torch
from pydantic import ValidationError

from model import inference, registry
from model.cli import PRECISION_CHOICES
from model.cpu_features import CpuFeatures, detect_cpu_features, read_cpu_flags
from model.inference import PRECISIONS, InferenceEngine, onnxruntime_available
from model.precision import TOLERANCE, probe_patches, scene_patches, score_difference
from model.quantize import calibration_set, stretched_motion

needs_ort = pytest.mark.skipif(not onnxruntime_available(), reason="int8 runs under ONNX Runtime: onnx + onnxruntime not installed")
needs_bf16 = pytest.mark.skipif(not detect_cpu_features().bf16_hardware,
                                reason="this CPU has no bf16 hardware (AVX512-BF16 or AMX): bf16 is refused here by design")

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8
processor\t: 1
flags\t\t: fpu
"""


@pytest.fixture(scope="module")
def version() -> registry.LoadedVersion:
    """The bundled default version: real weights and a real calibration (its score spread)."""
    return registry.load_version(registry.BUNDLED_WEIGHTS_DIR, "v0003", "cpu")


def engine(version: registry.LoadedVersion, precision: str, **options) -> InferenceEngine:
    return InferenceEngine(version.refiner, version.detector, "cpu", precision=precision,
                           calibration=version.calibration, cpu_workers=1, **options)


def test_cpu_flags_are_read_from_cpuinfo() -> None:
    flags = read_cpu_flags(CPUINFO)
    features = CpuFeatures(flags, "AVX512", onednn_bf16=True)
    assert features.avx512 and features.avx512_bf16 and features.amx_bf16 and features.amx_int8 and features.vnni
    assert features.bf16_hardware
    assert not CpuFeatures(frozenset({"avx2", "amx_bf16"}), "AVX2", onednn_bf16=True).amx_bf16  # no tiles, no AMX
    bare = CpuFeatures(frozenset({"avx2"}), "AVX2", onednn_bf16=False)
    assert not (bare.avx512 or bare.vnni or bare.bf16_hardware)
    assert set(bare.to_dict()) == {"avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "vnni", "torch_capability", "onednn_bf16"}
    here = detect_cpu_features()
    assert here.torch_capability == torch.backends.cpu.get_cpu_capability() and "torch kernels" in here.summary()


@needs_bf16
def test_bf16_passes_the_check_and_runs(version: registry.LoadedVersion) -> None:
    bf16 = engine(version, "bf16")
    report = bf16.precision_report["candidates"]["bf16"]
    assert bf16.precision == "bf16" and bf16.backend == "torch" and report["passed"]
    assert 0 < report["max_diff_over_spread"] <= TOLERANCE
    probe = probe_patches(version.config)
    reference = engine(version, "float32").raw_scores(probe)
    assert 0 < score_difference(reference, bf16.raw_scores(probe), version.calibration) <= TOLERANCE


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_a_precision_over_the_tolerance_falls_back_to_float32_with_a_warning(
    version: registry.LoadedVersion, precision: str, caplog: pytest.LogCaptureFixture,
) -> None:
    if precision == "bf16" and not detect_cpu_features().bf16_hardware:
        pytest.skip("this CPU has no bf16 hardware")
    if precision == "int8" and not onnxruntime_available():
        pytest.skip("onnx + onnxruntime not installed")
    with caplog.at_level(logging.WARNING, logger="vad.model"):
        refused = engine(version, precision, tolerance=0.0)  # any difference at all is too much
    candidate = refused.precision_report["candidates"][precision]
    assert refused.precision == "float32" and not candidate["passed"] and candidate["max_diff_over_spread"] > 0
    assert any(f"precision {precision} not used, scoring in float32" in r.getMessage() for r in caplog.records)
    probe = probe_patches(version.config)
    assert torch.equal(refused.raw_scores(probe), engine(version, "float32").raw_scores(probe))


@needs_ort
def test_a_corrupted_quantised_copy_is_refused(version: registry.LoadedVersion, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """The check catches a quantised model that is wrong, not just imprecise: here one whose outputs
    are those of another version's networks (D's bias shifted by 3 logits)."""
    shifted = registry.load_version(registry.BUNDLED_WEIGHTS_DIR, "v0003", "cpu")
    with torch.no_grad():
        shifted.detector.head.bias += 3.0
    wrong = inference.export_onnx(inference.FusedNets(shifted.refiner, shifted.detector, channels_last=False, phase_max_cout=0),
                                  version.config.channels, version.config.patch_size)
    monkeypatch.setattr(inference, "quantize_int8", lambda model, patches: wrong)
    with caplog.at_level(logging.WARNING, logger="vad.model"):
        refused = engine(version, "int8")
    assert refused.precision == "float32"
    assert refused.precision_report["candidates"]["int8"]["max_diff_over_spread"] > TOLERANCE
    assert any("precision int8 not used" in r.getMessage() for r in caplog.records)


def test_bf16_without_bf16_hardware_is_refused_before_it_runs(version: registry.LoadedVersion, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(inference, "detect_cpu_features", lambda: CpuFeatures(frozenset({"avx2"}), "AVX2", False))
    with caplog.at_level(logging.WARNING, logger="vad.model"):
        refused = engine(version, "bf16")
    assert refused.precision == "float32"
    assert "no bf16 hardware" in refused.precision_report["candidates"]["bf16"]["reason"]
    assert any("no bf16 hardware" in r.getMessage() for r in caplog.records)


def test_fp16_on_the_cpu_runs_float32_with_a_warning(version: registry.LoadedVersion, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="vad.model"):
        assert engine(version, "fp16").precision == "float32"
    assert any("fp16 is CUDA only" in r.getMessage() for r in caplog.records)


def test_auto_keeps_a_precision_only_if_it_passes(version: registry.LoadedVersion) -> None:
    chosen = engine(version, "auto")
    report = chosen.precision_report
    passing = [name for name, entry in report["candidates"].items() if entry["passed"]]
    assert chosen.precision in ["float32", *passing]
    assert (chosen.precision == "float32") == (not passing or min(report["probe_ms"], key=report["probe_ms"].get) == "float32")


@needs_ort
def test_int8_calibrates_on_exactly_the_footage_it_is_given(version: registry.LoadedVersion,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime.quantization as quantization

    given = scene_patches(version.config, 2, seed=7, fast_objects=False)
    seen: list[torch.Tensor] = []

    def spy(model_input, model_output, reader, **options):
        while (batch := reader.get_next()) is not None:
            seen.append(torch.from_numpy(batch["x"]))
        raise RuntimeError("stop after calibration")

    monkeypatch.setattr(quantization, "quantize_static", spy)
    refused = engine(version, "int8", int8_calibration=given)
    assert refused.precision == "float32" and "stop after calibration" in refused.precision_report["candidates"]["int8"]["reason"]
    assert torch.equal(torch.cat(seen), calibration_set(given))  # the given patches, then their stretched copy: nothing else
    stretched = stretched_motion(given)
    assert torch.equal(stretched[:, 0], given[:, 0]) and (stretched[:, 1] >= given[:, 1]).all()


def test_unknown_precisions_are_refused_clearly(version: registry.LoadedVersion) -> None:
    from service.settings import Settings

    for name in ("int8", "auto", "bf16", "fp16", "float32"):
        assert Settings(precision=name).precision == name
    with pytest.raises(ValidationError, match="precision"):
        Settings(precision="int4")
    with pytest.raises(ValueError, match="precision must be one of"):
        InferenceEngine(version.refiner, version.detector, precision="int4")
    assert list(PRECISIONS) == PRECISION_CHOICES  # vad eval --precision offers exactly these
