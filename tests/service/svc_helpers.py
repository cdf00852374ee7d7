"""Helpers shared by the service tests: headers that declare huge images, metrics parsing, and
comparisons of served scores with offline ones (footage and its encodings are tests/support.py's)."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

import numpy as np
from prometheus_client.parser import text_string_to_metric_families


def assert_same_decisions(got: Sequence[dict], want: Sequence[dict], rel: float = 1e-5, abs_: float = 1e-6) -> None:
    """Served frame results against the model's own: the same values, the same flags (which frames
    are anomalous or uncertain) and the same ranking of frames by score. Frames whose reference
    scores are closer than the value tolerance may swap places."""
    got_scores = np.array([f["score"] for f in got])
    want_scores = np.array([f["score"] for f in want])
    assert len(got_scores) == len(want_scores)
    np.testing.assert_allclose(got_scores, want_scores, rtol=rel, atol=abs_)
    assert [f["anomalous"] for f in got] == [f["anomalous"] for f in want]
    assert [f["uncertain"] for f in got] == [f["uncertain"] for f in want]
    assert_same_ranking(got_scores, want_scores, tolerance=rel * np.abs(want_scores).max() + abs_)


def assert_same_ranking(got: Sequence[float], want: Sequence[float], tolerance: float = 0.0) -> None:
    """``got`` orders the frames as ``want`` does: in ``want``'s order, ``got`` never decreases by more
    than ``tolerance`` (whenever ``want`` tells two frames apart by more than that)."""
    got, want = np.asarray(got, float), np.asarray(want, float)
    order = np.argsort(want, kind="stable")
    for a, b in zip(order[:-1], order[1:]):
        if want[b] - want[a] > tolerance:
            assert got[b] > got[a] - tolerance, f"frames {a} and {b}: want {want[a]} < {want[b]}, got {got[a]}, {got[b]}"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature + IHDR declaring ``width`` x ``height`` and no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + b"\x00" * 64


def jpeg_header_only(width: int, height: int) -> bytes:
    """SOI, an APP0 segment and an SOF0 declaring ``width`` x ``height``; no scan."""
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + sof0 + b"\x00" * 32


def metric_families(text: str) -> dict:
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample_value(families: dict, family: str, sample: str, **labels: str) -> float | None:
    for s in families[family].samples:
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def histogram_buckets(families: dict, family: str, **labels: str) -> dict[float, float]:
    """{upper bound: cumulative count} of one histogram series."""
    buckets: dict[float, float] = {}
    for s in families[family].samples:
        if s.name == f"{family}_bucket" and all(s.labels.get(k) == v for k, v in labels.items()):
            buckets[float(s.labels["le"])] = buckets.get(float(s.labels["le"]), 0.0) + s.value
    return buckets
