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
from typing import BinaryIO

from python_multipart.multipart import parse_options_header
from starlette.requests import Request

from service.errors import BadRequest, EmptyUpload, MissingFile, UnsupportedMedia, UploadTooLarge
from service.multipart import MULTIPART_OVERHEAD_BYTES, MultipartReader, PartData, PartStart
from service.video import SNIFF_BYTES

FILE_FIELD = b"file"
FLUSH_BYTES = 1 << 20  # file writes are batched and run in a thread
RAW_TYPES = (b"", b"application/octet-stream")
RAW_PREFIXES = (b"video/", b"image/")


@dataclass
class SavedUpload:
    path: Path
    size: int
    head: bytes  # the first SNIFF_BYTES bytes, for sniffing the format


class FileSink:
    """An open file written from the event loop: pieces are batched to FLUSH_BYTES and written in a
    thread; the first SNIFF_BYTES are kept for sniffing the format."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.size = 0
        self.head = bytearray()
        self._buffer = bytearray()

    async def write(self, piece: bytes) -> None:
        if len(self.head) < SNIFF_BYTES:
            self.head.extend(piece[: SNIFF_BYTES - len(self.head)])
        self.size += len(piece)
        self._buffer.extend(piece)
        if len(self._buffer) >= FLUSH_BYTES:
            data = bytes(self._buffer)
            self._buffer.clear()
            await asyncio.to_thread(self.handle.write, data)

    async def close(self) -> None:
        """Write what is left and close the file."""
        if self._buffer:
            await asyncio.to_thread(self.handle.write, bytes(self._buffer))
            self._buffer.clear()
        await asyncio.to_thread(self.handle.close)


class _FirstFilePart:
    """The bytes of the first part named ``file`` in a multipart body; other parts are skipped."""

    def __init__(self, boundary: bytes | None) -> None:
        self.reader = MultipartReader(boundary)
        self.found = False
        self._inside = False

    def feed(self, chunk: bytes) -> list[bytes]:
        pieces = []
        for event in self.reader.feed(chunk):
            if isinstance(event, PartStart):
                self._inside = not self.found and event.name == FILE_FIELD
                self.found = self.found or self._inside
            elif isinstance(event, PartData):
                if self._inside:
                    pieces.append(event.data)
            else:
                self._inside = False
        return pieces


def declared_length(request: Request) -> int | None:
    """The request's Content-Length; None when it has none, BadRequest when it is not a number."""
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
    declared = declared_length(request)
    if declared is not None and declared > body_limit:
        raise UploadTooLarge(f"the upload is over the limit of {limit} bytes")
    part = _FirstFilePart(options.get(b"boundary")) if multipart else None
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
        part.reader.close()
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
    sink = FileSink(os.fdopen(descriptor, "wb"))
    try:
        size = await stream_file_bytes(request, limit, sink.write)
        await sink.close()
    except BaseException:
        sink.handle.close()
        path.unlink(missing_ok=True)
        raise
    return SavedUpload(path, size, bytes(sink.head))
