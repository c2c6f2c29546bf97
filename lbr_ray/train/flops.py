"""Model FLOPs of a training step and the device's peak, for model FLOPs utilisation (MFU) in the step telemetry.

Training FLOPs of a micro-batch (forward + backward = 3 x forward, the standard accounting):
    6 * N_body * tokens            every non-padding token through the transformer body (N_body = its weights,
                                   input embedding excluded: a lookup, not a matmul)
  + 6 * N_head * head_rows         the LM head, only on the positions the loss scores (lbr's loss skips the rest)
  + 12 * layers * d_attn * pairs   QK^T and AV (2 + 2 FLOPs per multiply-add, per query-head dim) for every
                                   (query, key) pair the actual mask allows: causal, within the unit (packed rows),
                                   minus target -> input under the IB mask; d_attn = query heads * head dim
MFU = achieved FLOP/s per device / the device's peak (`scaling.peak_tflops`, else a table of GPUs, else a CPU
estimate from cores x clock x SIMD FLOPs per cycle).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from lbr_ray.layout import PAD, SINK, X, Y

# Dense peak TFLOP/s per GPU (bf16/fp16 tensor cores; fp32 without TF32), from the vendors' datasheets.
GPU_PEAK_TFLOPS = {  # name fragment -> (bf16/fp16, fp32)
    "H200": (989.0, 67.0), "H100 PCIe": (756.0, 51.0), "H100": (989.0, 67.0), "GH200": (989.0, 67.0),
    "B200": (2250.0, 80.0), "A100": (312.0, 19.5), "A10G": (125.0, 31.2), "A10": (125.0, 31.2),
    "L40S": (362.0, 91.6), "L40": (181.0, 90.5), "L4": (121.0, 30.3), "V100": (125.0, 15.7), "T4": (65.0, 8.1),
    "RTX 4090": (165.0, 82.6), "RTX 3090": (71.0, 35.6),
}


def attention_pairs(seg: torch.Tensor, ib: bool = True, sink: bool = True) -> torch.Tensor:
    """Number of allowed (query, key) pairs over non-padding queries, in O(B*T) without building the mask:
    a query sees the keys of its unit up to itself; a target under the IB mask loses its unit's inputs (and the
    sink when `sink` is False). Equals lbr_ray.model.masks.visibility(seg) summed over non-padding queries."""
    idx = torch.arange(seg.shape[1], device=seg.device).expand_as(seg)
    start = torch.where(seg == SINK, idx, torch.zeros_like(idx)).cummax(dim=1).values
    seen = idx - start + 1
    if ib:
        cum_x = torch.cumsum(seg == X, dim=1)
        x_in_unit = cum_x - cum_x.gather(1, start)
        is_y = seg == Y
        seen = seen - is_y * (x_in_unit + (0 if sink else 1))
    return (seen * (seg != PAD)).sum()


class FlopCounter:
    """Per-model constants, taken before DeepSpeed partitions the weights (ZeRO-3 leaves 0-sized shards)."""

    def __init__(self, model):
        cfg = model.lm.config if not hasattr(model.lm, "get_base_model") else model.lm.get_base_model().config
        decoder, head = model.decoder, model.lm_head
        emb = decoder.get_input_embeddings().weight
        self.n_body = sum(p.numel() for p in decoder.parameters()) - emb.numel()
        self.n_head = head.weight.numel()
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        self.layers, self.d_attn = cfg.num_hidden_layers, heads * head_dim
        self.sink = getattr(model, "sink", True)

    def flops(self, seg: torch.Tensor, head_rows, ib: bool) -> torch.Tensor:
        """Training FLOPs of one micro-batch of rows `seg` (a tensor: no host sync)."""
        tokens = (seg != PAD).sum()
        pairs = attention_pairs(seg, ib=ib, sink=self.sink)
        return (6.0 * self.n_body * tokens + 6.0 * self.n_head * head_rows
                + 12.0 * self.layers * self.d_attn * pairs).to(torch.float64)


def device_peak_flops(device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                      override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one training device: the override, a GPU from the table, or a CPU estimate (None if
    unknown)."""
    if override_tflops:
        return override_tflops * 1e12
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, (half, single) in GPU_PEAK_TFLOPS.items():
            if fragment in name:
                return (half if dtype in (torch.bfloat16, torch.float16) else single) * 1e12
        return None
    return cpu_peak_flops(torch.get_num_threads(), dtype)


def cpu_peak_flops(cores: int, dtype: torch.dtype = torch.float32) -> float | None:
    """cores x max clock x FLOPs per cycle per core (2 FMA units x SIMD width x 2; AVX-512: 64 fp32, AVX2: 32)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = set(re.search(r"^flags\s*:(.*)$", info, re.M).group(1).split()) if "flags" in info else set()
    per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 8
    if dtype in (torch.bfloat16, torch.float16) and "amx_bf16" in flags:
        per_cycle = 1024
    mhz = None
    max_freq = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if max_freq.exists():
        mhz = int(max_freq.read_text()) / 1000
    else:
        found = re.findall(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M)
        mhz = max(map(float, found)) if found else None
    if not mhz:
        return None
    return min(cores, os.cpu_count() or cores) * mhz * 1e6 * per_cycle
