"""``vad serve --processes N``: N serving processes behind one port, and the parent that keeps them.

Why: one Python process scores through one inference thread, and on a GPU its frame finishing and
GIL handoffs, not the device, bound it (docs/speed.md). N processes each load the model and run their
own batcher on the same device.

How:
- The parent binds the listening socket once and starts N children (``multiprocessing`` spawn, so
  no torch or CUDA state is inherited). Every child accepts on that socket, so the kernel hands each
  new connection to one of them; a WebSocket stream stays on the process that accepted it.
- Each child is a replica (service/replicas.py) on the shared database: cameras, webhook deliveries
  and ACTIVE are shared as between replicas on several hosts. With ``VAD_REPLICA_ID`` set, child i
  is ``<id>-<i>``.
- Metrics: the parent points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder before starting any
  child, so every child's counters and histograms add up in whichever child answers ``/metrics``
  (gauges as service/metrics.py says per gauge).
- On the CPU the inference threads are split: each child gets ``threads // N`` (at least 1).
- A child that dies after it started serving is replaced; one that exits before it is ready (a
  broken setting, an unloadable device) stops the whole server with its exit status, since the
  next one would fail the same way. SIGTERM or SIGINT stops the children (each drains as one
  ``vad serve`` does) and then the parent.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.synchronize import Event
from typing import Any

from service.settings import Settings

log = logging.getLogger("vad.processes")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
POLL_S = 0.5
PARENT_CHECK_S = 1.0
# Beyond a child's own drain (VAD_SHUTDOWN_GRACE_S) before the parent kills it.
STOP_MARGIN_S = 10.0


class StartupFailed(RuntimeError):
    """A serving process exited before it was ready; ``exit_code`` is its status."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class _Child:
    index: int
    process: Any  # multiprocessing's SpawnProcess
    ready: Event


def _child_main(index: int, count: int, host: str, port: int, overrides: dict[str, Any], sock: socket.socket,
                ready: Event) -> None:
    """One serving process: the app on the shared socket, ``ready`` set once it accepts. A user's
    mistake found only here (a camera allow-list entry, say) is one line and exit status 2, as
    `vad serve` says it."""
    from model.cli import user_errors
    from service.server import build_server

    # its own process group: a terminal's Ctrl-C reaches only the parent, which stops each child once
    # (a second SIGINT would make uvicorn skip the drain)
    os.setpgid(0, 0)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), name="vad-parent-watch", daemon=True).start()
    try:
        settings = Settings(**overrides)
        if settings.replica_id:
            settings = settings.model_copy(update={"replica_id": f"{settings.replica_id}-{index}"})
        server = build_server(settings, host, port, share_of_cores=count, on_started=ready.set)
    except user_errors() as exc:
        print(f"vad serve: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    server.run(sockets=[sock])


def _exit_with_parent(parent: int) -> None:
    """A child whose parent is gone (killed with SIGKILL) stops as on SIGTERM instead of serving on unsupervised."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os.kill(os.getpid(), signal.SIGTERM)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket every child accepts on, made before any child exists, so a port in use is
    the parent's error (OSError), said once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class Supervisor:
    """Starts ``count`` children on ``sock`` and keeps them until ``stop``."""

    def __init__(self, settings: Settings, host: str, port: int, overrides: dict[str, Any], sock: socket.socket) -> None:
        self.settings = settings
        self.count = settings.serve_processes
        self.host, self.port, self.overrides, self.sock = host, port, overrides, sock
        self.context = multiprocessing.get_context("spawn")
        self.children: list[_Child] = []
        self.stopping = threading.Event()

    def _start(self, index: int) -> _Child:
        ready = self.context.Event()
        process = self.context.Process(
            target=_child_main, name=f"vad-serve-{index}",
            args=(index, self.count, self.host, self.port, self.overrides, self.sock, ready),
        )
        process.start()
        log.info("serving process %d started (pid %d)", index, process.pid)
        return _Child(index, process, ready)

    def run(self) -> None:
        """Until ``stop``: replace children that die after they were ready. Raises StartupFailed when
        one exits before it was ready (the others are stopped first)."""
        self.children = [self._start(i) for i in range(self.count)]
        try:
            while not self.stopping.wait(POLL_S):
                for position, child in enumerate(self.children):
                    if child.process.is_alive() or self.stopping.is_set():
                        continue
                    code = child.process.exitcode
                    if not child.ready.is_set():
                        raise StartupFailed(f"serving process {child.index} (pid {child.process.pid}) exited with "
                                            f"status {code} before it was ready; its log says why", code or 1)
                    log.warning("serving process %d (pid %d) died with status %s; starting another",
                                child.index, child.process.pid, code)
                    _forget_metrics_of(child.process.pid)
                    self.children[position] = self._start(child.index)
        finally:
            self._stop_children()

    def stop(self) -> None:
        self.stopping.set()

    def _stop_children(self) -> None:
        for child in self.children:
            if child.process.is_alive():
                os.kill(child.process.pid, signal.SIGTERM)
        for child in self.children:
            child.process.join(self.settings.shutdown_grace_s + STOP_MARGIN_S)
            if child.process.is_alive():
                log.warning("serving process %d (pid %d) did not stop in time: killed", child.index, child.process.pid)
                child.process.kill()
                child.process.join()


def _forget_metrics_of(pid: int) -> None:
    """A dead child's live gauges stop counting (its counters and histograms still add up)."""
    from prometheus_client import multiprocess

    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)


def serve_processes(settings: Settings, host: str, port: int, overrides: dict[str, Any]) -> int:
    """Run ``settings.serve_processes`` children behind ``host:port`` until SIGTERM/SIGINT; the exit status."""
    logging.basicConfig(level=getattr(logging, settings.log_level.upper(), logging.INFO),
                        format="%(levelname)s:     %(name)s: %(message)s")
    try:
        sock = bind(host, port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", host, port, exc)
        return 1
    metrics_dir = tempfile.mkdtemp(prefix="vad-metrics-")
    outer = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = metrics_dir  # read by prometheus_client when each child imports it
    supervisor = Supervisor(settings, host, port, overrides, sock)
    previous = {sig: signal.signal(sig, lambda *_: supervisor.stop()) for sig in (signal.SIGTERM, signal.SIGINT)}
    log.info("serving on %s:%d with %d processes", host, port, settings.serve_processes)
    try:
        supervisor.run()
    except StartupFailed as exc:
        log.error("%s", exc)
        return exc.exit_code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
        if outer is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = outer
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0
