"""Dynamic batching: patches of concurrent requests and streams share forward passes.

Requests submit *jobs* (the patches of one clip chunk or one frame, scored with the model the request
pinned). One collector task forms batches: it takes the oldest job, waits up to
``max_queue_delay_s`` after that job arrived for more jobs of the **same model** (a batch never mixes
model versions, so a swap mid-flight cannot mix them either), stops early once ``max_batch_patches``
are waiting, and runs ``PatchScorer.raw_scores`` on the concatenation in a dedicated inference thread
(the event loop never runs a forward pass; one thread owns the device). While a batch runs, new jobs
queue up, so under load batches fill without waiting. Jobs are taken in arrival order and never split;
a job larger than ``max_batch_patches`` runs alone (raw_scores then chunks it).

Frames to encode on the device (``score_frames``; the torch encoding, model/torch_encoding.py) are jobs
too: the inference thread encodes the chunks of every stream in a batch in one pass
(model.scoring.prepare_streams), runs the unchanged-patch test, and sends all their patches through
the networks together, then finishes them together (model.scoring.finish_streams), so hundreds of
single-frame streams share one encoding pass, one forward pass and one finishing step instead of each
paying its own. With the OpenCV encoding, requests prepare their
patches in worker threads (the CPU's cores) and submit the patches (``score``).

Admission control: ``max_queue`` bounds the scoring *requests* admitted at once (a clip upload, a
single frame, one WebSocket frame: each holds one admission until its last patch is scored). Each
admitted request has at most one job queued, so the queue never holds more than ``max_queue`` jobs.
A request that finds no free admission is refused with ``Overloaded`` (503 + Retry-After over REST,
an ``overloaded`` reply over WebSocket) instead of waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from typing import Any

import numpy as np
import torch

from model.encoding import processing_size
from model.patches import grid_shape
from model.results import FrameResult
from model.scoring import FrameStream, finish_streams, prepare_streams
from service.background import cancel_and_wait
from service.errors import InferenceFailed, NotReady, Overloaded
from service.metrics import Metrics
from service.model_store import ServingModel


class Admission:
    """One admitted scoring request. ``release`` is idempotent."""

    def __init__(self, batcher: "Batcher") -> None:
        self._batcher: Batcher | None = batcher

    def release(self) -> None:
        if self._batcher is not None:
            self._batcher._release()
            self._batcher = None

    def __enter__(self) -> "Admission":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


@dataclass(eq=False)
class _Job:
    model: ServingModel
    patches: torch.Tensor | None  # None: ``chunk``'s patches are prepared in the batch
    enqueued: float
    future: asyncio.Future[Any] = field(repr=False)
    chunk: tuple[FrameStream, np.ndarray] | None = None
    chunk_patches: int = 0  # most patches ``chunk`` can give: every patch of every frame

    @property
    def size(self) -> int:
        return int(self.patches.shape[0]) if self.patches is not None else self.chunk_patches


class Batcher:
    def __init__(self, max_batch_patches: int, max_queue_delay_s: float, max_queue: int, metrics: Metrics) -> None:
        self.max_batch_patches = max_batch_patches
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue = max_queue
        self.metrics = metrics
        self._pending: deque[_Job] = deque()
        self._wakeup: asyncio.Event | None = None  # created in start(), on the serving loop
        self._admitted = 0
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def admitted(self) -> int:
        return self._admitted

    @property
    def queued_jobs(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vad-inference")
        self._task = asyncio.create_task(self._run(), name="vad-batcher")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(NotReady("the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def admit(self, source: str) -> "Admission":
        """Take one of ``max_queue`` admissions for a request from ``source`` (release it, or use it
        as a context manager); Overloaded (counted per source) when none is free."""
        if self._admitted >= self.max_queue:
            self.metrics.rejected.labels(source).inc()
            raise Overloaded(f"the server is at its limit of {self.max_queue} scoring requests; retry shortly")
        self._admitted += 1
        return Admission(self)

    def _release(self) -> None:
        self._admitted -= 1

    async def score(self, model: ServingModel, patches: torch.Tensor) -> torch.Tensor:
        """(N, C, P, P) patches -> (N, 3) raw components, computed in a shared batch with ``model``."""
        if patches.shape[0] == 0:
            return torch.empty(0, 3)
        return await self._submit(model, patches)

    async def score_frames(
        self, model: ServingModel, stream: FrameStream, gray: np.ndarray,
    ) -> list[FrameResult]:
        """A chunk of ``stream``'s (T, H, W) frames, prepared (encoded on the device, unchanged patches
        left out), scored and finished together with the other chunks of its batch -> one result per
        frame. ``stream`` must have no other chunk in flight."""
        config = model.scorer.config
        grid = grid_shape(*processing_size(*gray.shape[1:], config), config.patch_size, config.stride)
        return await self._submit(model, None, (stream, gray), gray.shape[0] * grid.rows * grid.cols)

    async def _submit(
        self, model: ServingModel, patches: torch.Tensor | None,
        chunk: tuple[FrameStream, np.ndarray] | None = None, chunk_patches: int = 0,
    ) -> Any:
        if self._task is None or self._wakeup is None:
            raise NotReady("the batcher is not running")
        loop = asyncio.get_running_loop()
        job = _Job(model, patches, loop.time(), loop.create_future(), chunk, chunk_patches)
        self._pending.append(job)
        self._wakeup.set()
        return await job.future  # a cancelled caller cancels the future; the collector skips it

    # --- collector -------------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._wakeup is not None
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = await self._gather()
            if batch:
                await self._execute(batch)

    def _head(self) -> _Job | None:
        while self._pending and self._pending[0].future.done():
            self._pending.popleft()  # cancelled by its caller before it was batched
        return self._pending[0] if self._pending else None

    async def _gather(self) -> list[_Job]:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            head = self._head()
            if head is None:
                return []
            waiting = sum(j.size for j in self._pending if j.model is head.model and not j.future.done())
            remaining = head.enqueued + self.max_queue_delay_s - loop.time()
            if waiting >= self.max_batch_patches or remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        model = head.model
        batch: list[_Job] = []
        keep: deque[_Job] = deque()
        total = 0
        full = False
        for job in self._pending:
            if job.future.done():
                continue
            if job.model is model and not full and (not batch or total + job.size <= self.max_batch_patches):
                batch.append(job)
                total += job.size
            else:
                full = full or job.model is model  # keep arrival order: no later job overtakes it
                keep.append(job)
        self._pending = keep
        return batch

    def _forward(self, model: ServingModel, batch: list[_Job]) -> tuple[list[Any], float]:
        """The batch's results in job order: raw components (patch jobs), or frame results (chunks:
        prepared and finished together, model.scoring.prepare_streams / finish_streams). A batch is
        one model's, whose encoding makes every job of it one kind or the other."""
        started = time.perf_counter()
        chunks = [job.chunk for job in batch if job.chunk is not None]
        if chunks:
            prepared = prepare_streams(chunks)
            parts = [patches for patches, _, _ in prepared]
        else:
            parts = [job.patches for job in batch if job.patches is not None]
        if len(parts) != len(batch):
            raise ValueError("a batch mixes patch jobs and frame chunks")
        patches = parts[0] if len(parts) == 1 else torch.cat(parts)
        raw = model.scorer.raw_scores(patches, batch_size=self.max_batch_patches).split([p.shape[0] for p in parts])
        if not chunks:
            return list(raw), time.perf_counter() - started
        finished = finish_streams([(stream, part, grid, count)
                                   for (stream, _), part, (_, grid, count) in zip(chunks, raw, prepared)])
        return finished, time.perf_counter() - started

    async def _execute(self, batch: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for job in batch:
            self.metrics.queue_wait.observe(now - job.enqueued)
        self.metrics.batch_patches.observe(sum(j.size for j in batch))
        self.metrics.batch_jobs.observe(len(batch))
        try:
            results, seconds = await loop.run_in_executor(self._executor, self._forward, batch[0].model, batch)
        except asyncio.CancelledError:
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(NotReady("the server is shutting down"))
            raise
        except Exception as exc:  # not the input's fault: every job of the batch fails alike
            error = InferenceFailed(f"inference failed: {type(exc).__name__}")
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        self.metrics.inference_duration.observe(seconds)
        for job, raw in zip(batch, results):
            if not job.future.done():
                job.future.set_result(raw)
