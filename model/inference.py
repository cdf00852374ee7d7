"""An eval-only, inference-fused copy of R and D, built once when a PatchScorer is created.

What it changes (never the trained weights, which stay in the original modules):
- every batch norm is folded into the convolution / linear layer before it (eval-mode batch norm
  is an affine map per channel: w' = w * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta);
  the decoder's leading batch norm folds into ``from_latent``;
- R's log-variance head is dropped (eval uses Z = mu);
- the first convolution of R and of D read the same input X: they run as one convolution with both
  filter banks (one pass over X instead of two);
- activations are kept channels-last (NHWC), which oneDNN runs faster for these narrow layers, and
  the flatten/unflatten around the linear layers is done on NHWC directly (their weights permuted once);
- a transposed convolution (kernel 4, stride 2, padding 1) with few output channels runs as the
  equivalent 3x3 convolution producing the 4 sub-pixel phases, then a pixel shuffle (``PHASE_MAX_COUT``).

``FusedNets(refiner, detector)(x) -> (N, 3)`` computes [d_r_x, d_x, reconstruction] exactly as
``PatchScorer`` defines them, equal to the unfused networks within float32 rounding (tests/speed checks
1e-4 relative). Everything here is plain PyTorch: it runs on CUDA as it does on the CPU.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from model.cpu_features import detect_cpu_features
from model.networks import Detector, Refiner, padded_size
from model.precision import CALIBRATION_SEED, TOLERANCE, probe_patches, score_difference, scene_patches
from model.quantize import quantize_int8

# ConvTranspose2d with at most this many output channels runs as conv3x3 + pixel shuffle (measured
# faster with oneDNN for R's last layer, 16 -> 2 channels; slower for the wider ones, and slower under
# ONNX Runtime, whose export keeps every ConvTranspose; docs/speed.md).
PHASE_MAX_COUT = 4


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    assert bn.running_mean is not None and bn.running_var is not None
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias.detach() - bn.running_mean * scale
    return scale, shift


def fold_conv_bn(conv: nn.Conv2d | nn.ConvTranspose2d, bn: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of ``bn(conv(x))`` as one layer. Output channels are dim 0 of a Conv2d weight,
    dim 1 of a ConvTranspose2d weight."""
    weight = conv.weight.detach().clone()
    out_channels = weight.shape[1] if isinstance(conv, nn.ConvTranspose2d) else weight.shape[0]
    bias = conv.bias.detach().clone() if conv.bias is not None else torch.zeros(out_channels, dtype=weight.dtype, device=weight.device)
    if bn is None:
        return weight, bias
    scale, shift = _bn_scale_shift(bn)
    if isinstance(conv, nn.ConvTranspose2d):
        weight = weight * scale.view(1, -1, 1, 1)
    else:
        weight = weight * scale.view(-1, 1, 1, 1)
    return weight, bias * scale + shift


def phase_weight(weight: torch.Tensor) -> torch.Tensor:
    """ConvTranspose2d(k=4, s=2, p=1) weight (Cin, Cout, 4, 4) -> Conv2d(3x3, pad 1) weight
    (4 * Cout, Cin, 3, 3) whose output, pixel-shuffled by 2, equals the transposed convolution.

    out[2i + a] = sum_m x[m] w[2(i - m) + a + 1]: at window offset d = m - i the tap is ky = a + 1 - 2d.
    """
    cin, cout = weight.shape[:2]
    out = weight.new_zeros(cout, 2, 2, cin, 3, 3)
    for a in range(2):
        for b in range(2):
            for dy in (-1, 0, 1):
                ky = a + 1 - 2 * dy
                if not 0 <= ky < 4:
                    continue
                for dx in (-1, 0, 1):
                    kx = b + 1 - 2 * dx
                    if 0 <= kx < 4:
                        out[:, a, b, :, dy + 1, dx + 1] = weight[:, :, ky, kx].t()
    return out.reshape(cout * 4, cin, 3, 3)


def _pad_amounts(patch_size: int) -> tuple[int, int]:
    extra = padded_size(patch_size) - patch_size
    return extra // 2, extra - extra // 2


class _ConvLayer(nn.Module):
    """Conv2d (5x5 stride 2) with folded batch norm, then leaky ReLU(0.2)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, stride: int, padding: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.stride, self.padding = stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu_(F.conv2d(x, self.weight, self.bias, self.stride, self.padding), 0.2)


class _UpLayer(nn.Module):
    """ConvTranspose2d(k=4, s=2, p=1) with folded batch norm (native, or conv3x3 + pixel shuffle)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, phase: bool) -> None:
        super().__init__()
        self.phase = phase
        if phase:
            weight, bias = phase_weight(weight), bias.repeat_interleave(4)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.phase:
            return F.pixel_shuffle(F.conv2d(x, self.weight, self.bias, 1, 1), 2)
        return F.conv_transpose2d(x, self.weight, self.bias, 2, 1)


def _nhwc_linear_in(linear: nn.Linear, channels: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A Linear reading an NCHW-flattened map, re-ordered to read the NHWC-flattened map."""
    w = linear.weight.detach()
    w = w.view(w.shape[0], channels, side, side).permute(0, 2, 3, 1).reshape(w.shape[0], -1)
    return w.contiguous(), linear.bias.detach().clone()


class FusedNets(nn.Module):
    """Eval-only fused R + D: (N, C, P, P) patches in [-1, 1] -> (N, 3) [d_r_x, d_x, reconstruction]."""

    def __init__(self, refiner: Refiner, detector: Detector, channels_last: bool = True,
                 phase_max_cout: int = PHASE_MAX_COUT) -> None:
        super().__init__()
        config = refiner.config
        self.patch_size = config.patch_size
        self.pad = _pad_amounts(config.patch_size)
        self.side = padded_size(config.patch_size) // 8
        self.channels_last = channels_last
        r1, r2, r3 = config.refiner_channels
        self.r1 = r1
        with torch.no_grad():
            enc = refiner.encoder
            feats = detector.features
            # first layers of R and D, both on X (no batch norm in either)
            w_r, b_r = fold_conv_bn(enc[0][0], None)
            w_d, b_d = fold_conv_bn(feats[0][0], None)
            self.first_both = _ConvLayer(torch.cat([w_r, w_d]), torch.cat([b_r, b_d]), 2, 2)
            self.first_d = _ConvLayer(w_d.clone(), b_d.clone(), 2, 2)
            self.enc = nn.ModuleList(
                [_ConvLayer(*fold_conv_bn(block[0], block[1]), 2, 2) for block in (enc[1], enc[2])]
            )
            self.det = nn.ModuleList(
                [_ConvLayer(*fold_conv_bn(block[0], block[1]), 2, 2) for block in (feats[1], feats[2])]
            )
            self.to_mu_w, self.to_mu_b = (nn.Parameter(t, requires_grad=False) for t in _nhwc_linear_in(refiner.to_mu, r3, self.side))
            dc = detector.config.detector_channels[2]
            hw, hb = _nhwc_linear_in(detector.head, dc, self.side)
            self.head_w, self.head_b = nn.Parameter(hw, requires_grad=False), nn.Parameter(hb, requires_grad=False)
            # from_latent followed by the decoder's BN(r3): scale/shift rows per channel, then emit NHWC
            scale, shift = _bn_scale_shift(refiner.decoder[0])
            fw = refiner.from_latent.weight.detach().view(r3, self.side, self.side, -1)
            fb = refiner.from_latent.bias.detach().view(r3, self.side, self.side)
            fw = fw * scale.view(-1, 1, 1, 1)
            fb = fb * scale.view(-1, 1, 1) + shift.view(-1, 1, 1)
            self.from_latent_w = nn.Parameter(fw.permute(1, 2, 0, 3).reshape(-1, fw.shape[-1]).contiguous(), requires_grad=False)
            self.from_latent_b = nn.Parameter(fb.permute(1, 2, 0).reshape(-1).contiguous(), requires_grad=False)
            dec = refiner.decoder
            ups = []
            for conv, bn in ((dec[2], dec[3]), (dec[5], dec[6]), (dec[8], None)):
                weight, bias = fold_conv_bn(conv, bn)
                ups.append(_UpLayer(weight, bias, phase=weight.shape[1] <= phase_max_cout))
            self.ups = nn.ModuleList(ups)
            self.r3 = r3
        device = refiner.to_mu.weight.device
        self.to(device)
        if channels_last:
            self.to(memory_format=torch.channels_last)
        self.eval()

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        before, after = self.pad
        if before or after:
            x = F.pad(x, (before, after, before, after), mode="reflect")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @staticmethod
    def _flat_nhwc(h: torch.Tensor) -> torch.Tensor:
        return h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)

    def _detector_tail(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.det:
            h = layer(h)
        return F.linear(self._flat_nhwc(h), self.head_w, self.head_b).squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        both = self.first_both(self._prep(x))
        h, d_first_x = both[:, : self.r1], both[:, self.r1 :]
        for layer in self.enc:
            h = layer(h)
        mu = F.linear(self._flat_nhwc(h), self.to_mu_w, self.to_mu_b)
        h = F.relu_(F.linear(mu, self.from_latent_w, self.from_latent_b))
        h = h.view(n, self.side, self.side, self.r3).permute(0, 3, 1, 2)
        if not self.channels_last:
            h = h.contiguous()
        for i, layer in enumerate(self.ups):
            h = layer(h)
            h = F.relu_(h) if i < len(self.ups) - 1 else torch.tanh_(h)
        extra = h.shape[-1] - self.patch_size
        b = extra // 2
        refined = h[..., b : b + self.patch_size, b : b + self.patch_size]
        d_first_r = self.first_d(self._prep(refined))
        logits = self._detector_tail(torch.cat([d_first_r, d_first_x]))
        reconstruction = (x - refined).pow(2).flatten(1).mean(1)
        return torch.stack([-logits[:n], -logits[n:], reconstruction], 1)


# "auto": on the CPU the fastest precision, measured at load, of those that pass the check against
# float32 (model/precision.py); on CUDA float32 (fp16 and bf16 there are explicit choices).
PRECISIONS = ("float32", "bf16", "fp16", "int8", "auto")
CUDA_PRECISIONS = ("float32", "bf16", "fp16")
INT8_CALIBRATION_FRAMES = 16  # frames of the synthetic normal scene int8 calibrates on by default (1536 Ped2-sized patches)
BACKENDS = ("auto", "torch", "onnxruntime")
# ONNX Runtime must give the torch path's components within this (rtol = atol), checked on every build
ORT_TOLERANCE = 1e-4

log = logging.getLogger("vad.model")


def onnxruntime_available() -> bool:
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def export_onnx(nets: "FusedNets", channels: int, patch_size: int) -> bytes:
    """The fused networks as an ONNX model (in memory): input ``x`` (N, C, P, P), output ``raw`` (N, 3)."""
    buffer = io.BytesIO()
    example = torch.zeros(8, channels, patch_size, patch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(nets, (example,), buffer, input_names=["x"], output_names=["raw"],
                          dynamic_axes={"x": {0: "n"}, "raw": {0: "n"}}, opset_version=17, dynamo=False)
    return buffer.getvalue()


class OrtRunner:
    """An ONNX model of the fused networks (float32, or int8 from model/quantize.py) run by ONNX Runtime's
    CPU provider, whose narrow-channel convolutions are faster than oneDNN's here (docs/speed.md). One
    session; ``Run`` is thread-safe and releases the GIL, so CpuWorkers can split a batch across threads."""

    def __init__(self, model: bytes, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # no busy-waiting between runs: the cores are shared with decoding and optical flow
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().contiguous().float()
        return torch.from_numpy(self.session.run(None, {"x": x.numpy()})[0])
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class _CudaGraphs:
    """Replays one captured CUDA graph per batch-size bucket (powers of two, at least ``MIN_BUCKET``).

    Rows are independent in eval mode, so a batch padded up to its bucket scores its real rows exactly
    as an unpadded batch would; the padding rows are ignored.
    """

    MIN_BUCKET = 64

    def __init__(self, run) -> None:  # run: (N, C, P, P) on the device -> (N, 3)
        self.run = run
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.pool = None  # one memory pool for every bucket's graph: they never replay concurrently

    def bucket(self, n: int) -> int:
        size = self.MIN_BUCKET
        while size < n:
            size *= 2
        return size

    def _capture(self, example: torch.Tensor, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        static_in = example.new_zeros((size, *example.shape[1:]))
        stream = torch.cuda.Stream(device=example.device)
        stream.wait_stream(torch.cuda.current_stream(example.device))
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up (cuDNN autotuning, allocator) outside the capture
                self.run(static_in)
        torch.cuda.current_stream(example.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = self.run(static_in)
        return graph, static_in, static_out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        size = self.bucket(n)
        if size not in self.graphs:
            self.graphs[size] = self._capture(x, size)
        graph, static_in, static_out = self.graphs[size]
        static_in[:n].copy_(x)
        graph.replay()
        return static_out[:n].clone()


class CpuWorkers:
    """``count`` threads, each running its share of a batch with one intra-op thread.

    On a few cores, splitting a batch across single-threaded workers beats one pass with OpenMP
    intra-op threads over these narrow layers (no fork/join per layer, and no spinning barrier when a
    core is taken by decoding or optical flow). Measured in docs/speed.md.
    """

    MIN_PART = 32  # patches: smaller batches run whole, in the caller's thread
    MAX_PART = 128  # patches per forward pass: activations stay in cache (measured, docs/speed.md)

    def __init__(self, count: int, max_part: int = MAX_PART) -> None:
        previous = torch.get_num_threads()
        barrier = threading.Barrier(count)
        self.count = count
        self.max_part = max_part
        self.pool = ThreadPoolExecutor(count, thread_name_prefix="vad-cpu-infer",
                                       initializer=torch.set_num_threads, initargs=(1,))
        list(self.pool.map(lambda _: barrier.wait(), range(count)))  # start them all now
        torch.set_num_threads(previous)  # the workers keep 1; everyone else is as before

    def __call__(self, run, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        parts = max(min(self.count, n // self.MIN_PART), -(-n // self.max_part))
        if parts <= 1:
            return run(x)
        # a whole number of parts per worker: 5 parts on 2 workers take as long as 6 (3 rounds)
        parts = -(-parts // self.count) * self.count if parts > self.count else parts
        size = -(-n // parts)
        futures = [self.pool.submit(_inference_call, run, part) for part in x.split(size)]
        return torch.cat([f.result() for f in futures])


def _inference_call(run, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return run(x)


# Worker threads an InferenceEngine splits CPU batches over; None: torch's intra-op thread count.
CPU_WORKERS: int | None = None


def dedicate_cpu_to_workers() -> int:
    """For a serving process: batches run on ``torch.get_num_threads()`` single-threaded workers and
    every other torch op (patching, skip tests, calibration) runs single-threaded. With both an OpenMP
    team in the calling thread and ops in other threads, libgomp's teams thrash: each small op then
    costs ~60 us more (measured: a one-patch forward pass 2.2 -> 7 ms). Returns the worker count."""
    global CPU_WORKERS
    if CPU_WORKERS is None:
        CPU_WORKERS = torch.get_num_threads()
    torch.set_num_threads(1)
    return CPU_WORKERS


class InferenceEngine:
    """Runs ``FusedNets`` on a device: batching into chunks, a precision (checked at load on the CPU),
    ONNX Runtime on the CPU, CUDA graphs on a GPU.

    - CPU: ``precision`` float32 (default), bf16 (torch autocast: oneDNN on AVX512-BF16 or AMX), int8
      (ONNX Runtime, statically quantised at load from normal footage, model/quantize.py) or auto (the
      fastest of those that pass, measured at load). A precision other than float32 is kept only if it
      scores the probe like float32 (model/precision.py: largest patch-score difference within
      ``tolerance`` of the score spread), and bf16 only where the CPU has bf16 hardware; otherwise float32,
      with a warning saying why. float32 runs under ONNX Runtime when installed (``backend`` auto).
      Batches are split over single-threaded workers (``CpuWorkers``).
    - CUDA: ``precision`` float32 (default), bf16 or fp16 autocast; ``cuda_graphs`` replays captured
      graphs per power-of-two batch bucket (launch overhead of ~25 small kernels per batch gone). Both
      are options, off by default: on an H200 they sped up the networks (fp16 +67%, graphs 2-4x at one
      frame per batch) but not the service, which the CPU's decoding and optical flow bound there;
      float32 keeps the scores the CPU-calibrated thresholds expect (docs/speed.md).

    ``calibration``: the version's (score mode, spread) for the precision check; ``int8_calibration``:
    normal patches the int8 quantiser calibrates on (default: model/precision.py's synthetic normal
    scene). ``precision_report`` says what was asked, what runs, and each candidate's check.
    """

    def __init__(self, refiner: Refiner, detector: Detector, device: torch.device | str = "cpu",
                 precision: str = "float32", cuda_graphs: bool = False, cpu_workers: int | None = None,
                 backend: str = "auto", calibration: Any | None = None,
                 int8_calibration: torch.Tensor | None = None, tolerance: float | None = None) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.device = torch.device(device)
        self.config = refiner.config
        self.nets = FusedNets(refiner, detector).to(self.device)
        cuda = self.device.type == "cuda"
        self.precision = "float32"
        self.precision_report: dict[str, Any] = {"requested": precision, "precision": "float32"}
        if cuda:
            self.precision = precision if precision in CUDA_PRECISIONS else "float32"
            if precision == "int8":
                log.warning("precision int8 is CPU only; float32 on %s", self.device)
            self.precision_report["precision"] = self.precision
        if cuda and self.precision == "float32":
            # float32 means float32: cuDNN's TF32 convolutions (torch's default) moved d_r_x by 0.067
            # of its spread from the CPU, more than fp16 did (0.056; docs/speed.md), against
            # thresholds calibrated in float32. Process-wide; a serving process only runs inference.
            torch.backends.cudnn.allow_tf32 = False
        self.graphs = _CudaGraphs(self._run) if cuda and cuda_graphs else None
        workers = cpu_workers or CPU_WORKERS or torch.get_num_threads()
        self.workers = CpuWorkers(workers) if self.device.type == "cpu" and workers > 1 else None
        self.ort: OrtRunner | None = None
        self.backend = "torch"
        self._runner = self._run
        if self.device.type != "cpu":
            return
        self._onnx_float: bytes | None = None
        if backend == "onnxruntime" or (backend == "auto" and onnxruntime_available()):
            self.ort = self._checked_ort(refiner, detector, strict=backend == "onnxruntime")
            self.backend = "onnxruntime" if self.ort is not None else "torch"
            self._runner = self.ort if self.ort is not None else self._run
        if precision != "float32":
            self._choose_cpu_precision(precision, refiner, detector, calibration, int8_calibration,
                                       TOLERANCE if tolerance is None else tolerance)
        # the float32 export only served construction (ONNX Runtime's copy, int8's quantisation), and
        # the float32 ONNX Runtime copy only matters while it is what runs
        self._onnx_float = None
        if self._runner is not self.ort:
            self.ort = None

    def _ort_threads(self) -> int:
        return 1 if self.workers else torch.get_num_threads()

    def _float_model(self, refiner: Refiner, detector: Detector) -> bytes:
        """The ONNX export of the plain (NCHW, native transposed convolutions) fused networks, once."""
        if self._onnx_float is None:
            plain = FusedNets(refiner, detector, channels_last=False, phase_max_cout=0).cpu()
            self._onnx_float = export_onnx(plain, self.config.channels, self.config.patch_size)
        return self._onnx_float

    def _checked_ort(self, refiner: Refiner, detector: Detector, strict: bool) -> "OrtRunner | None":
        """An ONNX Runtime copy, kept only if it scores a probe batch like the torch path."""
        config = self.config
        try:
            runner = OrtRunner(self._float_model(refiner, detector), threads=self._ort_threads())
            probe = torch.rand(64, config.channels, config.patch_size, config.patch_size,
                               generator=torch.Generator().manual_seed(0)) * 2 - 1
            with torch.inference_mode():
                expected = self.nets(probe)
            if not torch.allclose(runner(probe), expected, rtol=ORT_TOLERANCE, atol=ORT_TOLERANCE):
                raise RuntimeError("ONNX Runtime's scores differ from the torch path beyond the tolerance")
            return runner
        except Exception as exc:
            if strict:
                raise
            log.warning("ONNX Runtime not used (%s: %s); scoring with torch", type(exc).__name__, exc)
            return None

    def _bf16_run(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.nets(x).float()

    def _cpu_candidate(self, name: str, refiner: Refiner, detector: Detector,
                       int8_calibration: torch.Tensor | None) -> tuple[Any, str]:
        """(runner, backend) of one CPU precision; raises ``_Unsupported`` where it cannot win or run here."""
        if name == "bf16":
            features = detect_cpu_features()
            if not features.bf16_hardware:
                raise _Unsupported(f"this CPU has no bf16 hardware (AVX512-BF16 or AMX; {features.summary()})")
            return self._bf16_run, "torch"
        if not onnxruntime_available():
            raise _Unsupported("int8 needs onnx and onnxruntime (the [onnx] extra)")
        normal = int8_calibration if int8_calibration is not None else scene_patches(
            self.config, INT8_CALIBRATION_FRAMES, CALIBRATION_SEED, fast_objects=False)
        return OrtRunner(quantize_int8(self._float_model(refiner, detector), normal), self._ort_threads()), "onnxruntime"

    def _fastest(self, runs: dict[str, Any], x: torch.Tensor, rounds: int = 5) -> tuple[str, dict[str, float]]:
        """The name of the fastest runner over ``x`` as raw_scores runs it (split over the workers): best
        of ``rounds`` interleaved passes each, after a warm-up pass (new shapes build kernels)."""
        def one_pass(run: Any) -> float:
            started = time.perf_counter()
            with torch.inference_mode():
                self.workers(run, x) if self.workers else run(x)
            return time.perf_counter() - started

        for run in runs.values():
            one_pass(run)
        best = {name: float("inf") for name in runs}
        for _ in range(rounds):
            for name, run in runs.items():
                best[name] = min(best[name], one_pass(run))
        return min(best, key=best.get), best  # type: ignore[arg-type]

    def _choose_cpu_precision(self, requested: str, refiner: Refiner, detector: Detector, calibration: Any | None,
                              int8_calibration: torch.Tensor | None, tolerance: float) -> None:
        report: dict[str, Any] = {"requested": requested, "precision": "float32", "tolerance": tolerance, "candidates": {}}
        self.precision_report = report
        if requested == "fp16":
            log.warning("precision fp16 is CUDA only: float32 on the CPU (bf16 and int8 are the CPU's options)")
            return
        probe = probe_patches(self.config)
        with torch.inference_mode():
            reference = self._runner(probe)
        passed: dict[str, tuple[Any, str]] = {}
        for name in ("bf16", "int8") if requested == "auto" else (requested,):
            entry: dict[str, Any] = {}
            report["candidates"][name] = entry
            try:
                run, backend = self._cpu_candidate(name, refiner, detector, int8_calibration)
                with torch.inference_mode():
                    difference = score_difference(reference, run(probe), calibration)
            except _Unsupported as exc:
                entry.update(passed=False, reason=str(exc))
                continue
            except Exception as exc:  # a failed export/quantisation: float32 serves
                entry.update(passed=False, reason=f"{type(exc).__name__}: {exc}")
                continue
            entry.update(max_diff_over_spread=round(difference, 4), passed=difference <= tolerance)
            if difference > tolerance:
                entry["reason"] = f"largest score difference {difference:.4f} of the spread > tolerance {tolerance}"
            else:
                passed[name] = (run, backend)
        chosen = next(iter(passed), None)
        if requested == "auto" and passed:
            fastest, seconds = self._fastest({"float32": self._runner, **{name: run for name, (run, _) in passed.items()}}, probe)
            report["probe_ms"] = {name: round(value * 1e3, 2) for name, value in seconds.items()}
            chosen = None if fastest == "float32" else fastest
        if chosen is not None:
            self.precision = report["precision"] = chosen
            self._runner, self.backend = passed[chosen]
            log.info("CPU precision %s (%s; %s) passed the check against float32: largest score difference %.4f "
                     "of the spread (tolerance %s)", chosen, self.backend, requested,
                     report["candidates"][chosen]["max_diff_over_spread"], tolerance)
        elif not passed:
            reasons = "; ".join(f"{name}: {entry['reason']}" for name, entry in report["candidates"].items())
            log.warning("precision %s not used, scoring in float32 (%s)", requested, reasons)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self.precision in _AUTOCAST_DTYPES and self.device.type == "cuda":
            # no weight-cast cache: a captured CUDA graph must not depend on it
            with torch.autocast("cuda", dtype=_AUTOCAST_DTYPES[self.precision], cache_enabled=False):
                return self.nets(x).float()
        return self.nets(x)

    @torch.inference_mode()
    def raw_scores(self, patches: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """(N, C, P, P) float patches in [-1, 1] -> (N, 3) components, float32 on the CPU."""
        out = []
        for start in range(0, patches.shape[0], batch_size):
            x = patches[start : start + batch_size].to(self.device, non_blocking=True)
            if self.graphs is not None:
                raw = self.graphs(x)
            elif self.workers is not None:
                raw = self.workers(self._runner, x)
            else:
                raw = self._runner(x)
            out.append(raw.float().cpu())
        if not out:
            return torch.empty(0, 3)
        return torch.cat(out)


class _Unsupported(Exception):
    """A CPU precision that cannot run, or cannot win, on this machine."""
