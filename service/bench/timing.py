"""How the bench times a call (best mean over a few windows, CUDA work waited for) and says what it
measured (one ``[bench]`` line per figure, as it finishes)."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def synchronized(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """``fn`` that returns only once the GPU work it queued is done (timing asynchronous CUDA)."""
    if device.type != "cuda":
        return fn
    return lambda: (fn(), torch.cuda.synchronize(device))


def best_seconds(fn: Callable[[], Any], seconds: float, repeats: int) -> float:
    """Best mean seconds per call over ``repeats`` windows of about ``seconds`` each (after a warm-up)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        calls, started = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                break
        best = min(best, elapsed / calls)
    return best
