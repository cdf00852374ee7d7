#!/usr/bin/env python3
"""HEALTHCHECK of the server image: exit 0 when ``GET /readyz`` answers 200 (a model is loaded), else 1.

Standard library only; proxies from the environment are ignored (the check is always local).
``VAD_HEALTHCHECK_URL`` overrides the URL (default ``http://127.0.0.1:8000/readyz``).
"""

from __future__ import annotations

import os
import sys
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8000/readyz"


def check(url: str, timeout_s: float = 4.0) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s) as response:
            return response.status == 200
    except Exception as exc:  # HTTPError (503 not_ready), connection refused, timeout
        print(f"vad healthcheck: {url}: {exc}", file=sys.stderr)
        return False


if __name__ == "__main__":
    sys.exit(0 if check(os.environ.get("VAD_HEALTHCHECK_URL", DEFAULT_URL)) else 1)
