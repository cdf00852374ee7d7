"""Appearance anomalies pasted into normal footage: a measured test of what the scores can see.

Ped2's own anomalies (bikes, carts) all move faster than pedestrians, so a score that only reads
motion does well on them; these synthetic ones test appearance instead. Foreign objects with
procedural textures (checkerboard, stripes, value noise, gradient, grey cells; never pixels of a
data set) and rectangle / ellipse / blob outlines, hard or soft edged, 40-80 px a side, standing
still or drifting at walking speed (1-3 px/frame, sub-pixel, inside the frame), are pasted into
runs of 20-40 frames of footage labelled normal. Pure numpy, deterministic for a seed.

The rule for runs (``inject_appearance``): each clip is split into maximal runs of contiguous normal
frames; abnormal frames are never read into the output. A run is scored as its own stream (fresh
motion state and smoothing window: the motion channel looks back one frame, so joining runs across
a cut would fake motion). A run appears once clean and ``copies`` times with one object each. The
object's frames lie inside the run with at least ``CLEAN_MARGIN`` clean frames before (the
smoothing window starts from clean scores) and after (the score's return is measured), so runs
shorter than ``MIN_RUN`` = 20 + 2 x 5 frames are skipped, clean copy included (clean and injected
frames then come from the same scenes), and the object's run is cut to the room left (never below
20) in runs shorter than 40 + 10. ``copies`` > 1 gives more objects per run (Ped2 has only five
runs long enough, so one copy measures five objects).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

INJECT_KINDS = ("appearance",)  # what `vad eval --inject` can paste in
SIDE_RANGE = (40, 80)  # px, each side of the object's box
SPEED_RANGE = (1.0, 3.0)  # px/frame of a drifting object (a pedestrian's pace on Ped2)
STILL_SHARE = 0.25  # share of objects standing still
LENGTH_RANGE = (20, 40)  # frames carrying one object
CLEAN_MARGIN = 5  # clean frames at least before and after the object, inside its run
MIN_RUN = LENGTH_RANGE[0] + 2 * CLEAN_MARGIN
SHAPES = ("rectangle", "ellipse", "blob")
TEXTURES = ("checkerboard", "stripes", "value_noise", "gradient", "grey_cells")
PERIOD_RANGE = (6.0, 16.0)  # px: checker square, stripe period, noise and cell lattice spacing
MIN_CONTRAST = 80  # grey levels between the texture's darkest and lightest value
SOFT_EDGE_RANGE = (3.0, 8.0)  # px of feathering of a soft edge
BLOB_HARMONICS = (2, 3, 4)  # outline radius 1 + sum a_k cos(k theta + phi_k), a_k <= 0.15


@dataclass(frozen=True)
class Texture:
    """What fills the object: ``kind`` (TEXTURES) between grey levels ``levels`` = (dark, light)."""

    kind: str
    levels: tuple[int, int]
    period: float  # px
    angle: float  # radians: direction of stripes and gradient

    def __post_init__(self) -> None:
        if self.kind not in TEXTURES:
            raise ValueError(f"unknown texture {self.kind!r} (one of {TEXTURES})")


@dataclass(frozen=True)
class ObjectSpec:
    """One pasted object: its look, and where it is in each frame of the stream it is pasted into.

    Its box (``height`` x ``width``) has its top-left corner at ``top_left + (t - first) *
    velocity`` (y, x; px, sub-pixel) in frames ``first`` .. ``first + length - 1``. ``seed`` draws
    the blob's outline and the lattices of value noise and grey cells.
    """

    shape: str
    texture: Texture
    height: int
    width: int
    soft_edge: float  # px of feathering inside the outline; 0 = hard edge (antialiased)
    first: int
    length: int
    top_left: tuple[float, float]
    velocity: tuple[float, float]  # (dy, dx) px/frame
    seed: int

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r} (one of {SHAPES})")

    @property
    def speed(self) -> float:
        return math.hypot(*self.velocity)

    def position(self, t: int) -> tuple[float, float]:
        """Top-left corner (y, x) of the box in stream frame ``t``."""
        step = t - self.first
        return self.top_left[0] + step * self.velocity[0], self.top_left[1] + step * self.velocity[1]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["speed"] = round(self.speed, 3)
        return data


@dataclass
class InjectedCopy:
    """A normal run with one object pasted in: ``injected[t]`` is True where the object is."""

    frames: np.ndarray  # (T, H, W) uint8
    injected: np.ndarray  # (T,) bool
    spec: ObjectSpec


@dataclass
class NormalRun:
    """Frames ``start`` .. ``stop - 1`` of clip ``clip`` (all labelled normal), clean and injected."""

    clip: int
    start: int
    stop: int
    clean: np.ndarray  # (T, H, W) uint8, a copy of the clip's frames
    copies: list[InjectedCopy] = field(default_factory=list)


def normal_runs(labels: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of label 0 as (start, stop) frame indices."""
    normal = np.r_[False, np.asarray(labels) == 0, False]
    edges = np.flatnonzero(np.diff(normal.astype(np.int8)))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def injection_window(run_length: int, rng: np.random.Generator) -> tuple[int, int] | None:
    """(first, length) of the object within a run of ``run_length`` frames, or None if the run is
    too short to leave ``CLEAN_MARGIN`` clean frames on both sides of ``LENGTH_RANGE[0]`` frames."""
    room = run_length - 2 * CLEAN_MARGIN
    if room < LENGTH_RANGE[0]:
        return None
    length = min(int(rng.integers(LENGTH_RANGE[0], LENGTH_RANGE[1] + 1)), room)
    first = int(rng.integers(CLEAN_MARGIN, run_length - CLEAN_MARGIN - length + 1))
    return first, length


def random_object(
    rng: np.random.Generator, frame_shape: tuple[int, int], first: int, length: int
) -> ObjectSpec:
    """An object drawn from the ranges above whose box stays inside ``frame_shape`` (H, W) throughout.

    In frames too small for the drawn path (never at Ped2's 360x240) the velocity is scaled down
    to fit; frames under 40 px a side are refused.
    """
    frame_h, frame_w = frame_shape
    if min(frame_h, frame_w) < SIDE_RANGE[0]:
        raise ValueError(f"frames of {frame_w}x{frame_h} are too small for objects of {SIDE_RANGE[0]} px")
    height = int(rng.integers(SIDE_RANGE[0], min(SIDE_RANGE[1], frame_h) + 1))
    width = int(rng.integers(SIDE_RANGE[0], min(SIDE_RANGE[1], frame_w) + 1))
    dark = int(rng.integers(0, 256 - MIN_CONTRAST))
    texture = Texture(
        kind=TEXTURES[int(rng.integers(len(TEXTURES)))],
        levels=(dark, int(rng.integers(dark + MIN_CONTRAST, 256))),
        period=float(rng.uniform(*PERIOD_RANGE)),
        angle=float(rng.uniform(0, math.pi)),
    )
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    soft_edge = float(rng.uniform(*SOFT_EDGE_RANGE)) if rng.random() < 0.5 else 0.0
    speed = 0.0 if rng.random() < STILL_SHARE else float(rng.uniform(*SPEED_RANGE))
    heading = float(rng.uniform(0, 2 * math.pi))
    velocity = np.array([speed * math.sin(heading), speed * math.cos(heading)])
    room = np.array([frame_h - height, frame_w - width], dtype=np.float64)
    travel = np.abs(velocity) * (length - 1)
    velocity *= min([1.0, *(room[travel > 0] / travel[travel > 0])])
    travel = velocity * (length - 1)
    low = np.maximum(0.0, -travel)
    high = room - np.maximum(0.0, travel)
    top_left = low + rng.random(2) * (high - low)
    return ObjectSpec(
        shape=shape, texture=texture, height=height, width=width, soft_edge=soft_edge, first=first,
        length=length, top_left=(float(top_left[0]), float(top_left[1])),
        velocity=(float(velocity[0]), float(velocity[1])), seed=int(rng.integers(2**31)),
    )


def _outline(spec: ObjectSpec, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Signed distance (px, negative inside) to the outline; y, x are box coordinates in px."""
    half_h, half_w = spec.height / 2, spec.width / 2
    ny, nx = y / half_h - 1, x / half_w - 1  # [-1, 1] across the box
    scale = min(half_h, half_w)
    if spec.shape == "rectangle":
        return np.maximum((np.abs(nx) - 1) * half_w, (np.abs(ny) - 1) * half_h)
    if spec.shape == "ellipse":  # (rho - 1) / |grad rho|: the distance in px near the outline
        rho = np.maximum(np.hypot(nx, ny), 1e-9)
        return (rho - 1) * rho / np.maximum(np.hypot(nx / half_w, ny / half_h), 1e-9)
    # blob: a star-shaped outline, stretched so it touches all four sides of its box
    rng = np.random.default_rng(spec.seed)
    amplitudes = rng.uniform(0, 0.15, len(BLOB_HARMONICS))
    phases = rng.uniform(0, 2 * math.pi, len(BLOB_HARMONICS))

    def radius(theta: np.ndarray) -> np.ndarray:
        return 1 + sum(a * np.cos(k * theta + p) for a, k, p in zip(amplitudes, BLOB_HARMONICS, phases))

    theta = np.linspace(0, 2 * math.pi, 720, endpoint=False)
    ox, oy = radius(theta) * np.cos(theta), radius(theta) * np.sin(theta)
    bx = ox.min() + (nx + 1) / 2 * (ox.max() - ox.min())
    by = oy.min() + (ny + 1) / 2 * (oy.max() - oy.min())
    extent = max(ox.max() - ox.min(), oy.max() - oy.min()) / 2
    return (np.hypot(bx, by) - radius(np.arctan2(by, bx))) / extent * scale


def _lattice(spec: ObjectSpec) -> np.ndarray:
    """Random values in [0, 1] (min 0, max 1) on a grid ``period`` px apart covering the box."""
    rng = np.random.default_rng([spec.seed, 1])
    rows = int(math.ceil(spec.height / spec.texture.period)) + 2
    cols = int(math.ceil(spec.width / spec.texture.period)) + 2
    values = rng.random((rows, cols))
    return (values - values.min()) / max(values.max() - values.min(), 1e-9)


def _texture(spec: ObjectSpec, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Texture values in [0, 1] at box coordinates (px); the texture moves with the object."""
    texture = spec.texture
    p = texture.period
    along = x * math.cos(texture.angle) + y * math.sin(texture.angle)
    if texture.kind == "checkerboard":
        return ((np.floor(x / p) + np.floor(y / p)) % 2).astype(np.float64)
    if texture.kind == "stripes":
        return (np.floor(2 * along / p) % 2).astype(np.float64)
    if texture.kind == "gradient":
        corners = [cx * math.cos(texture.angle) + cy * math.sin(texture.angle)
                   for cx in (0, spec.width) for cy in (0, spec.height)]
        return np.clip((along - min(corners)) / (max(corners) - min(corners)), 0, 1)
    lattice = _lattice(spec)
    gy = np.clip(y / p, 0, lattice.shape[0] - 1.001)
    gx = np.clip(x / p, 0, lattice.shape[1] - 1.001)
    iy, ix = np.floor(gy).astype(int), np.floor(gx).astype(int)
    if texture.kind == "grey_cells":
        return lattice[iy, ix]
    fy, fx = gy - iy, gx - ix  # value noise: smoothstep-weighted bilinear interpolation
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)
    top = lattice[iy, ix] * (1 - fx) + lattice[iy, ix + 1] * fx
    bottom = lattice[iy + 1, ix] * (1 - fx) + lattice[iy + 1, ix + 1] * fx
    return top * (1 - fy) + bottom * fy


def _coverage(start: float, size: int, first: int, stop: int) -> np.ndarray:
    """Share of each pixel first .. stop - 1 (pixel i spans [i, i + 1)) inside [start, start + size]."""
    pixels = np.arange(first, stop)
    return np.clip(np.minimum(pixels + 1, start + size) - np.maximum(pixels, start), 0, 1)


def render(spec: ObjectSpec, frame_shape: tuple[int, int], t: int) -> tuple[np.ndarray, np.ndarray]:
    """(alpha in [0, 1], grey value) full-frame float arrays of the object in stream frame ``t``
    (alpha is zero everywhere outside its frames)."""
    alpha = np.zeros(frame_shape, np.float64)
    values = np.zeros(frame_shape, np.float64)
    if not spec.first <= t < spec.first + spec.length:
        return alpha, values
    top, left = spec.position(t)
    y0, x0 = max(0, int(math.floor(top))), max(0, int(math.floor(left)))
    y1 = min(frame_shape[0], int(math.floor(top)) + spec.height + 2)
    x1 = min(frame_shape[1], int(math.floor(left)) + spec.width + 2)
    # pixel centres in box coordinates
    y = (np.arange(y0, y1) + 0.5 - top)[:, None] * np.ones(x1 - x0)
    x = (np.arange(x0, x1) + 0.5 - left)[None, :] * np.ones((y1 - y0, 1))
    if spec.soft_edge > 0:
        alpha[y0:y1, x0:x1] = np.clip(-_outline(spec, y, x) / spec.soft_edge, 0, 1)
    else:
        # antialiased (a drifting outline moves by sub-pixel steps, not a pixel staircase) and cut
        # to the share of each pixel inside the box, so nothing spills past the box
        in_box = _coverage(top, spec.height, y0, y1)[:, None] * _coverage(left, spec.width, x0, x1)[None, :]
        edge = 1.0 if spec.shape == "rectangle" else np.clip(0.5 - _outline(spec, y, x), 0, 1)
        alpha[y0:y1, x0:x1] = in_box * edge
    dark, light = spec.texture.levels
    values[y0:y1, x0:x1] = dark + (light - dark) * _texture(spec, y, x)
    return alpha, values


def paste(frames: np.ndarray, spec: ObjectSpec) -> tuple[np.ndarray, np.ndarray]:
    """(T, H, W) uint8 -> (a copy with the object composited in, (T,) bool: frames it is in)."""
    out = frames.copy()
    injected = np.zeros(len(frames), bool)
    for t in range(spec.first, min(spec.first + spec.length, len(frames))):
        alpha, values = render(spec, frames.shape[1:], t)
        blended = alpha * values + (1 - alpha) * frames[t]
        out[t] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
        injected[t] = True
    return out, injected


def inject_appearance(
    clips: Sequence[tuple[np.ndarray, np.ndarray]], seed: int = 0, copies: int = 1
) -> list[NormalRun]:
    """Every normal run long enough (module docstring) of each (gray (T, H, W) uint8, labels (T,))
    clip, clean and with ``copies`` objects pasted in; runs in clip order. Same seed, same output."""
    if copies < 1:
        raise ValueError(f"copies must be at least 1, got {copies}")
    rng = np.random.default_rng(seed)
    runs = []
    for index, (gray, labels) in enumerate(clips):
        if len(gray) != len(labels):
            raise ValueError(f"clip {index}: {len(gray)} frames but {len(labels)} labels")
        for start, stop in normal_runs(labels):
            if stop - start < MIN_RUN:
                continue
            run = NormalRun(index, start, stop, gray[start:stop].copy())
            for _ in range(copies):
                window = injection_window(stop - start, rng)
                assert window is not None  # the run is at least MIN_RUN long
                spec = random_object(rng, gray.shape[1:], *window)
                run.copies.append(InjectedCopy(*paste(run.clean, spec), spec))
            runs.append(run)
    return runs
