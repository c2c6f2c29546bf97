"""bf16 compute on CPUs that run it fast: detection from the CPU flags, and a LoRA model trained in bf16 (DeepSpeed
casts the module) exported without rounding its updates away."""
from __future__ import annotations

import pytest
import torch

from lbr_ray.config.schema import BottleneckConfig, ModelConfig
from lbr_ray.model.bottleneck import BottleneckLM, merged_lm


@pytest.mark.parametrize("flags, fast", [({"avx512f", "avx512_bf16"}, True), ({"amx_bf16"}, True),
                                         ({"avx512f", "avx2", "fma"}, False)])
def test_bf16_is_fast_on_cpus_with_bf16_instructions(monkeypatch, flags, fast):
    from lbr_ray import hardware

    monkeypatch.setattr(hardware, "cpu_info", lambda: (flags, 0x19, 2600.0))
    assert hardware.bf16_is_fast("cpu") is fast


def test_lora_trained_in_bf16_merges_in_float32():
    """A LoRA update far below bf16's resolution at the weight's size survives the export; a bf16 merge loses it."""
    model, _ = BottleneckLM.build(ModelConfig(from_scratch=True, lora=True), BottleneckConfig(k_max=2))
    model = model.to(torch.bfloat16)  # what deepspeed.bf16 does to the module
    layer = model.lm.get_base_model().model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(1e-3)
        layer.lora_A["default"].weight.fill_(1e-3)
    base = layer.base_layer.weight.detach().float().clone()
    delta = (layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float()) * layer.scaling["default"]
    assert delta.abs().max() < 1e-4 < base.abs().mean() / 2**7  # below bf16's spacing at the weights' size
    merged = merged_lm(model, "float32").model.layers[0].self_attn.q_proj.weight
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged - base, delta, rtol=0, atol=1e-7)
    in_bf16 = model.lm.get_base_model().model.layers[0].self_attn.q_proj  # the live model is untouched
    assert in_bf16.base_layer.weight.dtype == torch.bfloat16 and hasattr(model.lm, "merge_and_unload")
    kept = (base.bfloat16() + delta.bfloat16()).float() - base  # what a merge in bf16 keeps of the update
    assert (kept - delta).abs().mean() > 0.5 * delta.abs().mean()  # most of it rounded away
