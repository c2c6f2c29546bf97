"""Model FLOPs of a training step and the device's peak, for model FLOPs utilisation (MFU) in the step telemetry.

Training FLOPs of a micro-batch (forward 2 per weight and token; backward 2 for the input gradient of every
weight, 2 more for the weight gradient of a trainable one: 6 per weight in full fine-tuning, the standard
accounting, about 4 under LoRA, whose frozen weights need no weight gradient):
    (4 N_body + 2 T_body) * tokens every non-padding token through the transformer body (N_body = its weights, T_body
                                   the trainable ones, LoRA's included; input embedding excluded: a lookup)
  + (4 N_head + 2 T_head) * head_rows  the LM head, only on the positions the loss scores (lbr's loss skips the rest)
  + 12 * layers * d_attn * pairs   QK^T and AV (2 + 2 FLOPs per multiply-add, per query-head dim) for every
                                   (query, key) pair the actual mask allows: causal, within the unit (packed rows),
                                   minus target -> input under the IB mask; d_attn = query heads * head dim
MFU = achieved FLOP/s per device / the device's peak (`scaling.peak_tflops`, else a table of GPUs, else the CPU's
peak from cores x clock x SIMD FLOPs per cycle, never below a measured matmul: `cpu_peak_flops`).
"""
from __future__ import annotations

import functools
import os
import time

import torch

from lbr_ray.hardware import cpu_info
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
        emb = decoder.get_input_embeddings()
        in_emb = {id(p) for p in emb.parameters()}
        body = [p for p in decoder.parameters() if id(p) not in in_emb]
        self.n_body, self.t_body = sum(p.numel() for p in body), sum(p.numel() for p in body if p.requires_grad)
        self.n_head = head.weight.numel()
        self.t_head = self.n_head if head.weight.requires_grad else 0
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        self.layers, self.d_attn = cfg.num_hidden_layers, heads * head_dim
        self.sink = getattr(model, "sink", True)

    def flops(self, seg: torch.Tensor, head_rows, ib: bool) -> torch.Tensor:
        """Training FLOPs of one micro-batch of rows `seg` (a tensor: no host sync)."""
        tokens = (seg != PAD).sum()
        pairs = attention_pairs(seg, ib=ib, sink=self.sink)
        return ((4.0 * self.n_body + 2.0 * self.t_body) * tokens + (4.0 * self.n_head + 2.0 * self.t_head) * head_rows
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
    """Peak FLOP/s of `cores` CPU cores: the larger of the datasheet figure and a measured one.

    Datasheet: cores x clock x FLOPs per cycle per core. fp32: 2 FMA units x SIMD lanes x 2 (an FMA is 2 FLOPs):
    64 with AVX-512 on two 512-bit units (Intel server cores), 32 with AVX2 + FMA or with AVX-512 on AMD Zen 4,
    which runs it on 256-bit units (family 0x19); bf16 doubles that with AVX512_BF16 (VDPBF16PS: two products
    per fp32 lane), AMX does 1,024. A virtual machine often shows only the nominal clock (/proc/cpuinfo), below
    the boost clock the cores run at, so the figure can be low: the peak is never below what one core measures on a
    large matmul in this dtype (`matmul_flops_per_core`), times `cores`, so MFU stays at most 100 %."""
    info = cpu_info()
    if info is None:
        return None
    flags, family, mhz = info
    per_cycle = 32 if {"avx2", "fma"} <= flags or "avx512f" in flags else 8
    if "avx512f" in flags and family != 0x19:
        per_cycle = 64
    if dtype in (torch.bfloat16, torch.float16):
        per_cycle = 1024 if "amx_bf16" in flags else 2 * per_cycle if "avx512_bf16" in flags else per_cycle
    cores = min(cores, os.cpu_count() or cores)
    datasheet = cores * mhz * 1e6 * per_cycle if mhz else 0.0
    return max(datasheet, cores * matmul_flops_per_core(dtype)) or None


@functools.lru_cache(maxsize=None)
def matmul_flops_per_core(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of one core on an n x n matmul in `dtype`, best of `repeats` (about 0.1 s): matmul FLOPs per CPU
    second of this process, so other jobs on the machine do not lower it."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a @ b  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.process_time()
            a @ b
            best = min(best, time.process_time() - t0)
    finally:
        torch.set_num_threads(threads)
    return 2 * n**3 / max(best, 1e-9)
