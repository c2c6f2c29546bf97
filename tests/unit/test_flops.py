"""MFU arithmetic (lbr_ray.train.flops) on a hand-computed case, the pair count against the dense mask, and the
telemetry's TFLOP/s and MFU."""
from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist

from lbr_ray.layout import B, PAD, SINK, X, Y
from lbr_ray.losses.distributed import all_reduce_sum, collective_device
from lbr_ray.model.masks import visibility
from lbr_ray.train.flops import FlopCounter, attention_pairs, cpu_peak_flops, device_peak_flops
from lbr_ray.train.telemetry import Telemetry


def test_attention_pairs_hand_computed():
    seg = torch.tensor([[SINK, X, X, B, Y, Y, PAD]])
    # sink 1, x1 2, x2 3, b 4 (causal); y1 sees sink, b, itself = 3; y2 sees sink, b, y1, itself = 4
    assert int(attention_pairs(seg)) == 1 + 2 + 3 + 4 + 3 + 4
    assert int(attention_pairs(seg, sink=False)) == 17 - 2
    assert int(attention_pairs(seg, ib=False)) == 1 + 2 + 3 + 4 + 5 + 6
    packed = torch.tensor([[SINK, X, B, Y, SINK, X, X, B, Y, Y, PAD, PAD]])  # two units: 1+2+3+3 and 17
    assert int(attention_pairs(packed)) == 9 + 17


@pytest.mark.parametrize("ib,sink", [(True, True), (True, False), (False, True)])
def test_attention_pairs_equal_the_dense_mask(ib, sink):
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(6):
        row = []
        while len(row) < 40:
            n, k, m = (int(v) for v in torch.randint(1, 6, (3,), generator=g))
            row += [SINK] + [X] * n + [B] * k + [Y] * m
        rows.append(row[:40] + [PAD] * int(torch.randint(0, 5, (1,), generator=g)))
    width = max(map(len, rows))
    seg = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    allow = visibility(seg, ib=ib, sink=sink) & (seg != PAD)[:, :, None]
    assert int(attention_pairs(seg, ib=ib, sink=sink)) == int(allow.sum())


def _toy_model(layers=2, heads=2, head_dim=4, hidden=8, vocab=10):
    """A stand-in with the attributes FlopCounter reads: 100 body weights + a 10x8 embedding, a 10x8 head."""
    cfg = types.SimpleNamespace(num_attention_heads=heads, head_dim=head_dim, hidden_size=hidden,
                                num_hidden_layers=layers)
    emb = torch.nn.Embedding(vocab, hidden)
    decoder = torch.nn.Module()
    decoder.emb, decoder.body = emb, torch.nn.Linear(10, 10)  # 100 + 10 bias = 110 body parameters
    decoder.get_input_embeddings = lambda: emb
    lm = types.SimpleNamespace(config=cfg)
    return types.SimpleNamespace(lm=lm, decoder=decoder, lm_head=torch.nn.Linear(hidden, vocab, bias=False), sink=True)


def test_training_flops_hand_computed():
    counter = FlopCounter(_toy_model())
    assert (counter.n_body, counter.n_head, counter.layers, counter.d_attn) == (110, 80, 2, 8)
    seg = torch.tensor([[SINK, X, X, B, Y, Y, PAD]])
    # 6 tokens x 6 x 110 + 2 scored rows x 6 x 80 + 17 pairs x 12 x 2 layers x 8
    assert float(counter.flops(seg, torch.tensor(2), ib=True)) == 6 * 6 * 110 + 2 * 6 * 80 + 17 * 12 * 2 * 8


def test_frozen_weights_need_no_weight_gradient():
    """Under LoRA the base weights are frozen: backward computes their input gradients (2 per weight and token)
    but no weight gradients, so they cost 4, the trainable ones 6 (a 6-for-all count overstated MFU by ~1.5x)."""
    model = _toy_model()
    model.decoder.body.weight.requires_grad_(False)  # 100 frozen, the 10 bias entries train
    model.lm_head.weight.requires_grad_(False)
    counter = FlopCounter(model)
    assert (counter.n_body, counter.t_body, counter.t_head) == (110, 10, 0)
    seg = torch.tensor([[SINK, X, X, B, Y, Y, PAD]])
    expected = 6 * (4 * 110 + 2 * 10) + 2 * 4 * 80 + 17 * 12 * 2 * 8
    assert float(counter.flops(seg, torch.tensor(2), ib=True)) == expected


def test_telemetry_reports_tflops_and_mfu(monkeypatch):
    clock = iter([100.0, 102.0, 102.0])  # the window starts at 100 s and is flushed at 102 s
    monkeypatch.setattr("lbr_ray.train.telemetry.time.perf_counter", lambda: next(clock))
    tel = Telemetry("ib_gl", 10, rank=1, tb_dir=None, peak_flops=4e12)
    for _ in range(2):
        tel.add({"loss": torch.tensor(1.0), "flops": torch.tensor(2e12, dtype=torch.float64)}, tokens=100)
    m = tel.flush(step=2, lr=1e-3, world=1)
    assert m["tflops"] == pytest.approx(2.0)  # 4e12 FLOPs in 2 s
    assert m["mfu"] == pytest.approx(0.5) and m["tokens_per_s"] == pytest.approx(100.0)


def test_collectives_run_on_the_gpu_under_nccl(monkeypatch):
    """Ray Train's GPU workers join an NCCL group, which refuses CPU tensors: the telemetry's sum over ranks must
    reduce on the worker's GPU (it reduced a CPU tensor, which fails under NCCL)."""
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    assert collective_device() == torch.device("cpu")


def test_telemetry_sums_over_ranks_in_a_process_group(tmp_path, monkeypatch):
    """The sum over ranks goes through all_reduce_sum (the reduction on collective_device()), not a bare
    dist.all_reduce of the CPU tensor."""
    from lbr_ray.train import telemetry

    reduced = []
    monkeypatch.setattr(telemetry, "all_reduce_sum", lambda x: reduced.append(x) or all_reduce_sum(x))
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        tel = Telemetry("ib_gl", 10, rank=0, tb_dir=None, bar=False)
        tel.add({"loss": torch.tensor(2.0), "flops": torch.tensor(1e12, dtype=torch.float64)}, tokens=10)
        m = tel.flush(step=1, lr=1e-3, world=1)
        assert m["loss"] == 2.0 and m["tflops"] > 0 and len(reduced) == 1
    finally:
        dist.destroy_process_group()


def test_telemetry_reports_peak_gpu_memory(monkeypatch):
    tel = Telemetry("ib_gl", 10, rank=1, tb_dir=None)
    tel.add({"loss": torch.tensor(1.0)}, tokens=1)
    assert "peak_mem_gib" not in tel.flush(step=1, lr=1e-3, world=1) or torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 3 * 2**30)
    tel.add({"loss": torch.tensor(1.0)}, tokens=1)
    assert tel.flush(step=2, lr=1e-3, world=1)["peak_mem_gib"] == 3.0


def test_device_peak():
    assert device_peak_flops("cpu", override_tflops=2.5) == 2.5e12
    peak = cpu_peak_flops(2)
    assert peak is None or 1e9 < peak < 1e13  # 2 cores: GFLOP/s to a few TFLOP/s


@pytest.mark.parametrize("flags, family, fp32, bf16", [
    ({"avx2", "fma", "avx512f", "avx512_bf16"}, 0x19, 32e9, 64e9),  # AMD Zen 4: AVX-512 on 256-bit units
    ({"avx2", "fma", "avx512f"}, 6, 64e9, 64e9),  # Intel, two 512-bit FMA units, no bf16 instructions
    ({"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"}, 6, 64e9, 1024e9),  # Intel with AMX
    ({"avx2", "fma"}, 6, 32e9, 32e9),
])
def test_cpu_peak_datasheet_figures(monkeypatch, flags, family, fp32, bf16):
    """cores x clock x FLOPs per cycle, hand-computed for 1 core at 1 GHz (the measured floor set to 0)."""
    from lbr_ray.train import flops

    monkeypatch.setattr(flops, "cpu_info", lambda: (flags, family, 1000.0))
    monkeypatch.setattr(flops, "matmul_flops_per_core", lambda dtype: 0.0)
    assert flops.cpu_peak_flops(1) == fp32 and flops.cpu_peak_flops(1, torch.bfloat16) == bf16


def test_cpu_peak_is_never_below_a_measured_matmul(monkeypatch):
    """A VM's nominal clock can sit below the boost clock: the peak is at least what a core measures."""
    from lbr_ray.train import flops

    monkeypatch.setattr(flops, "cpu_info", lambda: ({"avx2", "fma"}, 6, 1.0))  # a 1 MHz "clock"
    for dtype in (torch.float32, torch.bfloat16):
        measured = flops.matmul_flops_per_core(dtype)
        assert measured > 1e9 and flops.cpu_peak_flops(2, dtype) == 2 * measured


@pytest.mark.parametrize("overrides, dtype, peak", [
    (["deepspeed.bf16=true", "model.dtype=float32"], "bfloat16", 989e12),
    (["deepspeed.bf16=false", "model.dtype=float32"], "float32", 67e12),
    (["deepspeed.bf16=false", "model.dtype=bfloat16"], "bfloat16", 989e12),
])
def test_mfu_peak_and_plan_follow_the_compute_dtype(monkeypatch, tmp_path, overrides, dtype, peak):
    """Issue 21.6: MFU's peak followed model.dtype alone, so DeepSpeed bf16 with an fp32 model.dtype was measured
    against an H100's fp32 peak (67 TFLOP/s, not 989: MFU 14.8x too high); lbr plan already counted bf16 there."""
    from lbr_ray.config import load_config
    from lbr_ray.config.load import compute_dtype
    from lbr_ray.plan import Shape, plan_stage
    from lbr_ray.train.checkpoint import LoopState
    from lbr_ray.train.worker import WorkerRun

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    cfg = load_config("configs/demo.yaml", overrides)
    assert compute_dtype(cfg) == dtype
    run = WorkerRun.__new__(WorkerRun)  # what telemetry() reads of a worker
    run.cfg, run.stage, run.stage_dir, run.stage_uri, run.rank, run.t0, run.quiet, run.marks = (
        cfg, "ib_gl", tmp_path, None, 1, None, True, {})
    assert run.telemetry(10, LoopState()).peak_flops == pytest.approx(peak)
    s = Shape(params=1000, trainable=1000, hidden=8, kv=8, inter=8, layers=1, vocab=10)
    assert plan_stage(cfg, s, "ib_gl", 1).parts["weights"] == 1000 * (4 if dtype == "float32" else 2)
