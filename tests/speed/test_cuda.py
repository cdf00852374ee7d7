"""The GPU path: the fused networks on CUDA score like the CPU reference, at every precision, with
and without CUDA graphs. Runs only where torch sees a GPU; docs/speed.md has the measured figures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import registry
from model.offline import scorer_for
from tests.conftest import synthetic_frames

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: the GPU path is checked on a GPU machine (docs/speed.md)")

# Largest |difference| to the CPU float32 reference, in units of each component's spread over the
# batch (measured on an H200, docs/speed.md: fp16 0.056, bf16 0.37; float32 with TF32 0.067, which
# is why a float32 engine turns TF32 off).
TOLERANCE_OVER_STD = {"float32": 0.01, "fp16": 0.1, "bf16": 0.5}


@pytest.fixture(scope="module")
def bundled() -> registry.LoadedVersion:
    version = registry.active_version(registry.BUNDLED_WEIGHTS_DIR)
    assert version is not None, "the bundled weights are part of the repository"
    return registry.load_version(registry.BUNDLED_WEIGHTS_DIR, version, "cpu")


@pytest.fixture(scope="module")
def patches(bundled: registry.LoadedVersion) -> torch.Tensor:
    from model.encoding import encode_frames

    reference = scorer_for(bundled, "cpu", fused=False)
    gray = np.concatenate([synthetic_frames(12, seed=1), synthetic_frames(12, seed=2, anomaly_from=4)])
    gray = np.tile(gray, (1, 3, 3))  # 192x288: enough patches for several graph buckets
    cut, _ = reference.frame_patches(encode_frames(gray, bundled.config))
    return cut


@pytest.mark.parametrize("precision", ["float32", "fp16", "bf16"])
@pytest.mark.parametrize("graphs", [False, True])
def test_cuda_scores_match_the_cpu_reference(bundled, patches, precision: str, graphs: bool) -> None:
    reference = scorer_for(bundled, "cpu", fused=False).raw_scores(patches)
    spread = reference.std(0).clamp_min(1e-6)
    scorer = scorer_for(bundled, "cuda", precision=precision, cuda_graphs=graphs)
    # batch sizes that fall in different graph buckets, one padded, and one of a single patch
    for size in (1, 37, 64, 200, patches.shape[0]):
        got = scorer.raw_scores(patches[:size])
        assert got.shape == reference[:size].shape and got.device.type == "cpu"
        worst = ((got - reference[:size]).abs().amax(0) / spread).max().item()
        assert worst <= TOLERANCE_OVER_STD[precision], f"{precision} graphs={graphs} batch {size}: {worst:.4f} std"


def test_graph_replay_reuses_captures_and_ignores_padding(bundled, patches) -> None:
    scorer = scorer_for(bundled, "cuda", cuda_graphs=True)
    first = scorer.raw_scores(patches[:50])  # bucket 64, 14 rows of padding
    again = scorer.raw_scores(patches[:50])
    torch.testing.assert_close(first, again, rtol=1e-5, atol=1e-5)  # cuDNN may pick non-deterministic kernels (4e-6 seen)
    assert set(scorer.engine.graphs.graphs) == {64}
    # the same rows inside a bigger batch (bucket 128) score the same up to kernel choice
    bigger = scorer.raw_scores(patches[:100])[:50]
    spread = first.std(0).clamp_min(1e-6)
    assert ((bigger - first).abs().amax(0) / spread).max().item() <= TOLERANCE_OVER_STD["float32"]
