"""Helpers for the reliability suite: synthetic media (PNG/JPEG, MJPG AVI, mp4v MP4), checks that an
error reply is clean (JSON error shape, no stack trace, no server path), a `vad serve` subprocess whose
resident memory can be read from /proc, and a bare WebSocket client that can vanish mid-frame."""

from __future__ import annotations

import base64
import os
import socket
import struct
import zlib
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from service.bench import server_process
from tests.support import jpeg_bytes, png_bytes, settings_env, write_video
from tests.support import synthetic_frames as frames  # the one footage generator (moving blobs)

REPO = Path(__file__).resolve().parents[2]
# Never in a response body: stack traces and server paths.
LEAK_MARKERS = ("Traceback", "/work", "/tmp", 'File "', "site-packages")


def png(frame: np.ndarray) -> bytes:
    return png_bytes(frame)


def jpeg(frame: np.ndarray) -> bytes:
    return jpeg_bytes(frame, quality=90)


def png_declaring(width: int, height: int, body: bytes = b"") -> bytes:
    """A PNG signature + a valid IHDR declaring ``width`` x ``height``, then ``body``."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + body


def png_bomb(width: int, height: int) -> bytes:
    """A complete, valid grayscale PNG of ``width`` x ``height`` zeros: kilobytes on the wire,
    width x height bytes once decoded."""
    raw = zlib.compress(b"\x00" * (width + 1) * min(height, 64), 9)  # a few rows are enough to be valid
    idat = struct.pack(">I", len(raw)) + b"IDAT" + raw + struct.pack(">I", zlib.crc32(b"IDAT" + raw))
    iend = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return png_declaring(width, height, idat + iend)


def mp4_bytes(tmp: Path, count: int = 40, seed: int = 1) -> bytes:
    return write_video(tmp / f"clip-{seed}-{count}.mp4", frames(count, seed), "mp4v").read_bytes()


def avi_bytes(tmp: Path, count: int = 40, seed: int = 1) -> bytes:
    return write_video(tmp / f"clip-{seed}-{count}.avi", frames(count, seed), "MJPG").read_bytes()


def corrupt_middle(data: bytes, seed: int = 0) -> bytes:
    """The file with its middle sixth (from a third in) overwritten by random bytes."""
    n = len(data)
    start, length = n // 3, n // 6
    noise = np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8).tobytes()
    return data[:start] + noise + data[start + length :]


def assert_clean_error(response: httpx.Response, status: int | tuple[int, ...], code: str | None = None) -> dict:
    """A JSON error reply with the expected status (and code), no stack trace, no server path."""
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    assert_no_leak(response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body


def assert_no_leak(text: str) -> None:
    for marker in LEAK_MARKERS:
        assert marker not in text, f"{marker!r} in a response: {text[:500]}"


class ServerProcess(server_process.ServerProcess):
    """The shared `vad serve` subprocess (service/bench/server_process.py) set up from Settings
    ``values``: only their VAD_* variables (not the tests' own), log level warning, single-threaded
    BLAS, unbuffered output appended to ``log_path``."""

    def __init__(self, values: dict[str, Any], log_path: Path, port: int | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VAD_")}
        env.update(settings_env({"log_level": "warning", **values}))
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        super().__init__(env, log_path=log_path, port=port)


class RawWebSocket:
    """A WebSocket client on a bare socket: the handshake, masked frames, and the freedom to send a
    frame header and half its payload, then vanish."""

    def __init__(self, port: int, path: str = "/v1/stream") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = self.sock.recv(4096)
            assert chunk, "the server closed during the handshake"
            response += chunk
        assert response.startswith(b"HTTP/1.1 101"), response

    @staticmethod
    def frame_header(length: int, opcode: int = 0x2, fin: bool = True) -> bytes:
        first = (0x80 if fin else 0) | opcode
        if length < 126:
            return bytes([first, 0x80 | length])
        if length < 1 << 16:
            return bytes([first, 0x80 | 126]) + struct.pack(">H", length)
        return bytes([first, 0x80 | 127]) + struct.pack(">Q", length)

    def send_frame(self, payload: bytes, opcode: int = 0x2) -> None:
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if len(payload) < 4096 else (
            (np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), len(payload))).tobytes()
        )
        self.sock.sendall(self.frame_header(len(payload), opcode) + mask + masked)

    def send_partial(self, declared: int, payload: bytes) -> None:
        """A binary frame header declaring ``declared`` bytes, then only ``payload``."""
        self.sock.sendall(self.frame_header(declared) + os.urandom(4) + payload)

    def vanish(self) -> None:
        """Drop the connection without a close frame (RST where the kernel can)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def metric_value(metrics: Any, name: str, **labels: str) -> float:
    """One sample of an app's Prometheus registry (service.metrics.Metrics), 0 when absent."""
    value = metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def http_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """(head, body) of one HTTP/1.1 response read from ``sock``, its Content-Length body in full."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a response: {data[:300]!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed inside the body"
        body += chunk
    return head, body
