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

from python_multipart.multipart import parse_options_header
from starlette.requests import Request

from service.errors import EmptyUpload, InvalidJobRequest, ServiceError, UnsupportedMedia, UploadTooLarge
from service.multipart import MULTIPART_OVERHEAD_BYTES, MultipartReader, PartData, PartStart
from service.settings import Settings
from service.uploads import FileSink, declared_length
from service.video import sniff_video

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
    """An uploaded file, stored under a generated name in the job's upload folder."""

    path: Path
    name: str  # the client's name: shown in messages, never used as a path
    size: int
    container: str | None


@dataclass
class TrainingForm:
    """What a submission sent: its files (stored) and its text fields by name."""

    files: list[ReceivedFile] = field(default_factory=list)
    text: dict[str, str] = field(default_factory=dict)


class _FileWriter:
    """One uploaded file: written to ``<uuid>.part`` while it streams, then renamed with the suffix
    its sniffed container (or a safe client suffix) gives it."""

    def __init__(self, directory: Path, client_name: str | None, index: int) -> None:
        self.directory = directory
        self.stem = uuid.uuid4().hex
        self.name = display_name(client_name, index)
        self.client_suffix = Path(self.name).suffix.lower()
        self.partial = directory / f"{self.stem}.part"
        self.sink = FileSink(open(self.partial, "xb"))  # noqa: SIM115 - closed in finish()/abort()

    async def finish(self) -> ReceivedFile:
        await self.sink.close()
        if self.sink.size == 0:
            raise EmptyUpload(f"{self.name}: the file is empty")
        try:
            container, suffix = sniff_video(bytes(self.sink.head))
        except ServiceError:
            # Not a container we recognise: kept under a neutral name; decoding it is the job's
            # business, and a file OpenCV cannot read fails the job with a message naming it.
            container, suffix = None, self.client_suffix if self.client_suffix in SAFE_VIDEO_SUFFIXES else ".bin"
        final = self.directory / f"{self.stem}{suffix}"
        os.replace(self.partial, final)
        return ReceivedFile(final, self.name, self.sink.size, container)

    def abort(self) -> None:
        self.sink.handle.close()
        self.partial.unlink(missing_ok=True)


async def receive_training_form(request: Request, directory: Path, settings: Settings) -> TrainingForm:
    """Stream the multipart body: files (field ``files``, or ``file``) to generated names in
    ``directory``, each within VAD_MAX_UPLOAD_BYTES while it streams; ``paths`` and ``options`` as text.
    """
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        raise UnsupportedMedia("send multipart/form-data with 'files' and/or 'paths', and 'options'")
    reader = MultipartReader(params.get(b"boundary"))
    file_limit = settings.max_upload_bytes
    body_limit = settings.max_training_files * (file_limit + MULTIPART_OVERHEAD_BYTES) + 4 * MAX_TEXT_FIELD_BYTES
    declared = declared_length(request)
    if declared is not None and declared > body_limit:
        raise UploadTooLarge(f"the request is over the limit of {body_limit} bytes "
                             f"({settings.max_training_files} files of {file_limit} bytes)")
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
            for event in reader.feed(chunk):
                if isinstance(event, PartStart):
                    if event.name in FILE_FIELDS:
                        if len(form.files) >= settings.max_training_files:
                            raise InvalidJobRequest(
                                f"more than {settings.max_training_files} files (VAD_MAX_TRAINING_FILES)"
                            )
                        writer = await asyncio.to_thread(_FileWriter, directory, event.filename, len(form.files))
                    elif event.name in TEXT_FIELDS:
                        text_name = event.name.decode()
                        if text_name in form.text:
                            raise InvalidJobRequest(f"the form field {text_name!r} is given twice")
                        text_value.clear()
                    else:
                        shown = event.name.decode("utf-8", "replace")[:50]
                        raise InvalidJobRequest(f"unknown form field {shown!r} (expected 'files', 'paths', 'options')")
                elif isinstance(event, PartData):
                    if writer is not None:
                        if writer.sink.size + len(event.data) > file_limit:
                            raise UploadTooLarge(
                                f"{writer.name}: over the limit of {file_limit} bytes (VAD_MAX_UPLOAD_BYTES)"
                            )
                        await writer.sink.write(event.data)
                    elif text_name is not None:
                        text_value.extend(event.data)
                        if len(text_value) > MAX_TEXT_FIELD_BYTES:
                            raise InvalidJobRequest(f"the form field {text_name!r} is over {MAX_TEXT_FIELD_BYTES} bytes")
                else:  # PartEnd
                    if writer is not None:
                        current, writer = writer, None
                        form.files.append(await current.finish())
                    elif text_name is not None:
                        try:
                            form.text[text_name] = text_value.decode("utf-8")
                        except UnicodeDecodeError as exc:
                            raise InvalidJobRequest(f"the form field {text_name!r} is not UTF-8") from exc
                        text_name = None
        reader.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return form
