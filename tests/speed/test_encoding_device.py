"""`python -m service.bench.encoding_device --quick` on the CPU: it runs end to end and writes every
figure, and its parity figures are within tests/model/test_torch_encoding.py's bounds (no timing is
asserted: the figures are for reading)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.bench.encoding_device import main
from tests.model.test_torch_encoding import FLOW_MAX_LEVELS, FRAME_SCORE, PATCH_SCORE
from tests.support import positive


def test_quick_run_on_the_cpu_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "encoding.json"
    assert main(["--device", "cpu", "--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    flow, scores = data["parity"]["flow"], data["parity"]["scores"]
    assert flow["appearance_equal"] and flow["motion_max_diff"] <= FLOW_MAX_LEVELS
    assert scores["frame_score_max_abs_diff"] <= FRAME_SCORE and scores["patch_score_max_abs_diff"] <= PATCH_SCORE
    assert scores["flag_differs"] == 0 and scores["patches_scored"]["opencv"] == scores["patches_scored"]["torch"]
    encoding = data["encoding"]
    assert positive(encoding["opencv_cpu"]["ms_per_frame"]) and positive(encoding["torch_streams"]["ms_per_frame"])
    assert all(positive(v) for v in encoding["torch_ms_per_frame"].values())
    full = data["full_path"]
    assert full["opencv"]["encoding"] == "opencv" and full["torch"]["encoding"] == "torch"
    assert positive(full["opencv"]["frames_per_s"]) and positive(full["torch"]["frames_per_s"])
    assert full["opencv"]["frames"] == full["torch"]["frames"] > 0


def test_cuda_without_a_gpu_stops_with_the_reason(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: nothing to refuse")
    with pytest.raises(SystemExit, match="CUDA is not available"):
        main(["--device", "cuda", "--quick"])


def test_a_root_that_is_not_ped2_stops_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="is not the Ped2 folder"):
        main(["--device", "cpu", "--quick", "--root", str(tmp_path)])
