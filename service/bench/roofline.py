"""The machine's float32 matmul roofline, in this run, with the threads the model path uses: the
model path's GFLOP/s is reported as a fraction of it."""

from __future__ import annotations

from typing import Any

import torch

from service.bench.timing import best_seconds, synchronized


def roofline_gflops(quick: bool, device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    """Best float32 matmul GFLOP/s over a few square sizes (on CUDA true float32: TF32 off, torch's
    default for matmul)."""
    if device.type == "cuda":
        sizes = (1024, 2048) if quick else (2048, 4096, 8192)
    else:
        sizes = (256, 512) if quick else (512, 1024, 2048)
    results = {}
    for n in sizes:
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        matmul = synchronized(lambda: torch.mm(a, b), device)
        seconds = best_seconds(matmul, 0.1 if quick else 0.5, 2 if quick else 5)
        results[n] = 2 * n**3 / seconds / 1e9
    return {"gflops": max(results.values()), "by_size": {str(k): round(v, 1) for k, v in results.items()}}
