"""What the CPU offers for the networks' arithmetic: AVX-512, its bf16 and VNNI (int8) dot products, and
AMX tiles, read from /proc/cpuinfo's flags (Linux), with torch's own view (its kernels' ISA level and
whether oneDNN runs bf16 natively). ``InferenceEngine`` decides from this which CPU precisions can win;
`vad serve` logs it at start and `vad bench` records it."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CPUINFO = Path("/proc/cpuinfo")


def read_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The flags of the first processor listed in /proc/cpuinfo's text (x86 ``flags``, Arm ``Features``)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@dataclass(frozen=True)
class CpuFeatures:
    flags: frozenset[str]
    torch_capability: str  # torch.backends.cpu.get_cpu_capability(): the ISA its own kernels dispatch to
    onednn_bf16: bool  # oneDNN runs bf16 convolutions/matmuls in hardware (AVX512-BF16 or AMX), not emulated

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags

    @property
    def avx512_bf16(self) -> bool:
        return "avx512_bf16" in self.flags

    @property
    def amx_bf16(self) -> bool:
        return "amx_bf16" in self.flags and "amx_tile" in self.flags

    @property
    def amx_int8(self) -> bool:
        return "amx_int8" in self.flags and "amx_tile" in self.flags

    @property
    def vnni(self) -> bool:
        """int8 dot products (AVX512-VNNI or AVX-VNNI): what quantised convolutions run on without AMX."""
        return bool({"avx512_vnni", "avx512vnni", "avx_vnni"} & self.flags)

    @property
    def bf16_hardware(self) -> bool:
        """bf16 arithmetic in hardware: without it oneDNN emulates bf16 and it only costs."""
        return self.onednn_bf16 and (self.avx512_bf16 or self.amx_bf16)

    def to_dict(self) -> dict[str, Any]:
        return {"avx512f": self.avx512, "avx512_bf16": self.avx512_bf16, "amx_bf16": self.amx_bf16,
                "amx_int8": self.amx_int8, "vnni": self.vnni, "torch_capability": self.torch_capability,
                "onednn_bf16": self.onednn_bf16}

    def summary(self) -> str:
        named = [name for name, present in (("avx512f", self.avx512), ("avx512_bf16", self.avx512_bf16),
                                            ("amx_bf16", self.amx_bf16), ("amx_int8", self.amx_int8),
                                            ("vnni", self.vnni)) if present]
        return (f"CPU features: {', '.join(named) or 'none of avx512f/avx512_bf16/amx/vnni'}; torch kernels "
                f"{self.torch_capability}, oneDNN bf16 {'native' if self.onednn_bf16 else 'emulated or absent'}")


def _onednn_bf16() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=1)
def detect_cpu_features() -> CpuFeatures:
    """This machine's features (read once per process)."""
    try:
        flags = read_cpu_flags(CPUINFO.read_text())
    except OSError:  # not Linux: torch's capability alone
        flags = frozenset()
    return CpuFeatures(flags, torch.backends.cpu.get_cpu_capability(), _onednn_bf16())
