"""Every model and training setting in one typed place.

A ModelConfig travels inside each published version's manifest, so a version can be rebuilt from its
folder alone (the nanoGPT pattern: one config object, saved with the weights).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

InputMode = Literal["appearance", "appearance+motion", "appearance+flow"]
ScoreMode = Literal["d_r_x", "d_x", "reconstruction", "motion", "fused"]
INPUT_MODES: tuple[str, ...] = ("appearance", "appearance+motion", "appearance+flow")
SCORE_MODES: tuple[str, ...] = ("d_r_x", "d_x", "reconstruction", "motion", "fused")
FlowPreset = Literal["farneback", "farneback-1iter", "farneback-half"]
FLOW_PRESET_NAMES: tuple[str, ...] = get_args(FlowPreset)
# Pseudo-anomaly kinds of phase two (model/phase_two.py says what each is)
NEGATIVE_KINDS: tuple[str, ...] = ("average", "speed", "motion_swap", "paste")
# What versions published before ``flow_preset`` was a setting were trained with (their manifests
# have no such key).
LEGACY_FLOW_PRESET = "farneback"
# The input `vad train`, a training job and ModelConfig() use when none is named.
DEFAULT_INPUT_MODE: InputMode = "appearance+flow"
# The registry shipped with the code (v0001-v0003); model/registry.py reads and writes registries.
BUNDLED_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
# VAD_ENCODING / PatchScorer(encoding=...): which implementation encodes frames for scoring. Both give
# the same channels within the bounds tests/model/test_torch_encoding.py checks. "auto": torch on a
# CUDA device (the frames go there once and the channels stay there), OpenCV on the CPU, where the
# torch port measured several times slower than OpenCV's Farneback (docs/speed.md).
ENCODINGS: tuple[str, ...] = ("auto", "opencv", "torch")
# model.scoring.SkipUnchanged's defaults: 24 grey levels / 2% of a patch's values. 29% of Ped2's
# patches go through the networks, at no measured cost on any score mode (docs/speed.md has the table).
SKIP_LEVEL, SKIP_SHARE = 24, 0.02


class ConfigError(ValueError):
    """A setting is out of range or unknown."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the networks and of the input they see.

    Pixel scale: grayscale intensity in [0, 255] maps linearly to [-1, 1] (R2 ends in tanh). The second
    channel (see model/encoding.py) is |frame_t - frame_t-1| * ``motion_gain`` or the optical-flow speed
    scaled so ``flow_scale_px`` pixels per frame is full scale, clipped to [0, 255], mapped the same way.

    What a camera's resolution and frame rate must not change: frames are resized to ``frame_height``
    rows before anything else (None: as they come, versions published before this setting), and the
    motion channel is scaled by the stream's frame rate over ``reference_fps`` (None: not scaled), so
    motion means the same speed per unit of time at any frame rate. model/footage_scale.py chooses
    both, and ``flow_scale_px``, from the normal footage a version is trained on.
    """

    input_mode: InputMode = DEFAULT_INPUT_MODE
    patch_size: int = 30
    stride: int = 30
    latent_dim: int = 64
    refiner_channels: tuple[int, int, int] = (16, 32, 64)
    detector_channels: tuple[int, int, int] = (16, 32, 64)
    motion_gain: float = 4.0
    flow_scale_px: float = 4.0
    # Farneback settings of the flow channel (model/encoding.py FLOW_PRESETS): part of the input a
    # version is trained and served with. One iteration instead of three halves the encoding at the
    # same Ped2 motion AUC (docs/speed.md).
    flow_preset: FlowPreset = "farneback-1iter"
    frame_height: int | None = None
    reference_fps: float | None = None
    bn_eps: float = 1e-6
    bn_momentum: float = 0.1  # torch's momentum = 1 - decay; the paper's decay 0.9

    def __post_init__(self) -> None:
        if self.input_mode not in INPUT_MODES:
            raise ConfigError(f"input_mode must be one of {INPUT_MODES}, got {self.input_mode!r}")
        if self.flow_preset not in FLOW_PRESET_NAMES:
            raise ConfigError(f"flow_preset must be one of {FLOW_PRESET_NAMES}, got {self.flow_preset!r}")
        if not 8 <= self.patch_size <= 128:
            raise ConfigError(f"patch_size must be within 8..128, got {self.patch_size}")
        if not 1 <= self.stride <= self.patch_size:
            raise ConfigError(f"stride must be within 1..patch_size, got {self.stride}")
        if self.frame_height is not None and self.frame_height < self.patch_size:
            raise ConfigError(f"frame_height must be at least the patch size {self.patch_size}, got {self.frame_height}")
        if self.reference_fps is not None and not 0 < self.reference_fps <= 1000:
            raise ConfigError(f"reference_fps must be within (0, 1000], got {self.reference_fps}")
        if not self.flow_scale_px > 0:
            raise ConfigError(f"flow_scale_px must be positive, got {self.flow_scale_px}")
        if self.latent_dim < 1:
            raise ConfigError(f"latent_dim must be positive, got {self.latent_dim}")
        object.__setattr__(self, "refiner_channels", tuple(self.refiner_channels))
        object.__setattr__(self, "detector_channels", tuple(self.detector_channels))

    @property
    def channels(self) -> int:
        return 1 if self.input_mode == "appearance" else 2

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["refiner_channels"] = list(self.refiner_channels)
        data["detector_channels"] = list(self.detector_channels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown model settings: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_saved(cls, data: dict[str, Any]) -> "ModelConfig":
        """Settings saved earlier (a version's manifest, a queued job): those saved before
        ``flow_preset`` existed get the preset they were trained with, not today's default."""
        return cls.from_dict({"flow_preset": LEGACY_FLOW_PRESET, **data})


@dataclass(frozen=True)
class TrainConfig:
    """How R and D are trained (eq. 5 of the paper) and when training stops. How the trained pair is
calibrated into decisions is CalibrationConfig's."""

    lambda_rec: float = 0.4  # lambda1
    lambda_kl: float = 0.2  # lambda2
    noise_sigma: float = 0.155  # sigma of X~ = X + N(0, sigma^2 I), the authors' code
    learning_rate: float = 2e-4
    batch_size: int = 128
    patches_per_epoch: int = 40_000
    max_epochs: int = 30
    time_budget_s: float = 2400.0
    holdout_fraction: float = 0.15  # tail of every clip, never trained on: stopping and calibration
    holdout_patches: int = 4096
    motion_sampling: float = 0.5  # share of training patches drawn where something moves
    # Pseudo-anomalies for D (a deviation; 0 = the paper): this share of each D batch is moving normal
    # patches whose motion channel is multiplied by a factor drawn from `pseudo_speedup` (the same
    # scene, moving faster), labelled "not target" like R's output. See docs/model.md.
    pseudo_anomaly_share: float = 0.25
    pseudo_speedup: tuple[float, float] = (1.3, 3.0)
    # Stopping rule: R is kept at its best held-out reconstruction (condition 1); training goes on
    # until D separates real from refined held-out patches with at least this ROC AUC (condition 2)
    # and R has not improved for `patience` epochs.
    separation_target: float = 0.9
    patience: int = 3
    # D trained further against the frozen best R with R(X) as "fake" (versions up to v0002); phase
    # two replaces it, since it teaches D exactly the "was refined" cue that makes D(R(X)) fail.
    detector_polish_epochs: int = 0
    # Phase two (model/phase_two.py): R frozen, D retrained so that R's output of normal patches is
    # normal and R's output of pseudo-anomalies is not. R_old is R after epoch ``r_old_epoch``.
    phase_two_steps: int = 800
    phase_two_batch_size: int = 64
    phase_two_learning_rate: float = 1e-4
    phase_two_ema: float = 0.99  # D's weights are averaged over the steps with this decay
    # Which pseudo-anomalies D is retrained against: on Ped2, sped-up motion alone gave D(R(X)) the
    # best ranking; adding the appearance kinds cost 2-6 points of AUC (docs/model.md has the table).
    phase_two_negatives: tuple[str, ...] = ("speed",)
    r_old_epoch: int = 1
    seed: int = 0
    # Choose the processing scale, the flow's full scale and the reference frame rate from the normal
    # footage (model/footage_scale.py); off = frames as they come, flow_scale_px as set.
    fit_input_to_footage: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise ConfigError("batch_size must be at least 2 (batch norm)")
        if not 0 <= self.pseudo_anomaly_share <= 1:
            raise ConfigError(f"pseudo_anomaly_share must be within [0, 1], got {self.pseudo_anomaly_share}")
        object.__setattr__(self, "pseudo_speedup", tuple(self.pseudo_speedup))  # a list when read from JSON
        if not 1 < self.pseudo_speedup[0] <= self.pseudo_speedup[1]:
            raise ConfigError(f"pseudo_speedup must be (low, high) with 1 < low <= high, got {self.pseudo_speedup}")
        unknown = set(self.phase_two_negatives) - set(NEGATIVE_KINDS)
        if unknown:
            raise ConfigError(f"phase_two_negatives: unknown kinds {sorted(unknown)} (known: {list(NEGATIVE_KINDS)})")
        object.__setattr__(self, "phase_two_negatives", tuple(self.phase_two_negatives))
        if self.phase_two_steps < 0 or self.phase_two_batch_size < 2:
            raise ConfigError("phase_two_steps must be >= 0 and phase_two_batch_size >= 2")
        if not 0 <= self.phase_two_ema < 1:
            raise ConfigError(f"phase_two_ema must be within [0, 1), got {self.phase_two_ema}")
        if self.r_old_epoch < 1:
            raise ConfigError(f"r_old_epoch must be at least 1, got {self.r_old_epoch}")
        if not 0 < self.holdout_fraction < 0.5:
            raise ConfigError(f"holdout_fraction must be within (0, 0.5), got {self.holdout_fraction}")


@dataclass(frozen=True)
class CalibrationConfig:
    """How the trained networks' scores become decisions: the served frame score, its causal window
    and tau, all fitted on held-out normal frames (model/calibrate.py). Training and `vad calibrate`
    both use it; a version's manifest keeps it as ``calibration_config``."""

    # The served frame score and its causal window (docs/model.md has every mode's Ped2 figures).
    score_mode: ScoreMode = "fused"
    smoothing_frames: int = 5
    false_alarm_rate: float = 0.01  # tau: this share of held-out normal frames is flagged
    reject_band: tuple[float, float] = (0.005, 0.05)  # false-alarm rates bounding "uncertain"
    # ``fused``: components standardised on held-out normal frames, summed with these weights. Its
    # core is the network's D(R(X)); R's reconstruction error adds what R cannot reproduce (objects
    # of a kind never seen), the motion energy what a 30x30 patch's D misses of speed.
    fusion_weights: dict[str, float] = field(
        default_factory=lambda: {"d_r_x": 1.0, "reconstruction": 1.0, "motion": 1.0}
    )

    def __post_init__(self) -> None:
        if self.score_mode not in SCORE_MODES:
            raise ConfigError(f"score_mode must be one of {SCORE_MODES}, got {self.score_mode!r}")
        if self.smoothing_frames < 1:
            raise ConfigError(f"smoothing_frames must be at least 1, got {self.smoothing_frames}")
        if not 0 < self.false_alarm_rate < 0.5:
            raise ConfigError(f"false_alarm_rate must be within (0, 0.5), got {self.false_alarm_rate}")
        object.__setattr__(self, "reject_band", tuple(self.reject_band))  # a list when read from JSON
        low, high = self.reject_band
        if not 0 < low <= self.false_alarm_rate <= high < 1:
            raise ConfigError("reject_band must be two false-alarm rates around false_alarm_rate")
        components = set(SCORE_MODES) - {"fused"}
        if not self.fusion_weights or set(self.fusion_weights) - components:
            raise ConfigError(f"fusion_weights must name scores of {sorted(components)}, got {sorted(self.fusion_weights)}")

    def check_input(self, model_config: ModelConfig) -> None:
        """The one check that a score fits a version's input: ``motion`` needs a motion channel."""
        if self.score_mode == "motion" and model_config.channels == 1:
            raise ConfigError(f"score mode 'motion' needs a motion channel; input mode {model_config.input_mode!r} has none")


CALIBRATION_FIELDS = frozenset(f.name for f in fields(CalibrationConfig))


def split_train_settings(data: dict[str, Any]) -> tuple[TrainConfig, CalibrationConfig]:
    """Training settings written as one dict (VAD_TRAINING_CONFIG, a queued job, the ``train_config``
    of manifests up to v0003, which also held the calibration settings) -> the two configs.
    Raises ConfigError naming unknown settings."""
    known = {f.name for f in fields(TrainConfig)} | CALIBRATION_FIELDS
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown training settings: {sorted(unknown)}")
    train = {k: v for k, v in data.items() if k not in CALIBRATION_FIELDS}
    calibration = {k: v for k, v in data.items() if k in CALIBRATION_FIELDS}
    return TrainConfig(**train), CalibrationConfig(**calibration)
