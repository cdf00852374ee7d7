"""The machine's matmul rooflines, in this run, with the threads the model path uses: float32 (the model
path's GFLOP/s is reported as a fraction of it), and on the CPU each other precision the model path can
run in: bf16 ``torch.mm`` (oneDNN: AVX512-BF16 or AMX) and int8 as the int8 path runs it, ONNX
Runtime's MatMulInteger (u8 x s8 -> s32, the MLAS kernels its quantised convolutions use: VNNI or AMX)."""

from __future__ import annotations

from typing import Any

import torch

from service.bench.timing import best_seconds, synchronized


def roofline_gflops(quick: bool, device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Best ``dtype`` matmul GFLOP/s over a few square sizes (on CUDA true float32: TF32 off, torch's
    default for matmul)."""
    if device.type == "cuda":
        sizes = (1024, 2048) if quick else (2048, 4096, 8192)
    else:
        sizes = (256, 512) if quick else (512, 1024, 2048)
    results = {}
    for n in sizes:
        a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
        matmul = synchronized(lambda: torch.mm(a, b), device)
        seconds = best_seconds(matmul, 0.1 if quick else 0.5, 2 if quick else 5)
        results[n] = 2 * n**3 / seconds / 1e9
    return {"gflops": max(results.values()), "by_size": {str(k): round(v, 1) for k, v in results.items()}}


def int8_roofline_gops(quick: bool) -> dict[str, Any]:
    """Best int8 GOP/s of ONNX Runtime's MatMulInteger (u8 activations x s8 weights) over a few square
    sizes, on torch's thread count (what the roofline's float32 matmul uses)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    results = {}
    for n in (256, 512) if quick else (512, 1024, 2048):
        rng = np.random.default_rng(0)
        weight = numpy_helper.from_array(rng.integers(-128, 128, (n, n), dtype=np.int8), "w")
        graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "int8_matmul",
                                  [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
                                  [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])], [weight])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        a = rng.integers(0, 256, (n, n), dtype=np.uint8)
        seconds = best_seconds(lambda: session.run(None, {"a": a}), 0.1 if quick else 0.5, 2 if quick else 5)
        results[n] = 2 * n**3 / seconds / 1e9
    return {"gops": max(results.values()), "by_size": {str(k): round(v, 1) for k, v in results.items()}}
