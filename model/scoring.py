"""Patches -> anomaly scores -> per-frame results. The one path used by `vad detect`, `vad eval` and
the server.

Every patch gets four raw anomaly components, higher = more anomalous:
- ``d_r_x``: -logit D(R(X)), the paper's test score (logits, so ranks do not saturate at 0 or 1);
- ``d_x``: -logit D(X), the paper's weaker alternative;
- ``reconstruction``: mean squared error ||X - R(X)||^2 over the patch's pixels;
- ``motion``: the mean of the patch's motion channel (speed for appearance+flow), no network at all.
``fused`` is a weighted sum of components, each standardised by the median and spread of its frame
maxima on held-out normal frames (``Calibration.fusion_weights``: D(R(X)), reconstruction and motion
for versions trained with phase two, D(R(X)) and reconstruction for older ones). A frame's score is its most
anomalous patch (the paper's rule), averaged over a causal window of ``smoothing_frames`` frames; a
frame is anomalous when that score exceeds tau.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np
import torch

from model.config import SCORE_MODES, SKIP_LEVEL, SKIP_SHARE, ModelConfig
from model.inference import InferenceEngine
from model.encoding import FLOW_PRESETS, encode_frames, resolve_encoding, to_model_input
from model.torch_encoding import encode_frames_torch, encode_stack, enlarged_on_host
from model.networks import Detector, Refiner
from model.patches import GridShape, to_patches
from model.results import FrameResult

COMPONENTS = ("d_r_x", "d_x", "reconstruction", "motion")
NETWORK_COMPONENTS = 3  # the first three come from R and D; "motion" is read off the input
# What ``fused`` meant before its weights were part of the calibration (manifests without them).
LEGACY_FUSION_WEIGHTS: dict[str, float] = {"d_r_x": 1.0, "reconstruction": 1.0}


@dataclass(frozen=True)
class Calibration:
    """Everything that turns raw components into decisions, fitted on held-out normal footage."""

    score_mode: str
    threshold: float  # tau on the frame score
    reject_band: tuple[float, float]  # frame scores in [low, high] are reported "uncertain"
    smoothing_frames: int
    component_center: dict[str, float]  # median of each component's frame maxima on normal frames
    component_scale: dict[str, float]  # their standard deviation (floored)
    map_width: float  # patch score -> [0, 1] map: sigmoid((s - tau) / map_width)
    false_alarm_rate: float
    normal_frame_quantiles: dict[str, float] = field(default_factory=dict)
    fusion_weights: dict[str, float] = field(default_factory=lambda: dict(LEGACY_FUSION_WEIGHTS))
    # false alarms of a tau drawn from one half of the held-out normal segments on the other half
    holdout_check: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.score_mode not in SCORE_MODES:
            raise ValueError(f"unknown score mode {self.score_mode!r}")
        unknown = set(self.fusion_weights) - set(COMPONENTS)
        if unknown or not self.fusion_weights:
            raise ValueError(f"fusion weights must name components of {COMPONENTS}, got {sorted(self.fusion_weights)}")
        if not (self.reject_band[0] <= self.threshold <= self.reject_band[1]):
            raise ValueError("the reject band must contain the threshold")
        object.__setattr__(self, "reject_band", tuple(self.reject_band))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["reject_band"] = list(self.reject_band)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Calibration":
        return cls(**data)


def patch_scores(raw: torch.Tensor, mode: str, calibration: Calibration | None) -> torch.Tensor:
    """(N, 3) raw components -> (N,) patch anomaly scores of ``mode``."""
    if mode in COMPONENTS:
        return raw[:, COMPONENTS.index(mode)]
    if mode != "fused":
        raise ValueError(f"unknown score mode {mode!r}")
    if calibration is None:
        raise ValueError("the fused score needs a calibration (component statistics)")
    total = torch.zeros(raw.shape[0], dtype=raw.dtype, device=raw.device)
    for name, weight in calibration.fusion_weights.items():
        column = raw[:, COMPONENTS.index(name)]
        total += weight * (column - calibration.component_center[name]) / calibration.component_scale[name]
    return total


@dataclass(frozen=True)
class SkipUnchanged:
    """Reuse a patch's raw components while its input has not changed (a static camera's background).

    A patch is compared with the same patch *as it was when last scored* (not with the previous frame,
    so slow drift accumulates until it counts): it is rescored when more than ``share`` of its values
    (pixels x channels, uint8) differ from then by more than ``level`` grey levels, and otherwise
    keeps the components computed then. ``level=0, share=0`` reuses only bit-identical patches, so its
    scores equal full scoring (up to float rounding: a batch of another size may differ in the last bit). docs/speed.md has the measured Ped2 EER and speed of settings.
    """

    level: int = SKIP_LEVEL  # model/config.py says why these
    share: float = SKIP_SHARE

    def __post_init__(self) -> None:
        if not 0 <= self.level <= 255:
            raise ValueError(f"skip level must be within 0..255 grey levels, got {self.level}")
        if not 0 <= self.share < 1:
            raise ValueError(f"skip share must be within [0, 1), got {self.share}")

    def changed(self, patches: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Indices of the rows of (N, values) uint8 ``patches`` that differ from ``reference`` enough
        to be rescored."""
        return self.changed_mask(patches, reference).nonzero().flatten()

    def changed_mask(self, patches: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """(N,) bool: which rows of ``patches`` to rescore, on their device. On the CPU by OpenCV's
        saturating uint8 kernels (7x faster than int16 tensor arithmetic there); elsewhere in torch,
        the same test, without a synchronisation."""
        allowed = int(self.share * patches.shape[1])
        if patches.device.type == "cpu":
            difference = cv2.absdiff(np.ascontiguousarray(patches.numpy()), np.ascontiguousarray(reference.numpy()))
            over = cv2.threshold(difference, self.level, 1, cv2.THRESH_BINARY)[1]
            return torch.from_numpy(over.sum(1, dtype=np.int32) > allowed)
        over = (patches.to(torch.int16) - reference.to(torch.int16)).abs_() > self.level
        return over.sum(1) > allowed


# On by default (docs/speed.md: speed and Ped2 EER of each score mode at several settings).
# ``PatchScorer(skip=None)`` scores every patch.
DEFAULT_SKIP: SkipUnchanged | None = SkipUnchanged()


def motion_energy(patches: torch.Tensor) -> torch.Tensor:
    """(N, C, P, P) -> (N, 1): mean of the motion channel in [0, 1] (zero without one).

    Not a network output: the input's own motion energy, the prior that the learned scores are
    measured against (and, on Ped2, the strongest single cue: docs/model.md).
    """
    if patches.shape[1] < 2:
        return torch.zeros(patches.shape[0], 1)
    return patches[:, 1].flatten(1).float().mean(1, keepdim=True).add(1.0).mul(0.5).cpu()


class PatchScorer:
    """R and D in eval mode on one device; turns patch batches into raw components."""

    def __init__(
        self,
        refiner: Refiner,
        detector: Detector,
        config: ModelConfig,
        calibration: Calibration | None = None,
        device: str | torch.device = "cpu",
        fused: bool = True,
        skip: SkipUnchanged | None = DEFAULT_SKIP,
        precision: str = "float32",
        cuda_graphs: bool = False,
        backend: str = "auto",
        flow: str | None = None,
        encoding: str = "auto",
    ) -> None:
        self.device = torch.device(device)
        self.refiner = refiner.to(self.device).eval()
        self.detector = detector.to(self.device).eval()
        self.config = config
        self.calibration = calibration
        self.skip = skip  # the FrameStream default: reuse components of unchanged patches (or None)
        # optical-flow preset of FrameStream's encoding: the version's own (config.flow_preset) unless
        # overridden, which changes the model's input (an experiment; docs/speed.md)
        if flow is not None and flow not in FLOW_PRESETS:
            raise ValueError(f"unknown flow preset {flow!r} (one of {sorted(FLOW_PRESETS)})")
        self.flow = flow or config.flow_preset
        # who encodes frames (model/encoding.py ENCODINGS): "torch" encodes on this device, so on CUDA
        # frames go there once and channels and patches stay there until the networks
        self.encoding = resolve_encoding(encoding, self.device)
        # The serving path: an eval-only fused copy (batch norm folded, NHWC; model/inference.py), built
        # from the weights as they are now. ``fused=False`` scores with the modules themselves.
        # ``precision`` applies to it on either device: on CUDA bf16/fp16 autocast, on the CPU bf16, int8
        # or auto, each kept only if it passes a check at load (largest served-score difference over the
        # calibration's score spread); ``cuda_graphs`` on CUDA only; on the CPU, ``backend`` auto runs float32
        # under ONNX Runtime when that is installed (else torch).
        self._engine_options = {"precision": precision, "cuda_graphs": cuda_graphs, "backend": backend,
                                "calibration": calibration}
        self.engine = InferenceEngine(self.refiner, self.detector, self.device, **self._engine_options) if fused else None

    def refresh(self) -> None:
        """Rebuild the fused copy after the modules' weights changed."""
        if self.engine is not None:
            self.engine = InferenceEngine(self.refiner, self.detector, self.device, **self._engine_options)

    @torch.inference_mode()
    def reference_scores(self, x: torch.Tensor) -> torch.Tensor:
        """The definition of the components, on the unfused modules: (N, C, P, P) -> (N, 3)."""
        refined, _, _ = self.refiner(x)
        # one D pass over both inputs (eval-mode batch norm: no cross-talk between them)
        logits = self.detector(torch.cat([refined, x]))
        d_r_x, d_x = -logits[: len(x)], -logits[len(x) :]
        reconstruction = (x - refined).pow(2).flatten(1).mean(1)
        return torch.stack([d_r_x, d_x, reconstruction], 1)

    @torch.inference_mode()
    def raw_scores(self, patches: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """(N, C, P, P) float patches in [-1, 1] -> (N, 4) components (COMPONENTS) on the CPU."""
        if self.engine is not None:
            network = self.engine.raw_scores(patches, batch_size)
        else:
            out = [torch.empty(0, NETWORK_COMPONENTS)]
            for start in range(0, patches.shape[0], batch_size):
                x = patches[start : start + batch_size].to(self.device, non_blocking=True)
                out.append(self.reference_scores(x).float().cpu())
            network = torch.cat(out)
        return torch.cat([network, motion_energy(patches)], 1)

    def frames_in(self, gray: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """(T, H, W) uint8 frames where this scorer's encoding reads them: on the device for torch."""
        if self.encoding == "torch":
            return torch.as_tensor(enlarged_on_host(gray, self.config)).to(self.device)
        return gray.cpu().numpy() if isinstance(gray, torch.Tensor) else gray

    def encode(
        self, gray: np.ndarray | torch.Tensor, previous: np.ndarray | torch.Tensor | None = None, fps: float | None = None,
    ) -> torch.Tensor:
        """(T, H, W) uint8 frames -> (T, C, h, w) uint8 channels (model.encoding.encode_frames), by
        this scorer's encoding: on its device for torch, on the CPU for OpenCV."""
        if self.encoding == "torch":
            return encode_frames_torch(gray, self.config, previous, flow=self.flow, fps=fps, device=self.device)
        if isinstance(previous, torch.Tensor):
            previous = previous.cpu().numpy()
        gray = gray.cpu().numpy() if isinstance(gray, torch.Tensor) else gray
        return torch.from_numpy(encode_frames(gray, self.config, previous, flow=self.flow, fps=fps))

    def frame_patches(self, channels: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, GridShape]:
        """(T, C, H, W) uint8 channels -> model-ready patches and the grid (on the channels' device)."""
        frames = to_model_input(torch.as_tensor(channels))
        return to_patches(frames, self.config.patch_size, self.config.stride)


class FrameStream:
    """Per-stream state: the previous frame (motion channel), the causal smoothing window and, with
    ``skip`` (default: the scorer's ``skip``), each patch as last scored with its components.

    A clip is one stream; a WebSocket connection is one stream. Feeding frames in pieces gives exactly
    the scores of feeding them at once. ``prepare`` returns only the patches that need the networks;
    ``finish`` takes their components and fills in the reused ones (call them in pairs, in order).
    """

    def __init__(self, scorer: PatchScorer, fps: float = 10.0, skip: "SkipUnchanged | None | str" = "scorer") -> None:
        if scorer.calibration is None:
            raise ValueError("scoring frames needs a calibrated model (tau and component statistics)")
        self.scorer = scorer
        self.calibration = scorer.calibration
        self.fps = fps
        self.previous: np.ndarray | torch.Tensor | None = None  # last frame as the encoding holds it
        self.window: deque[float] = deque(maxlen=max(1, self.calibration.smoothing_frames))
        self.next_index = 0
        self.skip: SkipUnchanged | None = scorer.skip if skip == "scorer" else skip  # type: ignore[assignment]
        self._reference: torch.Tensor | None = None  # (patches per frame, values) uint8 as last scored
        self._reference_raw: torch.Tensor | None = None  # (patches per frame, components) from then
        self._plan: tuple[torch.Tensor, torch.Tensor] | None = None  # prepared, not yet finished
        self.patches_seen = 0
        self.patches_scored = 0
        # every patch's raw components of the last finished chunk, reused ones filled in: what the
        # score of any mode is computed from (docs/speed.md measures each mode's EER with it)
        self.last_raw: torch.Tensor | None = None

    def seek(self, index: int, fps: float) -> None:
        """The next frame is frame ``index`` of a stream at ``fps`` (a live stream's frames carry their
        own sequence numbers, dropped frames included, and may change rate)."""
        self.next_index, self.fps = index, fps

    def carry_motion_from(self, other: "FrameStream") -> None:
        """Continue another stream's motion: its last frame becomes this one's predecessor (a live
        stream moving to a new version keeps its motion channel)."""
        self.previous = other.previous

    def prepare(self, gray: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, GridShape, int]:
        """(T, H, W) uint8 frames -> (patches to score, grid, T); advances the motion state. With the
        torch encoding the patches are on the scorer's device."""
        gray = self.scorer.frames_in(gray)
        channels = self.scorer.encode(gray, self.predecessor(gray), fps=self.fps)
        self.previous = gray[-1].clone() if isinstance(gray, torch.Tensor) else gray[-1].copy()
        return self.plan(channels)

    def predecessor(self, gray: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor | None:
        """The frame before ``gray``'s first, or None where there is none of the same size (the first
        chunk, or the resolution changed)."""
        if self.previous is not None and tuple(self.previous.shape) != tuple(gray.shape[1:]):
            self.previous = None
        return self.previous

    def plan(self, channels: torch.Tensor) -> tuple[torch.Tensor, GridShape, int]:
        """A chunk's (T, C, h, w) uint8 channels -> (patches to score, grid, T): the unchanged-patch
        test against the patches as last scored (``prepare``'s second half)."""
        count = channels.shape[0]
        if self.skip is None:
            patches, grid = self.scorer.frame_patches(channels)
            self.patches_seen += patches.shape[0]
            self.patches_scored += patches.shape[0]
            return patches, grid, count
        config = self.scorer.config
        cells, grid = to_patches(channels, config.patch_size, config.stride)
        per_frame = grid.rows * grid.cols
        flat = cells.reshape(count, per_frame, -1)
        reference = self._reference
        if self._plan is not None or reference is None or reference.shape != flat.shape[1:]:
            reference, self._reference_raw = None, None  # first frame, new size, or an unfinished batch
        # which patches of each frame to rescore, frame after frame (each against the reference as
        # the frames before it left it); masks, so a device runs the loop without waiting
        masks = []
        for t in range(count):
            if reference is None:
                changed = torch.ones(per_frame, dtype=torch.bool, device=flat.device)
                reference = flat[t].clone()
            else:
                changed = self.skip.changed_mask(flat[t], reference)
                reference = torch.where(changed[:, None], flat[t], reference)
            masks.append(changed)
        mask = torch.stack(masks)  # (T, patches per frame)
        picked = mask.flatten().nonzero().flatten()
        # source[t, p]: row of [reference components (per_frame rows) | new components] for patch p at
        # t: the new row of the last frame up to t that rescored p, else the reference's row p
        new_rows = per_frame + mask.flatten().cumsum(0).view(count, per_frame) - 1
        frames = torch.arange(count, device=mask.device)[:, None].expand(count, per_frame)
        last = torch.where(mask, frames, -1).cummax(0).values
        source = torch.where(last >= 0, new_rows.gather(0, last.clamp(min=0)),
                             torch.arange(per_frame, device=mask.device))
        self._plan = (source.cpu(), reference)
        self.patches_seen += count * per_frame
        self.patches_scored += len(picked)
        return to_model_input(cells[picked]), grid, count

    def finish(self, raw: torch.Tensor, grid: GridShape, frame_count: int) -> list[FrameResult]:
        """Components of the prepared patches -> one FrameResult per frame (in order)."""
        return finish_streams([(self, raw, grid, frame_count)])[0]

    def _merge(self, raw: torch.Tensor, grid: GridShape) -> torch.Tensor:
        """The scored patches' components with the reused ones filled in: every patch of the chunk, in order."""
        if self._plan is not None:
            source, reference = self._plan
            self._plan = None
            per_frame = grid.rows * grid.cols
            known = self._reference_raw
            if known is None:
                known = raw.new_zeros(per_frame, raw.shape[1])  # never indexed: the first frame is all new
            elif raw.shape[0] == 0:
                raw = known.new_zeros(0, known.shape[1])  # nothing changed (an empty job's width may differ)
            raw = torch.cat([known.to(raw.dtype), raw])[source.flatten()]
            self._reference, self._reference_raw = reference, raw[-per_frame:].clone()
        self.last_raw = raw
        return raw

    def _results(self, peaks: list[float], maps: np.ndarray, frame_count: int) -> list[FrameResult]:
        """Each frame's worst patch score (``peaks``) and map -> its FrameResult, smoothed over the window."""
        cal = self.calibration
        results = []
        for t in range(frame_count):
            self.window.append(peaks[t])
            score = float(sum(self.window) / len(self.window))
            index = self.next_index
            self.next_index += 1
            results.append(
                FrameResult(
                    index=index,
                    timestamp_s=index / self.fps if self.fps > 0 else 0.0,
                    score=score,
                    anomalous=score > cal.threshold,
                    uncertain=cal.reject_band[0] <= score <= cal.reject_band[1],
                    map=maps[t],
                )
            )
        return results

    def score(self, gray: np.ndarray) -> list[FrameResult]:
        patches, grid, count = self.prepare(gray)
        return self.finish(self.scorer.raw_scores(patches), grid, count)

    def score_clip(self, gray: np.ndarray, chunk_frames: int) -> Iterator[FrameResult]:
        """A whole clip in chunks of ``chunk_frames``, each chunk's results as soon as it is scored."""
        for start in range(0, gray.shape[0], chunk_frames):
            yield from self.score(gray[start : start + chunk_frames])


def finish_streams(
    chunks: Sequence[tuple[FrameStream, torch.Tensor, GridShape, int]],
) -> list[list[FrameResult]]:
    """``FrameStream.finish`` of several streams' chunks ``(stream, raw, grid, frame count)``, one list
    of results per chunk, in order: the calibrated scores, maps and worst patches of all chunks of one
    calibration in one step, instead of a few small tensor operations per stream (what a server with
    hundreds of single-frame streams spends its time on). Each gets what its own ``finish`` would give
    (tests/model/test_prepare_streams.py)."""
    merged = [stream._merge(raw, grid) for stream, raw, grid, _ in chunks]
    results: list[list[FrameResult]] = [[] for _ in chunks]
    groups: dict[int, list[int]] = {}
    for i, (stream, _, _, _) in enumerate(chunks):
        groups.setdefault(id(stream.calibration), []).append(i)
    for members in groups.values():
        cal = chunks[members[0]][0].calibration
        raw = merged[members[0]] if len(members) == 1 else torch.cat([merged[i] for i in members])
        scores = patch_scores(raw, cal.score_mode, cal)
        maps = torch.sigmoid((scores - cal.threshold) / cal.map_width).numpy()
        start = 0
        for i in members:
            stream, _, grid, count = chunks[i]
            size = count * grid.rows * grid.cols
            part = scores[start : start + size].view(count, grid.rows * grid.cols)
            peaks = part.max(1).values.tolist()
            results[i] = stream._results(peaks, maps[start : start + size].reshape(count, grid.rows, grid.cols), count)
            start += size
    return results


def prepare_streams(
    chunks: Sequence[tuple[FrameStream, np.ndarray | torch.Tensor]],
) -> list[tuple[torch.Tensor, GridShape, int]]:
    """``FrameStream.prepare`` of several streams' chunks, one result per chunk in order. With the torch
    encoding, chunks of one shape from streams of one scorer are encoded in one pass
    (model/torch_encoding.encode_stack: all their frame pairs in one batch on the device), which is
    what lets one GPU keep up with hundreds of single-frame streams; each stream then plans its
    patches. Each gets what its own ``prepare`` would give (tests/model/test_prepare_streams.py).
    At most one chunk per stream: a stream's prepare and finish come in pairs."""
    if len({id(stream) for stream, _ in chunks}) != len(chunks):
        raise ValueError("prepare_streams takes at most one chunk per stream (prepare and finish come in pairs)")
    results: list[tuple[torch.Tensor, GridShape, int] | None] = [None] * len(chunks)
    groups: dict[tuple, list[int]] = {}
    for i, (stream, gray) in enumerate(chunks):
        if stream.scorer.encoding != "torch":
            results[i] = stream.prepare(gray)
        else:
            groups.setdefault((id(stream.scorer), tuple(gray.shape)), []).append(i)
    for members in groups.values():
        for i, prepared in zip(members, _prepare_together([chunks[i] for i in members])):
            results[i] = prepared
    return results  # type: ignore[return-value]


def _prepare_together(chunks: list[tuple[FrameStream, np.ndarray | torch.Tensor]]) -> list[tuple[torch.Tensor, GridShape, int]]:
    """Chunks of one shape, one per stream, of one scorer with the torch encoding: one encode_stack."""
    scorer = chunks[0][0].scorer
    gray = torch.stack([torch.as_tensor(enlarged_on_host(g, scorer.config)) for _, g in chunks]).to(scorer.device)  # (S, T, H, W)
    previous = []
    for s, (stream, _) in enumerate(chunks):
        before = stream.predecessor(gray[s])
        # none: the first frame is its own predecessor; one kept by an OpenCV-encoding stream is numpy
        previous.append(gray[s, 0] if before is None else torch.as_tensor(before).to(gray.device))
    channels = encode_stack(gray, scorer.config, torch.stack(previous), flow=scorer.flow,
                            fps=[stream.fps for stream, _ in chunks])
    prepared = []
    for s, (stream, _) in enumerate(chunks):
        stream.previous = gray[s, -1].clone()
        prepared.append(stream.plan(channels[s]))
    return prepared


def causal_mean(scores: np.ndarray, window: int) -> np.ndarray:
    """Mean of each score with the ``window - 1`` scores before it (never a future frame)."""
    if window <= 1:
        return scores.astype(np.float64)
    cumulative = np.concatenate([[0.0], np.cumsum(scores, dtype=np.float64)])
    idx = np.arange(len(scores))
    start = np.maximum(0, idx - window + 1)
    return (cumulative[idx + 1] - cumulative[start]) / (idx + 1 - start)


def sigmoid_width(threshold: float, normal_median: float) -> float:
    """Map width so a frame at the normal median draws ~0.01 and one at tau draws 0.5."""
    return max((threshold - normal_median) / math.log(99.0), 1e-6)
