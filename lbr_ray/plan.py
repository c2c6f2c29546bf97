"""`lbr plan`: per-GPU memory and tokens per step of a config, before anything launches (no Ray, no weights).

Parameters are counted on the meta device (the real architecture, no memory); the rest is arithmetic.
"""
from __future__ import annotations

from lbr_ray.config import LbrConfig


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
