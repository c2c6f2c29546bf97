"""What this machine's processor can do fast (no Ray): CPU flags and clock, bf16 support."""
from __future__ import annotations

import re
from pathlib import Path

import torch


def cpu_info() -> tuple[set[str], int, float | None] | None:
    """(CPU flags, family, max clock in MHz or None) from /proc/cpuinfo and cpufreq; None off Linux."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = set(re.search(r"^flags\s*:(.*)$", info, re.M).group(1).split()) if "flags" in info else set()
    family = re.search(r"^cpu family\s*:\s*(\d+)", info, re.M)
    max_freq = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if max_freq.exists():
        mhz = int(max_freq.read_text()) / 1000
    else:
        found = re.findall(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M)
        mhz = max(map(float, found)) if found else None
    return flags, int(family.group(1)) if family else 0, mhz


def bf16_is_fast(device: torch.device | str | None = None) -> bool:
    """bf16 matmuls run faster than fp32 here: a CUDA GPU with bf16, or a CPU with AVX512_BF16 or AMX (measured
    on an AMD Zen 4 core: 2.2x fp32's matmul rate, benchmarks/results/cpu_speed.json)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    info = cpu_info()
    return info is not None and bool({"avx512_bf16", "amx_bf16"} & info[0])


def encode_dtype(choice: str, device: torch.device | str | None = None) -> str:
    """An encoding dtype option (auto | float32 | bfloat16) as a dtype: auto = bfloat16 where it is fast."""
    if choice != "auto":
        return choice
    return "bfloat16" if bf16_is_fast(device) else "float32"


def encode_batch_size(gpu: bool) -> int:
    """Texts per forward pass when embedding: 16 on a CPU (SmolLM2 in bf16 embedded 19.7 passages per CPU second at
    16, 18.5 at 32, 13.6 at 64: benchmarks/results/cpu_speed.json), 64 on a GPU."""
    return 64 if gpu else 16
