"""Streaming ``multipart/form-data``: the one reader behind every form the server accepts (clip and
frame uploads, training-job submissions).

``MultipartReader`` wraps python-multipart's callback parser: each body chunk fed in comes back as
the events of the parts it holds (``PartStart``, ``PartData``, ``PartEnd``), so the caller writes a
file part while it arrives and refuses a body as soon as it breaks a limit, never buffering it whole.
What a part means (which fields are accepted, where its bytes go) is the caller's business.
"""

from __future__ import annotations

from dataclasses import dataclass

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from service.errors import BadRequest

MULTIPART_OVERHEAD_BYTES = 64 * 1024  # boundaries, part headers and small extra fields


@dataclass(frozen=True)
class PartStart:
    """A part's headers have arrived."""

    name: bytes  # the form field
    filename: str | None  # the client's file name (for messages only); None for a text field


@dataclass(frozen=True)
class PartData:
    """The next bytes of the current part (never empty)."""

    data: bytes


@dataclass(frozen=True)
class PartEnd:
    """The current part is complete."""


PartEvent = PartStart | PartData | PartEnd


class MultipartReader:
    """A multipart body read chunk by chunk; ``feed`` returns the events each chunk completes."""

    def __init__(self, boundary: bytes | None) -> None:
        """``boundary``: the Content-Type's boundary parameter; BadRequest when there is none."""
        if not boundary:
            raise BadRequest("multipart/form-data without a boundary")
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        })
        self._events: list[PartEvent] = []
        self._finished = False
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[bytes, bytes] = {}

    def feed(self, chunk: bytes) -> list[PartEvent]:
        """The events completed by ``chunk``; BadRequest when the body is malformed."""
        try:
            self._parser.write(chunk)
        except FormParserError as exc:
            raise BadRequest(f"malformed multipart body ({exc})") from exc
        events, self._events = self._events, []
        return events

    def close(self) -> None:
        """Call once the body has ended: BadRequest when it stopped before its closing boundary."""
        if not self._finished:
            raise BadRequest("the multipart body is truncated")

    # -- python-multipart's callbacks ------------------------------------------------------------

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
        self._events.append(PartStart(options.get(b"name", b""), shown))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if end > start:
            self._events.append(PartData(bytes(data[start:end])))

    def _part_end(self) -> None:
        self._events.append(PartEnd())

    def _end(self) -> None:
        self._finished = True
