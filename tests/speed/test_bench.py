"""`vad bench --quick`: the JSON it writes has every figure, and the figures are sane (no timings
are asserted: this machine's speed is not the test's business)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from service.cli import main
from tests.support import positive


@pytest.fixture(scope="module")
def quick_bench(trained_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The JSON of one `vad bench --quick --processes 1,2` run, which the tests below all read."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    assert main(["bench", "--quick", "--weights", str(trained_weights), "--json", str(out), "--processes", "1,2"]) == 0
    return json.loads(out.read_text())


def test_quick_bench_writes_every_key(quick_bench: dict[str, Any]) -> None:
    data = quick_bench
    assert positive(data["roofline_gflops"])
    model = data["model"]
    assert positive(model["gflops_per_frame"]) and positive(model["frames_per_s"])
    assert 0 < model["roofline_fraction"] < 10  # a fraction of the same run's matmul rate
    assert positive(data["naive"]["frames_per_s"]) and positive(data["naive"]["speedup"])
    assert positive(data["service"]["frames_per_s"]) and positive(data["service"]["ratio_to_model"])
    assert [s["k"] for s in data["streams"]] == [1, 2]
    for stream in data["streams"]:
        assert set(stream) >= {"k", "fps_per_stream", "p50_ms", "p95_ms", "p99_ms"}
        assert positive(stream["fps_per_stream"])
        assert 0 < stream["p50_ms"] <= stream["p95_ms"] <= stream["p99_ms"]
    assert isinstance(data["max_realtime_streams"], int) and data["max_realtime_streams"] >= 0
    assert positive(data["peak_rss_mb"])
    # the server measured again with 2 serving processes in the same run (their memory summed)
    assert data["service_processes"] == 1 and set(data["service_by_processes"]) == {"1", "2"}
    for count in ("1", "2"):
        part = data["service_by_processes"][count]
        assert positive(part["clips_frames_per_s"]) and positive(part["peak_rss_mb"]) and part["max_realtime_streams"] >= 0
    assert data["service_by_processes"]["2"]["peak_rss_mb"] > data["service_by_processes"]["1"]["peak_rss_mb"]
    assert data["full"]["frames"] > 0 and 0 < data["full"]["scored_patch_share"] <= 1
    finishing = data["finishing"]
    assert finishing["streams"] == 16 and positive(finishing["one_by_one_us_per_stream"]) and positive(finishing["together_us_per_stream"])
    decoding = data["decoding"]
    assert positive(decoding["frames"]["opencv_1_thread_frames_per_s"]) and positive(decoding["frames"]["opencv_pool_frames_per_s"])
    assert "nvJPEG needs a CUDA device" in decoding["frames"]["nvjpeg"]["skipped"]  # the quick run is on the CPU
    assert positive(decoding["clip"]["one_capture_frames_per_s"]) and positive(decoding["clip"]["parallel_frames_per_s"])


def test_a_device_that_is_not_there_is_refused_before_anything_runs(trained_weights: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--quick", "--device", "tpu", "--weights", str(trained_weights), "--json", str(out)])
    assert exit_info.value.code == 2 and "'tpu' is not one of" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "--quick", "--device", "cuda", "--weights", str(trained_weights), "--json", str(out)]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert not out.exists()  # nothing written


def test_quick_bench_measures_each_cpu_precision(quick_bench: dict[str, Any]) -> None:
    """The CPU's features, each precision's roofline, and the model path in each precision this CPU runs,
    against its own roofline and float32's (issue 15). Which precisions exist depends on the CPU."""
    from model.cpu_features import detect_cpu_features
    from service.bench.model_path import cpu_precisions_here

    if torch.cuda.is_available():
        pytest.skip("the bench measures the CUDA device here, not the CPU's precisions")
    data = quick_bench
    assert data["machine"]["cpu_features"] == detect_cpu_features().to_dict()
    precisions = cpu_precisions_here()
    if not precisions:
        pytest.skip("neither bf16 hardware nor ONNX Runtime here: float32 is the only CPU precision")
    assert set(data["rooflines"]) == {"float32", *precisions}
    assert set(data["model_by_precision"]) == set(precisions)
    for name in precisions:
        assert data["rooflines"][name]["gflops"] > 0
        path = data["model_by_precision"][name]
        if not path["ran"]:
            assert path["reason"]
            continue
        assert path["precision"] == name and path["frames_per_s"] > 0
        assert 0 < path["roofline_fraction"] < 10 and 0 < path["roofline_fraction_float32"] < 10
        assert path["max_diff_over_spread"] >= 0 and isinstance(path["passes_check"], bool)
