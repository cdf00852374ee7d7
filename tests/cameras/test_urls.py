"""VAD_CAMERA_URL_ALLOW: entries matched against the parsed URL (never a string prefix), file URLs
only under the footage root (symlinks followed), and URLs shown redacted."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.cameras.urls import UrlPolicy, parse_allowlist, redact
from service.errors import CameraUrlRefused, CamerasDisabled, InvalidCameraUrl

ALLOW = ["rtsp://*.cams.example", "http://127.0.0.1", "rtsp://10.0.0.5:8554", "https://Cam.Example.org",
         "rtsp://[fd00::7]", "http://[::1]:8080"]

# (url, allowed?) under ALLOW
CASES = [
    ("rtsp://a.cams.example/stream", True),
    ("rtsp://A.B.CAMS.EXAMPLE:9000/x", True),          # subdomains at any depth, any port, any case
    ("rtsp://cams.example/stream", False),             # *. matches subdomains only
    ("rtsp://evilcams.example/", False),               # not a subdomain: no string suffix match
    ("rtsp://a.cams.example.evil.com/", False),        # not a string prefix either
    ("rtsps://a.cams.example/", False),                # the scheme is part of the entry
    ("http://127.0.0.1/video.mjpg", True),
    ("http://127.0.0.1:8081/video.mjpg", True),        # no port in the entry: any port
    ("http://127.0.0.1@evil.com/", False),             # user info is not the host
    ("http://evil.com/#@127.0.0.1", False),
    ("http://evil.com?@127.0.0.1/", False),
    ("http://127.0.0.1.evil.com/", False),
    ("https://127.0.0.1/", False),
    ("rtsp://10.0.0.5:8554/cam", True),
    ("rtsp://10.0.0.5/cam", False),                    # default port 554 is not 8554
    ("rtsp://10.0.0.5:554/cam", False),
    ("rtsp://user:pw@10.0.0.5:8554/cam", True),
    ("https://cam.example.org/live", True),            # host compared case-insensitively
    ("https://cam.example.org./live", True),           # trailing dot
    ("https://cam.example.org:443/live", True),
    ("rtsp://[fd00::7]/s", True),
    ("rtsp://[fd00:0::7]:1554/s", True),               # IPv6 compared as an address
    ("rtsp://[fd00::8]/s", False),
    ("http://[::1]:8080/", True),
    ("http://[::1]/", False),                          # default port 80 is not 8080
]


@pytest.mark.parametrize("url,allowed", CASES)
def test_allowlist_matches_the_parsed_url(url: str, allowed: bool) -> None:
    policy = UrlPolicy(ALLOW, None)
    if allowed:
        assert policy.check(url).url == url
    else:
        with pytest.raises(CameraUrlRefused) as refused:
            policy.check(url)
        assert "VAD_CAMERA_URL_ALLOW" in refused.value.message or "scheme" in refused.value.message
        assert "pw" not in refused.value.message


@pytest.mark.parametrize("url,error", [
    ("ftp://127.0.0.1/x", CameraUrlRefused),
    ("gopher://127.0.0.1/", CameraUrlRefused),
    ("concat:http://127.0.0.1/a|http://127.0.0.1/b", CameraUrlRefused),
    ("127.0.0.1/video", CameraUrlRefused),
    ("http:///path", InvalidCameraUrl),
    ("http://127.0.0.1:99999/", InvalidCameraUrl),
    ("http://127.0.0.1/a b", InvalidCameraUrl),
    ("http://127.0.0.1/\r\nX-Injected: 1", InvalidCameraUrl),
    ("http://127.0.0.1\\@evil.com/", InvalidCameraUrl),
    ("file:///etc/passwd", CameraUrlRefused),          # no "file://" entry
])
def test_bad_schemes_and_malformed_urls(url: str, error: type) -> None:
    with pytest.raises(error):
        UrlPolicy(ALLOW, None).check(url)


def test_an_empty_allowlist_disables_cameras() -> None:
    with pytest.raises(CamerasDisabled, match="VAD_CAMERA_URL_ALLOW is empty"):
        UrlPolicy([], None).check("rtsp://a.cams.example/")


@pytest.mark.parametrize("entry", ["rtsp://", "ftp://host", "rtsp://host/path", "rtsp://a.*.example", "*.example",
                                   "rtsp://user@host", "rtsp://host:notaport", "rtsp://**.example"])
def test_malformed_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="VAD_CAMERA_URL_ALLOW"):
        parse_allowlist([entry])


def test_file_urls_only_under_the_footage_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "footage", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    (root / "clip.avi").write_bytes(b"x")
    (outside / "secret.avi").write_bytes(b"x")
    (root / "link.avi").symlink_to(outside / "secret.avi")
    (root / "inner").symlink_to(root)
    policy = UrlPolicy(["file://"], root)
    assert policy.check(f"file://{root}/clip.avi").path == (root / "clip.avi").resolve()
    assert policy.check(f"file://localhost{root}/inner/clip.avi").is_file
    assert policy.check(f"file://{root}/cl%69p.avi").is_file  # percent-decoded like a path
    for url in (f"file://{outside}/secret.avi", f"file://{root}/link.avi",  # a symlink leading out
                f"file://{root}/../elsewhere/secret.avi", f"file://{root}/missing.avi", f"file://{root}"):
        with pytest.raises(CameraUrlRefused):
            policy.check(url)
    with pytest.raises(InvalidCameraUrl):
        policy.check(f"file://otherhost{root}/clip.avi")
    with pytest.raises(CameraUrlRefused, match="VAD_FOOTAGE_ROOT"):
        UrlPolicy(["file://"], None).check(f"file://{root}/clip.avi")
    with pytest.raises(CameraUrlRefused, match="file://"):
        UrlPolicy(["rtsp://host"], root).check(f"file://{root}/clip.avi")


@pytest.mark.parametrize("url,shown", [
    ("rtsp://admin:hunter2@10.0.0.5:554/live", "rtsp://admin:***@10.0.0.5:554/live"),
    ("rtsp://token123@cam.example/live", "rtsp://***@cam.example/live"),
    ("rtsp://admin:@cam.example/", "rtsp://admin:***@cam.example/"),
    ("http://u:p%40ss@[::1]:8080/v.mjpg", "http://u:***@[::1]:8080/v.mjpg"),
    ("http://cam/video.cgi?user=admin&pwd=hunter2&channel=1", "http://cam/video.cgi?user=admin&pwd=***&channel=1"),
    ("https://cam/s?access_token=abc&Password=x", "https://cam/s?access_token=***&Password=***"),
    ("rtsp://cam.example/live", "rtsp://cam.example/live"),
    ("http://[::1/", "<an unparsable URL>"),
])
def test_redact(url: str, shown: str) -> None:
    assert redact(url) == shown
