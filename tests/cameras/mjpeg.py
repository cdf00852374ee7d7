"""An HTTP MJPEG camera served by the tests: ``multipart/x-mixed-replace`` JPEG frames on 127.0.0.1,
a clip's frames in a loop at its frame rate, as many IP cameras serve ``/video.mjpg``."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from tests.support import jpeg_bytes

BOUNDARY = "frame"


class MjpegCamera:
    def __init__(self, frames: np.ndarray, fps: float) -> None:
        pictures = [jpeg_bytes(frame) for frame in frames]
        interval = 1.0 / fps
        camera = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                self.send_response(200)
                self.send_header("Content-Type", f"multipart/x-mixed-replace;boundary={BOUNDARY}")
                self.end_headers()
                index = 0
                try:
                    while not camera.closed:
                        picture = pictures[index % len(pictures)]
                        self.wfile.write(f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n"
                                         f"Content-Length: {len(picture)}\r\n\r\n".encode() + picture + b"\r\n")
                        self.wfile.flush()
                        index += 1
                        time.sleep(interval)
                except OSError:
                    return

            def log_message(self, *args: object) -> None:
                pass

        self.closed = False
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/video.mjpg"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.closed = True
        self.server.shutdown()
        self.server.server_close()
