"""Receiving a training-job submission: the multipart body streamed, files (field ``files``, or
``file``) written to generated names in the job's upload folder, ``paths`` and ``options`` kept as text.
Every limit is enforced while the body streams."""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from service.errors import BadRequest, EmptyUpload, InvalidJobRequest, ServiceError, UnsupportedMedia, UploadTooLarge
from service.settings import Settings
from service.uploads import FLUSH_BYTES, MULTIPART_OVERHEAD_BYTES, _declared_length
from service.video import SNIFF_BYTES, sniff_video

FILE_FIELDS = (b"files", b"file")
TEXT_FIELDS = (b"paths", b"options")
MAX_TEXT_FIELD_BYTES = 64 * 1024
MAX_NAME_CHARS = 200
# Suffixes an upload may keep when its first bytes match no known container (FFmpeg probes content).
SAFE_VIDEO_SUFFIXES = frozenset({
    ".avi", ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".flv", ".ogv", ".wmv",
    ".asf", ".y4m", ".gif", ".h264", ".h265", ".3gp",
})


def display_name(filename: str | None, index: int) -> str:
    """The client's file name for messages only: its last component, printable, bounded."""
    base = re.split(r"[\\/]", filename or "")[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()
    return base[:MAX_NAME_CHARS] or f"upload {index + 1}"


@dataclass
class ReceivedFile:
    path: Path
    name: str  # the client's name: shown in messages, never used as a path
    size: int
    container: str | None


@dataclass
class TrainingForm:
    files: list[ReceivedFile] = field(default_factory=list)
    text: dict[str, str] = field(default_factory=dict)


class _FormParser:
    """python-multipart callbacks turned into a list of events, handled (with file writes off the
    loop) after each body chunk."""

    def __init__(self, boundary: bytes) -> None:
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        })
        self.events: list[tuple[str, Any]] = []
        self.finished = False
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[bytes, bytes] = {}

    def _part_begin(self) -> None:
        self._headers = {}

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._field).lower()] = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        filename = options.get(b"filename")
        shown = None if filename is None else filename.decode("utf-8", "replace")
        self.events.append(("begin", (options.get(b"name", b""), shown)))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self.events.append(("data", bytes(data[start:end])))

    def _part_end(self) -> None:
        self.events.append(("end", None))

    def _end(self) -> None:
        self.finished = True

    def feed(self, chunk: bytes) -> list[tuple[str, Any]]:
        try:
            self.parser.write(chunk)
        except FormParserError as exc:
            raise BadRequest(f"malformed multipart body ({exc})") from exc
        events, self.events = self.events, []
        return events


class _FileWriter:
    def __init__(self, directory: Path, client_name: str | None, index: int) -> None:
        self.directory = directory
        self.stem = uuid.uuid4().hex
        self.name = display_name(client_name, index)
        self.client_suffix = Path(self.name).suffix.lower()
        self.partial = directory / f"{self.stem}.part"
        self.handle = open(self.partial, "xb")  # noqa: SIM115 - closed in finish()/abort()
        self.size = 0
        self.head = bytearray()
        self.buffer = bytearray()

    async def write(self, piece: bytes) -> None:
        if len(self.head) < SNIFF_BYTES:
            self.head.extend(piece[: SNIFF_BYTES - len(self.head)])
        self.size += len(piece)
        self.buffer.extend(piece)
        if len(self.buffer) >= FLUSH_BYTES:
            data = bytes(self.buffer)
            self.buffer.clear()
            await asyncio.to_thread(self.handle.write, data)

    async def finish(self) -> ReceivedFile:
        if self.buffer:
            await asyncio.to_thread(self.handle.write, bytes(self.buffer))
            self.buffer.clear()
        await asyncio.to_thread(self.handle.close)
        if self.size == 0:
            raise EmptyUpload(f"{self.name}: the file is empty")
        try:
            container, suffix = sniff_video(bytes(self.head))
        except ServiceError:
            # Not a container we recognise: kept under a neutral name; decoding it is the job's
            # business, and a file OpenCV cannot read fails the job with a message naming it.
            container, suffix = None, self.client_suffix if self.client_suffix in SAFE_VIDEO_SUFFIXES else ".bin"
        final = self.directory / f"{self.stem}{suffix}"
        os.replace(self.partial, final)
        return ReceivedFile(final, self.name, self.size, container)

    def abort(self) -> None:
        self.handle.close()
        self.partial.unlink(missing_ok=True)


async def receive_training_form(request: Request, directory: Path, settings: Settings) -> TrainingForm:
    """Stream the multipart body: files (field ``files``, or ``file``) to generated names in
    ``directory``, each within VAD_MAX_UPLOAD_BYTES while it streams; ``paths`` and ``options`` as text.
    """
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        raise UnsupportedMedia("send multipart/form-data with 'files' and/or 'paths', and 'options'")
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("multipart/form-data without a boundary")
    file_limit = settings.max_upload_bytes
    body_limit = settings.max_training_files * (file_limit + MULTIPART_OVERHEAD_BYTES) + 4 * MAX_TEXT_FIELD_BYTES
    declared = _declared_length(request)
    if declared is not None and declared > body_limit:
        raise UploadTooLarge(f"the request is over the limit of {body_limit} bytes "
                             f"({settings.max_training_files} files of {file_limit} bytes)")
    parser = _FormParser(boundary)
    form = TrainingForm()
    writer: _FileWriter | None = None
    text_name: str | None = None
    text_value = bytearray()
    body_size = 0
    try:
        async for chunk in request.stream():
            body_size += len(chunk)
            if body_size > body_limit:
                raise UploadTooLarge(f"the request is over the limit of {body_limit} bytes")
            for kind, value in parser.feed(chunk):
                if kind == "begin":
                    name, filename = value
                    if name in FILE_FIELDS:
                        if len(form.files) >= settings.max_training_files:
                            raise InvalidJobRequest(
                                f"more than {settings.max_training_files} files (VAD_MAX_TRAINING_FILES)"
                            )
                        writer = await asyncio.to_thread(_FileWriter, directory, filename, len(form.files))
                    elif name in TEXT_FIELDS:
                        text_name = name.decode()
                        if text_name in form.text:
                            raise InvalidJobRequest(f"the form field {text_name!r} is given twice")
                        text_value.clear()
                    else:
                        shown = name.decode("utf-8", "replace")[:50]
                        raise InvalidJobRequest(f"unknown form field {shown!r} (expected 'files', 'paths', 'options')")
                elif kind == "data":
                    if writer is not None:
                        if writer.size + len(value) > file_limit:
                            raise UploadTooLarge(
                                f"{writer.name}: over the limit of {file_limit} bytes (VAD_MAX_UPLOAD_BYTES)"
                            )
                        await writer.write(value)
                    elif text_name is not None:
                        text_value.extend(value)
                        if len(text_value) > MAX_TEXT_FIELD_BYTES:
                            raise InvalidJobRequest(f"the form field {text_name!r} is over {MAX_TEXT_FIELD_BYTES} bytes")
                elif kind == "end":
                    if writer is not None:
                        current, writer = writer, None
                        form.files.append(await current.finish())
                    elif text_name is not None:
                        try:
                            form.text[text_name] = text_value.decode("utf-8")
                        except UnicodeDecodeError as exc:
                            raise InvalidJobRequest(f"the form field {text_name!r} is not UTF-8") from exc
                        text_name = None
        if not parser.finished:
            raise BadRequest("the multipart body is truncated")
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return form
