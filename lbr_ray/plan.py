"""`lbr plan`: per-GPU memory and tokens per step of a config, before anything launches (no Ray, no weights).

Parameters are counted on the meta device (the real architecture, no memory); the rest is arithmetic:

- model states (ZeRO paper, Rajbhandari et al. 2020), per worker with N workers: weights W*P (ZeRO-3: /N),
  gradients W*T (ZeRO-2/3: /N), optimizer states K*T (ZeRO-1/2/3: /N; 0 on the GPU with optimizer offload), where
  P = all parameters, T = trainable ones (LoRA: adapters + bottleneck rows), W = bytes per weight, K = 12 with a
  bf16/fp16 model (fp32 master copy + two Adam moments) and 8 in fp32;
- activations saved for backward: ACT_PER_TOKEN_LAYER(h, kv, f) elements per token and layer (norm inputs,
  q/k/v, attention and MLP inputs/outputs; attention scores are not stored: SDPA / FlexAttention kernels), times
  the micro-batch's tokens; with gradient checkpointing, one hidden state per layer plus one layer's worth;
- the LM-head logits of the scored positions (IB-GL: target tokens only): logits in the model's dtype, their fp32
  copy and its gradient;
- GR-CL's contrastive loss: the similarity logits of the batch's queries against every gathered candidate (fp32,
  with their softmax and gradient) and the embeddings with their gradients. With GradCache (gr_cl.cache_chunk) the
  activations and IB-loss logits are those of one chunk of cache_chunk rows, the contrastive part stays the batch's,
  and under ZeRO-2/3 each worker holds the whole gradient until the step's one reduction (docs/gradcache.md);
- on GPUs, CUDA_RUNTIME for the CUDA context and workspaces.

The two constants (15h of the activation count, CUDA_RUNTIME) were fitted to the H100 rows at 517 and 1029
tokens per row; the 2053-token row, the AdamW step and the CPU demo are held out.

benchmarks/plan_check.py compares the estimate with measured peaks (H100 rows of attention_gpu.json; the demo on
CPU) and docs/plan.md gives the errors.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from lbr_ray.config import LbrConfig

GIB = 1 << 30
RESERVE = 0.10  # allocator fragmentation, NCCL buffers: the plan must fit in 90% of the GPU
CUDA_RUNTIME = 1 << 30  # CUDA context + cuBLAS workspaces, counted once per GPU worker


def count_params(cfg: LbrConfig, model_config) -> tuple[int, int]:
    """(all parameters incl. the k_max new bottleneck rows, trainable ones: everything, or LoRA + those rows)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(model_config)
    total = sum(p.numel() for p in lm.parameters())
    emb = lm.get_input_embeddings().weight
    hidden = emb.shape[1]
    tied = lm.get_output_embeddings() is None or lm.get_output_embeddings().weight is emb
    new_rows = cfg.bottleneck.k_max * hidden * (1 if tied else 2)
    total += new_rows
    if not cfg.model.lora:
        return total, total
    lora = 0
    for module in lm.modules():
        if isinstance(module, torch.nn.Linear) and module is not lm.get_output_embeddings():
            lora += cfg.model.lora_r * (module.in_features + module.out_features)
    return total, lora + new_rows


def act_per_token_layer(h: int, kv: int, f: int) -> int:
    """Activation elements saved per token and decoder layer (Llama/Qwen-style block, gated MLP)."""
    return 15 * h + 2 * kv + 4 * f


@dataclass
class Shape:
    """What the estimate needs of a model: parameter counts and the decoder's widths."""
    params: int
    trainable: int
    hidden: int
    kv: int  # key/value width (heads_kv * head_dim)
    inter: int
    layers: int
    vocab: int

    @classmethod
    def of(cls, cfg: LbrConfig, model_config) -> "Shape":
        params, trainable = count_params(cfg, model_config)
        h = model_config.hidden_size
        heads = model_config.num_attention_heads
        head_dim = getattr(model_config, "head_dim", None) or h // heads
        kv = getattr(model_config, "num_key_value_heads", heads) * head_dim
        return cls(params, trainable, h, kv, model_config.intermediate_size, model_config.num_hidden_layers,
                   model_config.vocab_size + cfg.bottleneck.k_max)


def model_state_bytes(s: Shape, weight_bytes: int, mixed: bool, zero: int, workers: int,
                      offload: bool = False) -> dict[str, float]:
    n = max(1, workers)
    k = 12 if mixed else 8
    return {"weights": s.params * weight_bytes / (n if zero >= 3 else 1),
            "gradients": s.trainable * weight_bytes / (n if zero >= 2 else 1),
            "optimizer": 0.0 if offload and zero >= 1 else s.trainable * k / (n if zero >= 1 else 1)}


def activation_bytes(s: Shape, tokens: int, scored: int, act_bytes: int, checkpointing: bool) -> dict[str, float]:
    """Saved activations of a micro-batch of `tokens` tokens, and the logits of its `scored` positions."""
    per_layer = act_per_token_layer(s.hidden, s.kv, s.inter) * tokens * act_bytes
    if checkpointing:
        acts = s.layers * tokens * s.hidden * act_bytes + per_layer
    else:
        acts = s.layers * per_layer
    return {"activations": float(acts), "logits": float(scored) * s.vocab * (act_bytes + 4 + 4)}


@dataclass
class Plan:
    stage: str
    workers: int
    parts: dict[str, float]
    tokens_per_step: int
    gpu_bytes: float | None = None
    advice: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_bytes is None else self.total <= self.gpu_bytes * (1 - RESERVE)

    def lines(self) -> list[str]:
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.parts.items())
        head = f"{self.stage}: {self.total / GIB:.2f} GiB per worker ({parts} GiB); {self.tokens_per_step} tokens/step"
        if self.fits is None:
            return [head]
        verdict = "fits" if self.fits else "does NOT fit"
        out = [f"{head}; {verdict} in {self.gpu_bytes / GIB:.0f} GiB (keeping {RESERVE:.0%} free)"]
        return out + [f"  - {a}" for a in self.advice]


def stage_rows(cfg: LbrConfig, stage: str) -> tuple[int, int, int]:
    """(rows per micro-batch, tokens per row at the longest, scored positions per micro-batch) of a stage. Packed
    IB-GL rows are `ib_gl.pack_length` long, their targets the longest unit's share of the row."""
    from lbr_ray.config.load import pack_length
    from lbr_ray.layout import max_unit_length

    d, b = cfg.data, cfg.bottleneck
    if stage == "ib_gl":
        unit = max_unit_length(d.max_input_tokens, d.max_target_tokens, b.k_max)
        rows, length = cfg.ib_gl.batch_size, pack_length(cfg) or unit
        return rows, length, rows * round(d.max_target_tokens * length / unit)
    rows = cfg.gr_cl.batch_size * (2 + cfg.gr_cl.hard_negatives)
    length = 1 + d.max_input_tokens + b.k_max
    scored = cfg.gr_cl.batch_size * d.max_target_tokens if cfg.gr_cl.gen_weight > 0 else 0
    if cfg.gr_cl.gen_weight > 0:
        length = max(length, 1 + d.max_input_tokens + b.k_max + d.max_target_tokens)
    return rows, length, scored


def contrastive_bytes(cfg: LbrConfig, s: Shape, workers: int) -> float:
    """GR-CL's loss over the whole batch (GradCache or not): fp32 logits [B, candidates] (+ [B, B * workers] when
    symmetric) with their softmax and gradient, and the embeddings (local rows, gathered candidates) with theirs."""
    g = cfg.gr_cl
    batch, gathered = g.batch_size, g.batch_size * (workers if g.gather else 1)
    candidates = gathered * (1 + g.hard_negatives)
    logits = batch * (candidates + (gathered if g.symmetric else 0))
    embeddings = batch * (2 + g.hard_negatives) + candidates
    return float(4 * 3 * logits + 4 * 2 * embeddings * s.hidden)


def plan_stage(cfg: LbrConfig, s: Shape, stage: str, workers: int, gpu_bytes: float | None = None,
               with_advice: bool = True) -> Plan:
    from lbr_ray.config.load import compute_dtype

    low = compute_dtype(cfg) != "float32"
    width = 2 if low else 4
    ds = cfg.deepspeed
    parts = model_state_bytes(s, width, low, ds.zero_stage, workers, ds.offload_optimizer)
    rows, length, scored = stage_rows(cfg, stage)
    held_rows, held_scored = rows, scored  # rows whose activations are alive at once
    if stage == "gr_cl" and cfg.gr_cl.cache_chunk:  # GradCache: one chunk of one column (or of the IB rows)
        held_rows = min(cfg.gr_cl.cache_chunk, cfg.gr_cl.batch_size)
        held_scored = held_rows * cfg.data.max_target_tokens if scored else 0
    parts.update(activation_bytes(s, held_rows * length, held_scored, width, cfg.model.gradient_checkpointing))
    if stage == "gr_cl":
        parts["contrastive"] = contrastive_bytes(cfg, s, workers)
        if cfg.gr_cl.cache_chunk and ds.zero_stage >= 2:  # the chunks' gradients wait whole for the step's reduction
            parts["gradients"] = s.trainable * width
    if cfg.scaling.use_gpu:
        parts["cuda_runtime"] = float(CUDA_RUNTIME)
    st = getattr(cfg, stage)
    plan = Plan(stage, workers, parts, rows * length * workers * st.grad_accum, gpu_bytes)
    if plan.fits is False and with_advice:
        plan.advice = advice(cfg, s, stage, workers, gpu_bytes)
    return plan


def advice(cfg: LbrConfig, s: Shape, stage: str, workers: int, gpu_bytes: float) -> list[str]:
    """Changes that each make the plan fit on their own (tried one at a time), else the best combination."""
    from lbr_ray.config import replace

    st = getattr(cfg, stage)
    tries = [
        (f"deepspeed.zero_stage=3 (parameters, gradients and optimizer split over {workers} workers)",
         {"deepspeed": {"zero_stage": 3}}),
        ("deepspeed.offload_optimizer=true (optimizer states in CPU memory)",
         {"deepspeed": {"offload_optimizer": True, "zero_stage": max(cfg.deepspeed.zero_stage, 1)}}),
        ("model.gradient_checkpointing=true (recompute activations in backward)",
         {"model": {"gradient_checkpointing": True}}),
        ("model.lora=true (train adapters, not the full model)", {"model": {"lora": True}}),
    ]
    if stage == "gr_cl" and st.grad_accum == 1:  # GradCache keeps the batch, hence the negatives
        sizes = [c for c in (st.batch_size >> i for i in range(1, 12)) if 0 < c < (st.cache_chunk or st.batch_size)]
        fitting = [c for c in sizes if plan_stage(replace(cfg, gr_cl={"cache_chunk": c}), s, stage, workers,
                                                  gpu_bytes, False).fits]
        if fitting:
            tries.append((f"gr_cl.cache_chunk={fitting[0]} (GradCache: the same batch and negatives, the activations "
                          f"of {fitting[0]} rows at a time, about one more forward pass per step)",
                          {"gr_cl": {"cache_chunk": fitting[0]}}))
    if st.batch_size > 1:
        half = max(1, st.batch_size // 2)
        tries.append((f"{stage}.batch_size={half} with {stage}.grad_accum={st.grad_accum * st.batch_size // half} "
                      "(same tokens per step)", {stage: {"batch_size": half, "grad_accum": st.grad_accum * 2}}))
    out = []
    for text, change in tries:
        if plan_stage(replace(cfg, **change), _reshape(cfg, s, change), stage, workers, gpu_bytes, False).fits:
            out.append(text)
    return out or ["no single change fits: combine ZeRO-3, offload, checkpointing and a smaller micro-batch, or use "
                   "GPUs with more memory / more workers"]


def _reshape(cfg: LbrConfig, s: Shape, change: dict) -> Shape:
    if change.get("model", {}).get("lora") and not cfg.model.lora:  # adapters: ~1% trainable, as counted
        lora = 2 * cfg.model.lora_r * (4 * s.hidden + 3 * s.inter) * s.layers
        return Shape(s.params, lora, s.hidden, s.kv, s.inter, s.layers, s.vocab)
    return s


UNITS = {"": GIB, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 1 << 10, "MI": 1 << 20, "GI": 1 << 30,
         "TI": 1 << 40}


def parse_bytes(text: str) -> float:
    """'80GiB', '80GB', '24 GiB', '81920MiB', '80' (GiB) -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]i?)?B?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"not a memory size: {text!r} (e.g. 80GiB)")
    return float(m.group(1)) * UNITS[(m.group(2) or "").upper()]


def plan(cfg: LbrConfig, stages: tuple[str, ...] = ("ib_gl", "gr_cl"), workers: int | None = None,
         gpu_bytes: float | None = None) -> list[Plan]:
    from transformers import AutoConfig

    from lbr_ray.model.bottleneck import resolve_model_path

    from lbr_ray.errors import ConfigError

    try:
        model_config = AutoConfig.from_pretrained(resolve_model_path(cfg.model.name))
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name: cannot load a model config from {cfg.model.name!r} "
                          f"({str(e).splitlines()[0]})") from None
    s = Shape.of(cfg, model_config)
    n = workers or cfg.scaling.num_workers
    return [plan_stage(cfg, s, stage, n, gpu_bytes) for stage in stages]


def resolve_gpu_memory(cfg: LbrConfig, text: str | None = None) -> float | None:
    """--gpu-memory, else scaling.gpu_memory, else this machine's first GPU (when the config uses GPUs), else None."""
    text = text or cfg.scaling.gpu_memory
    if text:
        return parse_bytes(text)
    import torch

    if cfg.scaling.use_gpu and torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(0).total_memory)
    return None


def check_fits(cfg: LbrConfig, stages: tuple[str, ...]) -> None:
    """`lbr train`'s start: refuse, in one line, a plan that cannot fit the GPUs (skipped without GPU memory)."""
    from lbr_ray.errors import ConfigError

    try:
        gpu = resolve_gpu_memory(cfg)
    except ValueError as e:
        raise ConfigError(f"scaling.gpu_memory: {e}") from None
    if gpu is None or not stages:
        return
    for p in plan(cfg, stages, gpu_bytes=gpu):
        if not p.fits:
            fix = "; ".join(p.advice[:2])
            fix = fix if fix.startswith("no single change") else f"try {fix}"
            raise ConfigError(f"{p.stage} needs about {p.total / GIB:.1f} GiB per GPU, more than {gpu / GIB:.0f} GiB "
                              f"x {1 - RESERVE:.0%} (`lbr plan --config ...` for the breakdown); {fix}")
