"""Property-based fuzzing (hypothesis): the decoders never raise anything but the service's domain
errors on arbitrary or mutated bytes, and the WebSocket protocol answers any sequence of text and
binary messages with well-formed replies, in order, closing only with the documented codes."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.errors import ServiceError
from service.video import SNIFF_BYTES, VideoLimits, VideoSource, decode_image, sniff_video
from tests.reliability.helpers import avi_bytes, frames, jpeg, mp4_bytes, png, png_declaring

FUZZ = settings(max_examples=80, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MAX_PIXELS, MIN_SIDE = 4096 * 2160, 16
PNG = png(frames(1, seed=4)[0])
JPEG = jpeg(frames(1, seed=4)[0])
with tempfile.TemporaryDirectory(prefix="vad-fuzz-media-") as _media:
    AVI = avi_bytes(Path(_media), count=6)
    MP4 = mp4_bytes(Path(_media), count=6)
SIGNATURES = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\0\0\0\0AVI ", b"\0\0\0\x18ftypisom", b"\x1a\x45\xdf\xa3",
              b"\0\0\x01\xba", b"FLV", b"OggS", b"YUV4MPEG2 ", b"GIF89a", b"\0\0\0\x01"]


def mutated(seed: bytes) -> st.SearchStrategy[bytes]:
    """``seed`` with up to 8 bytes overwritten, optionally truncated or extended."""
    edits = st.lists(st.tuples(st.integers(0, len(seed) - 1), st.integers(0, 255)), max_size=8)
    cut = st.integers(1, len(seed))
    tail = st.binary(max_size=64)

    def apply(args: tuple[list[tuple[int, int]], int, bytes]) -> bytes:
        changes, keep, extra = args
        data = bytearray(seed)
        for position, value in changes:
            data[position] = value
        return bytes(data[:keep]) + extra

    return st.tuples(edits, cut, tail).map(apply)


def with_signature() -> st.SearchStrategy[bytes]:
    return st.tuples(st.sampled_from(SIGNATURES), st.binary(max_size=1024)).map(lambda t: t[0] + t[1])


IMAGE_BYTES = st.one_of(st.binary(max_size=2048), with_signature(), mutated(PNG), mutated(JPEG),
                        st.builds(png_declaring, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.binary(max_size=64)))
VIDEO_BYTES = st.one_of(with_signature(), mutated(AVI), mutated(MP4), st.binary(max_size=1024))


@FUZZ
@given(IMAGE_BYTES)
def test_image_decoding_raises_only_domain_errors(data: bytes) -> None:
    try:
        gray = decode_image(data, MAX_PIXELS, MIN_SIDE)
    except ServiceError:
        return
    assert gray.dtype == np.uint8 and gray.ndim == 2
    assert gray.shape[0] * gray.shape[1] <= MAX_PIXELS and min(gray.shape) >= MIN_SIDE
    if data.startswith(b"\x89PNG\r\n\x1a\n"):  # the size its IHDR declares (bytes 16-24, big-endian)
        assert data[12:16] == b"IHDR" and (gray.shape[1], gray.shape[0]) == struct.unpack(">II", data[16:24])
    else:  # a JPEG: exactly what the reference decoder makes of it, no other size
        assert data.startswith(b"\xff\xd8\xff"), data[:8]
        reference = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
        assert reference is not None and np.array_equal(gray, reference)


@FUZZ
@given(VIDEO_BYTES)
def test_video_decoding_raises_only_domain_errors(data: bytes) -> None:
    limits = VideoLimits(MAX_PIXELS, max_frames=50, min_side=MIN_SIDE)
    try:
        container, suffix = sniff_video(data[:SNIFF_BYTES])
    except ServiceError:
        return
    with tempfile.NamedTemporaryFile(suffix=suffix, delete=False) as handle:
        handle.write(data)
    path = Path(handle.name)
    try:
        source = VideoSource.open(path, container, limits)
    except ServiceError:
        assert not path.exists()  # the upload is gone either way
        return
    assert not path.exists()
    total = 0
    try:
        while (chunk := source.read(4)) is not None:
            assert chunk.dtype == np.uint8 and chunk.ndim == 3
            total += len(chunk)
            assert total <= limits.max_frames
        finished = True
    except ServiceError:
        finished = False
    finally:
        source.close()
    # decode_errors counts the frames the container declares that did not decode: never a frame that
    # did, never more than were declared; and for a container whose count comes from its index
    # (AVI, MP4: the magic bytes say which), read to its end, exactly the shortfall.
    declared = source.declared_frames
    assert isinstance(source.decode_errors, int)
    assert 0 <= source.decode_errors <= max(0, declared - total), (source.decode_errors, declared, total)
    if finished and exact_count_container(data):
        assert source.decode_errors == max(0, declared - total), (source.decode_errors, declared, total)


def exact_count_container(data: bytes) -> bool:
    """AVI (RIFF....AVI) or MP4 (....ftyp): containers whose frame count is read from an index."""
    return (data[:4] == b"RIFF" and data[8:12] in (b"AVI ", b"AVIX")) or data[4:8] == b"ftyp"


def test_decode_errors_of_intact_and_cut_clips(tmp_path: Path) -> None:
    """The counter against known answers: an intact clip has none; a 40-frame AVI cut in half reports
    the frames it was written with and no longer holds."""
    limits = VideoLimits(MAX_PIXELS, max_frames=50, min_side=MIN_SIDE)

    def read_all(data: bytes, suffix: str, container: str) -> VideoSource:
        with tempfile.NamedTemporaryFile(suffix=suffix, delete=False) as handle:
            handle.write(data)
        source = VideoSource.open(Path(handle.name), container, limits)
        while source.read(4) is not None:
            pass
        source.close()
        return source

    for data, suffix, container in ((AVI, ".avi", "avi"), (MP4, ".mp4", "mp4")):
        intact = read_all(data, suffix, container)
        assert (intact.frames_read, intact.declared_frames, intact.decode_errors) == (6, 6, 0), container
    avi = avi_bytes(tmp_path, count=40)
    cut = read_all(avi[: len(avi) // 2], ".avi", "avi")
    assert cut.declared_frames == 40 and 0 < cut.frames_read < 40, (cut.declared_frames, cut.frames_read)
    assert cut.decode_errors == 40 - cut.frames_read


# --- the WebSocket protocol ----------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
CONTROLS = st.fixed_dictionaries({}, optional={
    "maps": st.one_of(st.booleans(), st.integers(0, 1), st.text(max_size=3)),
    "drop_policy": st.sampled_from(["drop_oldest", "reject_newest", "random", ""]),
    "fps": st.one_of(st.floats(-10, 1e6, allow_nan=False), st.integers(-5, 500)),
})
TEXT_MESSAGES = st.one_of(CONTROLS.map(json.dumps), JSON_VALUES.map(json.dumps), st.text(max_size=40))
GOOD_FRAMES = [png(f) for f in frames(3, seed=6)] + [jpeg(frames(1, seed=7)[0])]
BINARY_MESSAGES = st.one_of(
    st.sampled_from(GOOD_FRAMES), st.just(b""), mutated(PNG), mutated(JPEG), st.binary(max_size=256),
    st.builds(png_declaring, st.integers(0, 100_000), st.integers(0, 100_000)),
)
MESSAGES = st.lists(st.one_of(TEXT_MESSAGES, BINARY_MESSAGES), min_size=1, max_size=8)
FRAME_FIELDS = {"seq", "model_version", "index", "timestamp_s", "score", "anomalous", "uncertain"}
FRAME_ERRORS = {"undecodable", "limit_exceeded", "frame_too_small", "empty_upload", "overloaded"}


# What a binary message must start with to be taken as a frame (the PNG signature, a JPEG's SOI marker
# followed by a marker's 0xFF): written out here, not taken from the server's own sniffing.
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")


def expected_outcome(messages: list[str | bytes]) -> tuple[list[tuple[str, int | None]], int | None]:
    """What the protocol promises: one reply per message in order (('control', None), ('frame', seq)
    or ('empty frame', seq)), until a message that closes the connection (its close code): text that
    is not JSON closes 1007, a non-empty binary message without an image signature closes 1003."""
    replies: list[tuple[str, int | None]] = []
    seq = 0
    for message in messages:
        if isinstance(message, str):
            try:
                json.loads(message)
            except ValueError:
                return replies, 1007
            replies.append(("control", None))
        else:
            if message and not message.startswith(IMAGE_MAGIC):
                return replies, 1003
            replies.append(("frame", seq) if message else ("empty frame", seq))
            seq += 1
    return replies, None


@pytest.fixture(scope="module")
def fuzz_client(reliability_weights: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    import shutil

    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    root = tmp_path_factory.mktemp("fuzz")
    weights = shutil.copytree(reliability_weights, root / "weights")
    settings_ = Settings(weights_dir=weights, data_dir=root / "data", device="cpu", max_queue_delay_ms=1.0)
    with TestClient(create_app(settings_), raise_server_exceptions=False) as client:
        yield client


@FUZZ
@given(messages=MESSAGES)
def test_websocket_protocol_any_message_sequence(fuzz_client, messages: list[str | bytes]) -> None:
    expected, close_code = expected_outcome(messages)
    with fuzz_client.websocket_connect("/v1/stream") as ws:
        # Up to the message that closes the connection; the server reads nothing after it.
        for message in messages[: len(expected) + (close_code is not None)]:
            if isinstance(message, str):
                ws.send_text(message)
            else:
                ws.send_bytes(message)
        received = []
        for _ in expected:
            message = ws.receive()
            assert message["type"] == "websocket.send", (message, messages)
            received.append(json.loads(message["text"]))
        if close_code is not None:
            final = ws.receive()
            assert final["type"] == "websocket.close" and final["code"] == close_code, (final, messages)
    for (kind, seq), reply in zip(expected, received, strict=True):
        assert isinstance(reply, dict)
        if kind == "control":
            assert set(reply) in ({"options"}, {"error"}), reply
            if "error" in reply:
                assert reply["error"]["code"] == "invalid_control" and reply["error"]["message"]
            else:
                assert set(reply["options"]) == {"maps", "drop_policy", "fps", "events"}
        elif kind == "empty frame":
            assert set(reply) == {"seq", "error"} and reply["seq"] == seq, reply
            assert reply["error"]["code"] == "empty_upload", reply
        else:
            assert reply["seq"] == seq, (reply, messages)
            if "error" in reply:
                assert set(reply) == {"seq", "error"} and reply["error"]["code"] in FRAME_ERRORS, reply
            else:
                assert FRAME_FIELDS <= set(reply) <= FRAME_FIELDS | {"map"}, reply
                assert reply["index"] == seq and np.isfinite(reply["score"])
    assert fuzz_client.app.state.services.batcher.admitted == 0
