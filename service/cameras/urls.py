"""Which camera URLs the server may open (VAD_CAMERA_URL_ALLOW), and how a URL is shown (redacted).

A camera URL is an SSRF door: whoever adds a camera makes the server connect somewhere. The allowlist
is a JSON list of entries, each matched against the *parsed* URL (urllib.parse), never as a string
prefix:

- ``scheme://host`` or ``scheme://host:port`` with scheme rtsp, rtsps, http or https. The host is
  compared case-insensitively (a trailing dot ignored; IP addresses compared as addresses, IPv6 in
  brackets: ``rtsp://[fd00::7]``). ``*.example.com`` matches the subdomains of example.com only,
  not example.com itself. No port in the entry: any port.
- ``file://``: files (looped, for demos and tests) whose real path, symlinks resolved, lies under
  VAD_FOOTAGE_ROOT; refused when no root is set.

An empty list disables cameras. URLs with credentials are stored as given (the server needs them) but
shown only through ``redact``: ``rtsp://user:***@host/...``, and the values of query parameters that
look like secrets (``?token=***``) masked too. Every message here names URLs redacted.

What the allowlist does not cover: where an allowed camera sends FFmpeg next (an HTTP redirect or an
RTSP redirect is followed), and what a host name resolves to (DNS) - allow the hosts you trust.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from service.errors import CameraUrlRefused, CamerasDisabled, InvalidCameraUrl

NETWORK_SCHEMES = ("rtsp", "rtsps", "http", "https")
FILE_ENTRY = "file://"
MAX_URL_LENGTH = 2048
SECRET_KEYS = re.compile(r"pass|pwd|token|secret|key|auth|sig|cred|session", re.IGNORECASE)
# whitespace, control characters and backslashes: read differently by different URL parsers
UNSAFE_CHARACTERS = re.compile(r"[\s\x00-\x1f\x7f\\]")


@dataclass(frozen=True)
class AllowRule:
    """One allowlist entry: ``host`` lower-case, ``*.``-prefixed for subdomains; port None = any."""

    scheme: str
    host: str
    port: int | None
    entry: str

    def matches(self, scheme: str, host: str, port: int | None) -> bool:
        """``host`` lower-case without a trailing dot; ``port`` None when the URL names none."""
        if scheme != self.scheme:
            return False
        if self.port is not None and (port if port is not None else DEFAULT_PORTS[scheme]) != self.port:
            return False
        if self.host.startswith("*."):
            suffix = self.host[1:]  # ".example.com": subdomains only
            return host.endswith(suffix) and len(host) > len(suffix)
        return _normal_host(host) == self.host


DEFAULT_PORTS = {"rtsp": 554, "rtsps": 322, "http": 80, "https": 443}


@dataclass(frozen=True)
class CameraTarget:
    """What a source opens: a network URL as given, or a file's real path under the footage root."""

    url: str
    path: Path | None = None

    @property
    def is_file(self) -> bool:
        return self.path is not None

    @property
    def openable(self) -> str:
        return str(self.path) if self.path is not None else self.url


def _normal_host(host: str) -> str:
    host = host.lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def parse_allowlist(entries: list[str]) -> tuple[list[AllowRule], bool]:
    """(network rules, whether file:// is allowed); ValueError naming a malformed entry."""
    rules: list[AllowRule] = []
    files = False
    for entry in entries:
        if entry.strip().lower() == FILE_ENTRY:
            files = True
            continue
        try:
            parts = urlsplit(entry.strip())
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"VAD_CAMERA_URL_ALLOW: {entry!r} is not scheme://host[:port] ({exc})") from None
        scheme = parts.scheme.lower()
        if scheme not in NETWORK_SCHEMES:
            raise ValueError(f"VAD_CAMERA_URL_ALLOW: {entry!r}: the scheme must be one of "
                             f"{', '.join(NETWORK_SCHEMES)} (or the entry file://)")
        host = parts.hostname or ""
        if not host or parts.path not in ("", "/") or parts.query or parts.fragment or parts.username is not None:
            raise ValueError(f"VAD_CAMERA_URL_ALLOW: {entry!r} must be scheme://host or scheme://host:port, nothing else")
        if "*" in host and (not host.startswith("*.") or "*" in host[2:] or len(host) < 3):
            raise ValueError(f"VAD_CAMERA_URL_ALLOW: {entry!r}: a wildcard may only start the host, as *.example.com")
        rules.append(AllowRule(scheme, _normal_host(host), port, entry))
    return rules, files


class UrlPolicy:
    """The allowlist of one server (its settings), checking camera URLs."""

    def __init__(self, entries: list[str], footage_root: Path | None) -> None:
        self.rules, self.files = parse_allowlist(entries)
        self.footage_root = footage_root

    @property
    def enabled(self) -> bool:
        return bool(self.rules) or self.files

    def check(self, url: str) -> CameraTarget:
        """The target of an allowed URL; CamerasDisabled, InvalidCameraUrl or CameraUrlRefused."""
        if not self.enabled:
            raise CamerasDisabled("cameras are disabled: VAD_CAMERA_URL_ALLOW is empty (list the "
                                  "scheme://host entries cameras may open)")
        if len(url) > MAX_URL_LENGTH or UNSAFE_CHARACTERS.search(url):
            raise InvalidCameraUrl(f"the camera URL is over {MAX_URL_LENGTH} characters or has spaces, "
                                   "control characters or backslashes")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise InvalidCameraUrl(f"{redact(url)} is not a valid URL (bad host or port)") from None
        scheme = parts.scheme.lower()
        if scheme == "file":
            return CameraTarget(url, self._file_path(url, parts.netloc, parts.path))
        if scheme not in NETWORK_SCHEMES:
            raise CameraUrlRefused(f"{redact(url)}: the scheme {scheme or '(none)'!r} is not allowed; camera URLs "
                                   f"are {', '.join(NETWORK_SCHEMES)} or file://")
        host = parts.hostname
        if not host:
            raise InvalidCameraUrl(f"{redact(url)} has no host")
        if not any(rule.matches(scheme, host.lower().rstrip("."), port) for rule in self.rules):
            shown = f"{scheme}://{host}" + (f":{port}" if port is not None else "")
            raise CameraUrlRefused(f"{shown} is not in VAD_CAMERA_URL_ALLOW (entries are matched by scheme, "
                                   "host or *.domain, and port when given)")
        return CameraTarget(url)

    def _file_path(self, url: str, netloc: str, path: str) -> Path:
        if not self.files:
            raise CameraUrlRefused(f"{redact(url)}: file URLs are not allowed (add the entry \"file://\" to "
                                   "VAD_CAMERA_URL_ALLOW)")
        if self.footage_root is None:
            raise CameraUrlRefused("file URLs need a footage root (VAD_FOOTAGE_ROOT), and none is set")
        if netloc not in ("", "localhost") or not path.startswith("/"):
            raise InvalidCameraUrl(f"{redact(url)}: a file URL is file:///absolute/path")
        real_root = Path(self.footage_root).resolve()
        real = Path(unquote(path)).resolve()
        if not real.is_relative_to(real_root):
            raise CameraUrlRefused(f"{redact(url)} is outside the footage root (VAD_FOOTAGE_ROOT; symlinks "
                                   "are followed)")
        if not real.is_file():
            raise CameraUrlRefused(f"{redact(url)}: no such file under the footage root")
        return real


def redact(url: str) -> str:
    """``url`` safe to show and log: the password (or a lone user name) and secret-looking query
    values replaced by ``***``."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<an unparsable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        if ":" in host:
            host = f"[{host}]"
        where = host + (f":{port}" if port is not None else "")
        user = "***" if parts.password is None else f"{parts.username}:***"
        netloc = f"{user}@{where}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if SECRET_KEYS.search(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
