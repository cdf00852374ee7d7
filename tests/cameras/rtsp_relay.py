"""A real RTSP camera for the tests: FFmpeg encodes a clip in a loop and publishes it (RTSP ANNOUNCE /
RECORD over TCP) to a small relay here, which serves it to players (DESCRIBE / SETUP / PLAY, RTP
interleaved on the RTSP connection), as a camera or an RTSP server such as mediamtx does.

Why a relay: Debian's FFmpeg 5.1 cannot listen as an RTSP *server* for output (``-rtsp_flags listen``
is an input option: it receives a stream, it does not serve one); Debian's rtsp-server-perl serves RTP
over UDP only, while OpenCV's FFmpeg backend asks for TCP; mediamtx is not packaged. The relay only
routes bytes: the stream (MPEG-4 video over RTP) is FFmpeg's, and the player is the server's own
OpenCV/FFmpeg, unmodified.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

FFMPEG = shutil.which("ffmpeg")


def _read_request(conn: socket.socket, buffer: bytearray) -> tuple[str, dict[str, str], bytes] | None:
    """The next RTSP request on ``conn`` (interleaved ``$`` frames before it are skipped), or None."""
    while True:
        while buffer[:1] == b"$":
            if len(buffer) >= 4:
                size = int.from_bytes(buffer[2:4], "big")
                if len(buffer) >= 4 + size:
                    del buffer[: 4 + size]
                    continue
            break
        end = buffer.find(b"\r\n\r\n")
        if buffer[:1] != b"$" and end >= 0:
            head = buffer[:end].decode("latin-1").split("\r\n")
            headers = {}
            for line in head[1:]:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            if len(buffer) >= end + 4 + length:
                body = bytes(buffer[end + 4 : end + 4 + length])
                del buffer[: end + 4 + length]
                return head[0], headers, body
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buffer += chunk


def _reply(conn: socket.socket, cseq: str, extra: str = "", body: bytes = b"") -> None:
    head = f"RTSP/1.0 200 OK\r\nCSeq: {cseq}\r\nSession: 1\r\n{extra}"
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    conn.sendall(head.encode() + b"\r\n" + body)


class RtspRelay:
    """Listens on 127.0.0.1:``port``; a publisher ANNOUNCEs and RECORDs, players PLAY what it sends."""

    def __init__(self, port: int = 0) -> None:
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        self.sdp: bytes | None = None
        self.players: list[socket.socket] = []
        self.connections: list[socket.socket] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = bytearray()
        try:
            while True:
                request = _read_request(conn, buffer)
                if request is None:
                    return
                line, headers, body = request
                method, url = line.split(" ")[:2]
                cseq = headers.get("cseq", "0")
                if method == "OPTIONS":
                    _reply(conn, cseq, "Public: DESCRIBE, ANNOUNCE, SETUP, PLAY, RECORD, TEARDOWN, GET_PARAMETER\r\n")
                elif method == "ANNOUNCE":
                    self.sdp = body
                    _reply(conn, cseq)
                elif method == "DESCRIBE":
                    if self.sdp is None:
                        conn.sendall(f"RTSP/1.0 404 Not Found\r\nCSeq: {cseq}\r\n\r\n".encode())
                        continue
                    _reply(conn, cseq, f"Content-Base: {url}/\r\nContent-Type: application/sdp\r\n", self.sdp)
                elif method == "SETUP":
                    transport = headers.get("transport", "")
                    if "TCP" not in transport.upper():
                        conn.sendall(f"RTSP/1.0 461 Unsupported Transport\r\nCSeq: {cseq}\r\n\r\n".encode())
                        continue
                    _reply(conn, cseq, f"Transport: {transport}\r\n")
                elif method == "PLAY":
                    _reply(conn, cseq, "Range: npt=0.000-\r\n")
                    with self.lock:
                        self.players.append(conn)
                elif method == "RECORD":
                    _reply(conn, cseq)
                    self._relay(conn, buffer)
                    return
                else:  # GET_PARAMETER (keep-alive), TEARDOWN, ...
                    _reply(conn, cseq)
        except OSError:
            return
        finally:
            with self.lock:
                if conn in self.players:
                    self.players.remove(conn)
            conn.close()

    def _relay(self, conn: socket.socket, buffer: bytearray) -> None:
        """Copy the publisher's interleaved packets to every player (whole packets only)."""
        while True:
            while len(buffer) >= 4 and buffer[:1] == b"$":
                size = int.from_bytes(buffer[2:4], "big")
                if len(buffer) < 4 + size:
                    break
                packet = bytes(buffer[: 4 + size])
                del buffer[: 4 + size]
                with self.lock:
                    players = list(self.players)
                for player in players:
                    try:
                        player.sendall(packet)
                    except OSError:
                        with self.lock:
                            if player in self.players:
                                self.players.remove(player)
            if buffer[:1] not in (b"", b"$"):
                return  # a request (TEARDOWN) from the publisher: it is done
            chunk = conn.recv(65536)
            if not chunk:
                return
            buffer += chunk

    def close(self) -> None:
        self.closed = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread; close alone may not
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            connections = list(self.connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


class RtspCamera:
    """A relay on ``port`` (0: a free one) and FFmpeg publishing ``clip`` to it in a loop at its frame
    rate; ``url`` is what a player opens. ``stop`` kills both (the camera drops); ``start`` again on
    the same port brings it back."""

    def __init__(self, clip: Path, port: int = 0) -> None:
        self.clip = clip
        self.port = port
        self.relay: RtspRelay | None = None
        self.ffmpeg: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/cam"

    def start(self) -> "RtspCamera":
        assert FFMPEG is not None
        self.relay = RtspRelay(self.port)
        self.port = self.relay.port
        self.ffmpeg = subprocess.Popen(
            [FFMPEG, "-hide_banner", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", str(self.clip),
             "-an", "-c:v", "mpeg4", "-g", "5", "-bf", "0", "-q:v", "3",
             "-f", "rtsp", "-rtsp_transport", "tcp", f"rtsp://127.0.0.1:{self.port}/cam"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while self.relay.sdp is None:  # FFmpeg has announced its stream
            if self.ffmpeg.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("FFmpeg did not publish to the RTSP relay")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.ffmpeg is not None:
            self.ffmpeg.kill()
            self.ffmpeg.wait(10)
            self.ffmpeg = None
        if self.relay is not None:
            self.relay.close()
            self.relay = None
