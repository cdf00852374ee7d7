"""Request bodies in, with the size limit enforced while the body streams (never after buffering it).

Two body shapes are accepted on the upload endpoints:
- ``multipart/form-data`` with the file in the field ``file`` (other fields are ignored);
- the raw file as the body (``Content-Type`` video/*, image/*, application/octet-stream or none).
The client's file name is never used: clips go to ``mkstemp`` names in the server's upload folder.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from service.errors import BadRequest, EmptyUpload, MissingFile, UnsupportedMedia, UploadTooLarge
from service.video import SNIFF_BYTES

FILE_FIELD = b"file"
MULTIPART_OVERHEAD_BYTES = 64 * 1024  # boundaries, part headers and small extra fields
FLUSH_BYTES = 1 << 20  # file writes are batched and run in a thread
RAW_TYPES = (b"", b"application/octet-stream")
RAW_PREFIXES = (b"video/", b"image/")


@dataclass
class SavedUpload:
    path: Path
    size: int
    head: bytes  # the first SNIFF_BYTES bytes, for sniffing the format


class _FilePart:
    """python-multipart callbacks that keep only the bytes of the first part named ``file``."""

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
        self.found = False
        self.finished = False
        self.pending: list[bytes] = []
        self._in_file = False
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
        self._in_file = not self.found and options.get(b"name") == FILE_FIELD
        self.found = self.found or self._in_file

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.pending.append(bytes(data[start:end]))

    def _part_end(self) -> None:
        self._in_file = False

    def _end(self) -> None:
        self.finished = True

    def feed(self, chunk: bytes) -> list[bytes]:
        try:
            self.parser.write(chunk)
        except FormParserError as exc:
            raise BadRequest(f"malformed multipart body ({exc})") from exc
        out, self.pending = self.pending, []
        return out


def _declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise BadRequest("invalid Content-Length header") from exc


async def stream_file_bytes(request: Request, limit: int, on_data: Callable[[bytes], Awaitable[None]]) -> int:
    """Feed the uploaded file's bytes to ``on_data`` as they arrive; returns the file's size.

    Raises UploadTooLarge as soon as the file (or a declared Content-Length) is over ``limit``.
    """
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    multipart = content_type == b"multipart/form-data"
    if not multipart and not (content_type in RAW_TYPES or content_type.startswith(RAW_PREFIXES)):
        raise UnsupportedMedia("send the file as multipart/form-data (field 'file') or as the raw body")
    body_limit = limit + (MULTIPART_OVERHEAD_BYTES if multipart else 0)
    declared = _declared_length(request)
    if declared is not None and declared > body_limit:
        raise UploadTooLarge(f"the upload is over the limit of {limit} bytes")
    part: _FilePart | None = None
    if multipart:
        boundary = options.get(b"boundary")
        if not boundary:
            raise BadRequest("multipart/form-data without a boundary")
        part = _FilePart(boundary)
    body_size = file_size = 0
    async for chunk in request.stream():
        body_size += len(chunk)
        if body_size > body_limit:
            raise UploadTooLarge(f"the upload is over the limit of {limit} bytes")
        pieces = part.feed(chunk) if part is not None else [chunk]
        for piece in pieces:
            if not piece:
                continue
            file_size += len(piece)
            if file_size > limit:
                raise UploadTooLarge(f"the upload is over the limit of {limit} bytes")
            await on_data(piece)
    if part is not None:
        if not part.finished:
            raise BadRequest("the multipart body is truncated")
        if not part.found:
            raise MissingFile("no file in the form field 'file'")
    if file_size == 0:
        raise EmptyUpload("the upload is empty")
    return file_size


async def receive_bytes(request: Request, limit: int) -> bytes:
    """The uploaded file in memory (small uploads: one image)."""
    parts: list[bytes] = []

    async def keep(piece: bytes) -> None:
        parts.append(piece)

    await stream_file_bytes(request, limit, keep)
    return b"".join(parts)


async def receive_file(request: Request, limit: int, directory: Path) -> SavedUpload:
    """The uploaded file written to a fresh temp file in ``directory`` (removed again on any error)."""
    descriptor, name = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=directory)
    path = Path(name)
    handle = os.fdopen(descriptor, "wb")
    buffer = bytearray()
    head = bytearray()

    async def write(piece: bytes) -> None:
        if len(head) < SNIFF_BYTES:
            head.extend(piece[: SNIFF_BYTES - len(head)])
        buffer.extend(piece)
        if len(buffer) >= FLUSH_BYTES:
            data = bytes(buffer)
            buffer.clear()
            await asyncio.to_thread(handle.write, data)

    try:
        size = await stream_file_bytes(request, limit, write)
        if buffer:
            await asyncio.to_thread(handle.write, bytes(buffer))
        await asyncio.to_thread(handle.close)
    except BaseException:
        handle.close()
        path.unlink(missing_ok=True)
        raise
    return SavedUpload(path, size, bytes(head))
