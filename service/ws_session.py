"""One WebSocket stream: binary messages are encoded frames, text messages are JSON options.

Three tasks per connection:
- the receiver numbers each binary message (``seq`` from 0), queues it, and applies the drop policy
  when more than VAD_WS_MAX_PENDING_FRAMES frames wait: ``drop_oldest`` answers the oldest waiting
  frame ``overloaded`` and queues the new one, ``reject_newest`` answers the new one ``overloaded``;
- the worker scores waiting frames one at a time, in order, through one FrameStream (the previous
  frame feeds the motion channel, the smoothing window carries on). Each frame pins the model it
  starts with; after an activation the stream moves to the new model at the next frame, keeping its
  previous frame and restarting its smoothing window (scores of two models are not comparable).
  A frame finding the batcher's queue full is answered ``overloaded`` as well;
- the sender writes exactly one reply per frame (and per control message), in the order received,
  whatever finished first.

Protocol errors close the connection: a text message that is not JSON -> 1007, a binary message that
is not a PNG/JPEG image -> 1003, a message over VAD_WS_MAX_MESSAGE_BYTES -> 1009, no model loaded at
connect -> 1013. Frames received before the offending message still get their replies (within
CLOSE_FLUSH_S) before the close. A frame that fails to decode or is over the limits gets an error
reply and the stream continues; so does a control message that is JSON but not a valid options object.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect

from model.results import stream_reply
from service.deps import Services
from service.events.recorder import SourceEvents
from service.errors import (
    EmptyUpload, InvalidControl, Overloaded, ServiceError, UnsupportedMedia, error_body, log,
)
from service.pipeline import DEFAULT_FPS, SOURCE_STREAM, BatchedStream, decode_frame
from service.responses import dumps
from service.schemas import StreamControl
from service.video import SNIFF_BYTES, sniff_image

CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013
REPLY_QUEUE_FACTOR = 4  # replies (resolved or not) a client may be behind before reading pauses
CLOSE_FLUSH_S = 5.0  # longest a protocol-error close waits for the replies owed before it


@dataclass
class StreamOptions:
    maps: bool
    drop_policy: str
    fps: float = DEFAULT_FPS
    events: str | None = None  # the name the stream's events are recorded under; None: not recorded

    def as_dict(self) -> dict[str, Any]:
        return {"maps": self.maps, "drop_policy": self.drop_policy, "fps": self.fps, "events": self.events}


@dataclass(eq=False)
class _Frame:
    seq: int
    data: bytes
    include_map: bool
    reply: asyncio.Future[dict[str, Any]]


class _Close(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


class StreamSession:
    def __init__(self, websocket: WebSocket, services: Services) -> None:
        self.ws = websocket
        self.services = services
        settings = services.settings
        self.options = StreamOptions(maps=True, drop_policy=settings.ws_drop_policy)
        self.max_pending = settings.ws_max_pending_frames
        self.max_message = settings.ws_max_message_bytes
        self.backlog: deque[_Frame] = deque()
        self.backlog_changed = asyncio.Event()
        self.replies: asyncio.Queue[asyncio.Future[dict[str, Any]] | None] = asyncio.Queue(
            REPLY_QUEUE_FACTOR * self.max_pending
        )
        self.next_seq = 0
        self.scorer: BatchedStream | None = None
        self.events: SourceEvents | None = None  # while the stream records events (the "events" option)

    async def run(self) -> None:
        await self.ws.accept()
        if self.services.store.current is None:
            await self.ws.close(CLOSE_TRY_AGAIN_LATER, "no model is loaded")
            return
        gauge = self.services.metrics.websocket_connections
        gauge.inc()
        receiver = asyncio.create_task(self._receive())
        worker = asyncio.create_task(self._work())
        sender = asyncio.create_task(self._send())
        tasks = (receiver, worker, sender)
        try:
            await asyncio.wait([receiver, sender], return_when=asyncio.FIRST_COMPLETED)
            if receiver.done() and not receiver.cancelled() and isinstance(receiver.exception(), _Close):
                await self._flush(sender)
        finally:
            gauge.dec()
            for task in tasks:
                task.add_done_callback(_retrieve)
                task.cancel()
            # asyncio.wait, not gather: a cancellation of this task (server shutdown) must not be
            # turned into the children's cancellation and back (anyio counts cancellations).
            await asyncio.wait(tasks)
            await self._stop_events()  # the stream ended: an open event closes
        failure = receiver.exception() if receiver.done() and not receiver.cancelled() else None
        if failure is None or isinstance(failure, WebSocketDisconnect):
            return
        if not isinstance(failure, _Close):
            log.error("stream receiver failed", exc_info=failure)
            failure = _Close(CLOSE_INTERNAL_ERROR, "internal server error")
        try:
            await self.ws.close(failure.code, failure.reason)
        except (RuntimeError, WebSocketDisconnect, OSError):
            pass  # the client is already gone

    async def _flush(self, sender: asyncio.Task[None]) -> None:
        """Before a protocol-error close: send the replies owed for the frames received before the
        offending message (at most the backlog is still scored), within CLOSE_FLUSH_S."""
        if sender.done():
            return

        async def drain() -> None:
            await self.replies.put(None)  # the sender stops at this marker
            await asyncio.wait([sender])

        try:
            await asyncio.wait_for(drain(), CLOSE_FLUSH_S)
        except asyncio.TimeoutError:
            pass

    # --- receiver --------------------------------------------------------------------------------

    async def _receive(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            data, text = message.get("bytes"), message.get("text")
            if data is not None:
                if len(data) > self.max_message:
                    raise _Close(CLOSE_TOO_BIG, f"message over {self.max_message} bytes")
                await self._on_frame(data)
            elif text is not None:
                if len(text) > self.max_message or len(text.encode()) > self.max_message:
                    raise _Close(CLOSE_TOO_BIG, f"message over {self.max_message} bytes")
                await self._on_control(text)
            else:
                raise _Close(CLOSE_UNSUPPORTED_DATA, "unsupported message")

    async def _reply_now(self, body: dict[str, Any]) -> None:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        future.set_result(body)
        await self.replies.put(future)

    async def _on_control(self, text: str) -> None:
        try:
            control = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _Close(CLOSE_INVALID_PAYLOAD, "control messages must be JSON") from exc
        try:
            self._apply(control)
        except InvalidControl as exc:
            await self._reply_now(error_body(exc.code, exc.message))
            return
        await self._reply_now({"options": self.options.as_dict()})

    def _apply(self, control: Any) -> None:
        if not isinstance(control, dict):
            raise InvalidControl("a control message must be a JSON object, e.g. {\"maps\": false}")
        try:
            parsed = StreamControl.model_validate(control)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'message'}: {e['msg']}" for e in exc.errors())
            raise InvalidControl(problems) from exc
        if parsed.maps is not None:
            self.options.maps = parsed.maps
        if parsed.drop_policy is not None:
            self.options.drop_policy = parsed.drop_policy
        if parsed.fps is not None:
            self.options.fps = float(parsed.fps)
        if parsed.events is not None:
            self.options.events = parsed.events or None

    async def _on_frame(self, data: bytes) -> None:
        seq = self.next_seq
        self.next_seq += 1
        try:
            sniff_image(data[:SNIFF_BYTES])
        except UnsupportedMedia as exc:
            raise _Close(CLOSE_UNSUPPORTED_DATA, exc.message) from exc
        except EmptyUpload as exc:
            await self._reply_now({"seq": seq, **error_body(exc.code, exc.message)})
            return
        frame = _Frame(seq, data, self.options.maps, asyncio.get_running_loop().create_future())
        await self.replies.put(frame.reply)  # waits while the client is far behind on its replies
        if len(self.backlog) >= self.max_pending:
            if self.options.drop_policy == "reject_newest":
                self._overloaded(frame)
                return
            self._overloaded(self.backlog.popleft())
        self.backlog.append(frame)
        self.backlog_changed.set()

    def _overloaded(self, frame: _Frame) -> None:
        self.services.metrics.rejected.labels(SOURCE_STREAM).inc()
        error = Overloaded(f"frame {frame.seq} dropped: the stream is {self.max_pending} frames behind")
        frame.reply.set_result({"seq": frame.seq, **error_body(error.code, error.message)})

    # --- worker ----------------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            while not self.backlog:
                self.backlog_changed.clear()
                await self.backlog_changed.wait()
            frame = self.backlog.popleft()
            try:
                reply = await self._score(frame)
            except ServiceError as exc:
                reply = {"seq": frame.seq, **error_body(exc.code, exc.message)}
            except Exception:  # a bug must not leave the stream without its reply
                log.exception("scoring stream frame %d failed", frame.seq)
                reply = {"seq": frame.seq, **error_body("internal", "internal server error")}
            if not frame.reply.done():
                frame.reply.set_result(reply)

    def _scorer_for(self) -> BatchedStream:
        model = self.services.store.require()
        old = self.scorer
        if old is None or old.model is not model:
            self.scorer = BatchedStream(model, self.services.batcher, self.services.metrics, SOURCE_STREAM)
            if old is not None:
                self.scorer.carry_motion_from(old)  # motion continues across a swap
        return self.scorer

    async def _score(self, frame: _Frame) -> dict[str, Any]:
        scorer = self._scorer_for()
        settings = self.services.settings
        gray = await decode_frame(frame.data, settings.max_pixels, scorer.model.patch_size)
        with self.services.batcher.admit(SOURCE_STREAM):
            # a frame's index is its seq, dropped frames included
            result = await scorer.score_frame(gray, frame.seq, self.options.fps)
        events = await self._events_for()
        if events is not None:
            await events.observe(gray, result, scorer.model, time.time())
        return stream_reply(frame.seq, scorer.model.version, result, frame.include_map)

    async def _events_for(self) -> SourceEvents | None:
        """The stream's events under its current ``events`` name (a new name closes the old one's)."""
        name = self.options.events
        if self.events is not None and self.events.name != name:
            await self._stop_events()
        if name is not None and self.events is None:
            self.events = self.services.events.source("stream", name)
        return self.events

    async def _stop_events(self) -> None:
        if self.events is not None:
            events, self.events = self.events, None
            await events.finish()

    # --- sender ----------------------------------------------------------------------------------

    async def _send(self) -> None:
        while True:
            future = await self.replies.get()
            if future is None:  # _flush: every owed reply is sent
                return
            reply = await future
            await self.ws.send_text(dumps(reply).decode())
