"""Bytes -> grayscale uint8 frames, with limits checked before the expensive part.

Images (PNG, JPEG): the width and height are read from the file header (PNG IHDR, JPEG SOFn) and
checked against VAD_MAX_PIXELS before OpenCV decodes anything.

Videos: the container is recognised from its first bytes (an allowlist: AVI, MP4/MOV/3GP, Matroska/
WebM, MPEG-TS/PS, FLV, Ogg, ASF/WMV, Y4M, GIF, raw H.264/H.265) so arbitrary bytes never reach
FFmpeg's format probing; any codec OpenCV's FFmpeg decodes inside them is accepted. The frame size
and declared frame count from the container header are checked before frames are decoded, and the
frame count is enforced again while decoding. Every OpenCV call here is blocking: callers run them in
worker threads.
"""

from __future__ import annotations

import math
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from service.errors import EmptyUpload, FrameTooSmall, LimitExceeded, Undecodable, UnsupportedMedia

SNIFF_BYTES = 512
# A declared frame count may be an estimate (duration x fps); only refuse up front when it exceeds the
# limit by more than this share. The exact count is enforced while decoding.
DECLARED_FRAMES_SLACK = 0.05
# Containers whose declared frame count is read from an index (exact): any shortfall is damage.
EXACT_COUNT_CONTAINERS = frozenset({"avi", "mp4", "mov"})
JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# (container, temp-file suffix FFmpeg probes with, test on the first SNIFF_BYTES bytes)
VIDEO_SIGNATURES = (
    ("avi", ".avi", lambda h: h[:4] == b"RIFF" and h[8:12] in (b"AVI ", b"AVIX")),
    ("mp4", ".mp4", lambda h: h[4:8] == b"ftyp"),
    ("mov", ".mov", lambda h: h[4:8] in (b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot")),
    ("matroska", ".mkv", lambda h: h[:4] == b"\x1a\x45\xdf\xa3"),
    ("mpeg-ps", ".mpg", lambda h: h[:4] in (b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3")),
    ("flv", ".flv", lambda h: h[:3] == b"FLV"),
    ("ogg", ".ogv", lambda h: h[:4] == b"OggS"),
    ("asf", ".wmv", lambda h: h[:8] == b"\x30\x26\xb2\x75\x8e\x66\xcf\x11"),
    ("y4m", ".y4m", lambda h: h[:9] == b"YUV4MPEG2"),
    ("gif", ".gif", lambda h: h[:6] in (b"GIF87a", b"GIF89a")),
    ("h264", ".h264", lambda h: h[:4] == b"\x00\x00\x00\x01"),
    ("mpeg-ts", ".ts", lambda h: len(h) > 188 and h[0] == 0x47 and h[188] == 0x47),
)


def sniff_image(head: bytes) -> str:
    if not head:
        raise EmptyUpload("the image is empty")
    if head.startswith(PNG_SIGNATURE):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    raise UnsupportedMedia("not a PNG or JPEG image")


def sniff_video(head: bytes) -> tuple[str, str]:
    """(container, suffix) of a video's first bytes; UnsupportedMedia for anything else."""
    if not head:
        raise EmptyUpload("the upload is empty")
    for name, suffix, matches in VIDEO_SIGNATURES:
        if matches(head):
            return name, suffix
    if head.startswith(PNG_SIGNATURE) or head.startswith(b"\xff\xd8\xff"):
        raise UnsupportedMedia("this is a still image: POST it to /v1/frames")
    raise UnsupportedMedia("not a video container OpenCV decodes (AVI, MP4/MOV, MKV/WebM, MPEG-TS/PS, ...)")


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG or JPEG header, without decoding pixels."""
    kind = sniff_image(data[:SNIFF_BYTES])
    if kind == "png":
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise Undecodable("PNG header is truncated or has no IHDR chunk")
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            raise Undecodable("JPEG header is malformed")
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            position += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            break
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        if length < 2:
            raise Undecodable("JPEG header is malformed")
        if marker in JPEG_SOF_MARKERS:
            if position + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[position + 5 : position + 9])
            return width, height
        position += 2 + length
    raise Undecodable("JPEG header has no frame size (truncated or malformed)")


def check_frame_size(width: int, height: int, max_pixels: int, min_side: int) -> None:
    if width <= 0 or height <= 0:
        raise Undecodable(f"invalid frame size {width}x{height}")
    if width * height > max_pixels:
        raise LimitExceeded(f"frame size {width}x{height} is over the limit of {max_pixels} pixels")
    if width < min_side or height < min_side:
        raise FrameTooSmall(f"frame size {width}x{height} is smaller than the model's {min_side}px patch")


def decode_image(data: bytes, max_pixels: int, min_side: int) -> np.ndarray:
    """PNG/JPEG bytes -> (H, W) uint8 grayscale. Blocking (runs in a thread)."""
    width, height = image_size(data)
    check_frame_size(width, height, max_pixels, min_side)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None or image.size == 0:
        raise Undecodable("the image could not be decoded")
    if image.shape != (height, width):
        raise Undecodable(f"decoded size {image.shape[1]}x{image.shape[0]} differs from the header's")
    return np.ascontiguousarray(image, dtype=np.uint8)


def _count(value: float) -> int:
    """A capture property as a count: NaN, infinite, negative (unknown) and absurd values are 0 or
    saturate, never an exception."""
    if not math.isfinite(value) or value <= 0:
        return 0
    return int(min(value, 2**62))


@dataclass(frozen=True)
class VideoLimits:
    max_pixels: int
    max_frames: int
    min_side: int


class VideoSource:
    """An opened video, read in chunks of frames. Thread-safe: read and close take one lock, so a
    close never releases the capture under a read still running in another thread."""

    def __init__(
        self, capture: cv2.VideoCapture, fps: float, limits: VideoLimits, container: str, declared_frames: int = 0
    ) -> None:
        self._capture = capture
        self.declared_frames = declared_frames  # the container header's frame count (0: none)
        self._lock = threading.Lock()
        self._closed = False
        self.fps = fps
        self.limits = limits
        self.container = container
        self.frames_read = 0
        self.decode_seconds = 0.0
        self.shape: tuple[int, int] | None = None

    @classmethod
    def open(cls, path: Path, container: str, limits: VideoLimits) -> "VideoSource":
        """Open ``path`` and check its header; the file is unlinked once open (the capture keeps its
        descriptor), so no upload outlives its request. Blocking."""
        try:
            capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
        finally:
            path.unlink(missing_ok=True)
        try:
            if not capture.isOpened():
                raise Undecodable(f"the {container} file could not be opened (corrupt or unsupported codec)")
            width = _count(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
            height = _count(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
            if width > 0 and height > 0:
                check_frame_size(width, height, limits.max_pixels, limits.min_side)
            declared = _count(capture.get(cv2.CAP_PROP_FRAME_COUNT))
            if declared > limits.max_frames * (1 + DECLARED_FRAMES_SLACK) + 1:
                raise LimitExceeded(f"the video declares {declared} frames, over the limit of {limits.max_frames}")
            fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
        except BaseException:
            capture.release()
            raise
        # The same fallback as model.data.read_footage, so `vad detect` and the server agree.
        return cls(capture, fps if 0 < fps < 1000 else 10.0, limits, container, declared)

    def read(self, count: int) -> np.ndarray | None:
        """Up to ``count`` more frames as (t, H, W) uint8, or None at the end. Blocking."""
        frames: list[np.ndarray] = []
        with self._lock:
            if self._closed:
                return None
            started = time.perf_counter()
            try:
                self._read_into(frames, count)
            finally:
                self.decode_seconds += time.perf_counter() - started
                self.frames_read += len(frames)
        if not frames:
            if self.frames_read == 0:
                raise Undecodable(f"the {self.container} file has no decodable frames")
            return None
        return np.ascontiguousarray(np.stack(frames), dtype=np.uint8)

    def _read_into(self, frames: list[np.ndarray], count: int) -> None:
        while len(frames) < count:
            ok, frame = self._capture.read()
            if not ok or frame is None:
                break
            gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) if frame.ndim == 3 else frame
            if self.shape is None:
                check_frame_size(gray.shape[1], gray.shape[0], self.limits.max_pixels, self.limits.min_side)
                self.shape = gray.shape
            elif gray.shape != self.shape:
                raise Undecodable(f"frame {self.frames_read + len(frames)} changes size mid-clip")
            if self.frames_read + len(frames) >= self.limits.max_frames:
                raise LimitExceeded(f"the video has more than {self.limits.max_frames} frames")
            frames.append(gray)

    @property
    def decode_errors(self) -> int:
        """Frames the container declares that did not decode (damaged or truncated data; FFmpeg skips
        or stops at what it cannot decode). Counts that are estimates (duration x fps, containers
        other than AVI/MP4/MOV) only count when short by more than DECLARED_FRAMES_SLACK."""
        missing = self.declared_frames - self.frames_read
        if missing <= 0 or self.frames_read >= self.limits.max_frames:
            return 0
        if self.container not in EXACT_COUNT_CONTAINERS and missing <= self.declared_frames * DECLARED_FRAMES_SLACK + 1:
            return 0
        return missing

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._capture.release()
