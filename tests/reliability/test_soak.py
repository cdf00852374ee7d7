"""A short soak (tests/reliability/soak.py's load for VAD_SOAK_SECONDS, default 8): 8 WebSocket streams
and 4 REST clients against a `vad serve` process. Asserted only what holds at any machine speed:
every client got answers and nothing was left unanswered, every answer is a score or a well-formed
`overloaded` refusal (503 + Retry-After, or the stream's error reply, in order), no 5xx other than
503, the server's resident memory stays within a generous bound of its warmed-up size, and once the
clients are gone the server holds no connection, stream or upload file.

Latency and memory figures are printed here and measured by the soak script, never asserted:

    .venv/bin/python -m tests.reliability.soak --seconds 300
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest

from tests.reliability import soak

SOAK_SECONDS = float(os.environ.get("VAD_SOAK_SECONDS", "8"))
# Far above what the load needs (+1 % measured over 45 s); a leak per request would cross it.
RSS_BOUND = 1.5


def server_connections(port: int) -> list[str]:
    """TCP connections the server side of ``port`` still holds (ESTABLISHED, CLOSE_WAIT, ...), from
    /proc/net/tcp{,6}: not the listening socket, not connections already closed (TIME_WAIT, CLOSE)."""
    held = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            # 0A LISTEN, 06 TIME_WAIT, 07 CLOSE: nothing held open
            if int(local.rsplit(":", 1)[1], 16) == port and state not in ("0A", "06", "07"):
                held.append(f"{local} state {state}")
    return held


def open_upload_files(pid: int) -> list[str]:
    """Upload files the server process holds open: in its upload folder, or deleted (an upload is
    unlinked once the decoder has opened it, so a leaked one lives on only through its descriptor)."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if "/vad-uploads-" in target or (target.endswith("(deleted)") and not target.startswith(("/memfd:", "/dev/shm"))):
            found.append(target)
    return found


def websocket_gauge(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics", timeout=60).text
    return float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("vad_websocket_connections ")))


def wait_until(check, timeout: float = 60.0):  # noqa: ANN001, ANN201
    """``check()`` until it returns something falsy, for up to ``timeout`` s; returns its last value."""
    deadline = time.monotonic() + timeout
    while (value := check()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


@pytest.mark.slow
def test_soak_every_request_is_answered_and_nothing_is_held(server_process, tmp_path: Path) -> None:
    server = server_process(**soak.SOAK_SETTINGS)
    result = soak.run(server, SOAK_SECONDS, tmp_path)
    report = soak.figures(result)
    print("\nsoak (figures of this machine, not asserted): " + json.dumps(report))

    assert result.unfinished == [], f"clients never answered: {result.unfinished}"
    assert result.tally.failures == [], result.tally.failures[:5]
    assert result.server_5xx == 0
    # Every client was answered (each sends at least once), and some work was scored: overload is a
    # refusal of some requests, not of all of them.
    assert sorted(result.tally.answered_by_client) == sorted(result.clients), result.tally.answered_by_client
    assert report["scored"] >= 1 and report["answered"] == sum(result.tally.answered_by_client.values())
    assert max(kib for _, kib in result.rss) < RSS_BOUND * result.baseline_rss_kib, report["rss_mib"]

    # The clients are gone: the server lets go of every connection, stream and upload.
    assert wait_until(lambda: server_connections(server.port)) == [], "connections still held by the server"
    assert wait_until(lambda: websocket_gauge(server.url)) == 0
    assert wait_until(lambda: open_upload_files(server.pid)) == []
