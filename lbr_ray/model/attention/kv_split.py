"""KV-split backend: run `[sink x b]` causally, keep only the sink and bottleneck keys/values, then run `[y]`
over that small cache. The target never computes scores against the input, and the first pass can use any
causal kernel (FlashAttention, SDPA is_causal).
"""
from __future__ import annotations

import contextlib
import inspect

import torch
from transformers import DynamicCache

from lbr_ray.layout import B, PAD, SINK, Y


def _kept_index(seg: torch.Tensor, sink: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the positions whose KV the target may read: [B, K] indices and [B, K] validity."""
    keep = (seg == B) | ((seg == SINK) & sink)  # [B, T1]
    count = keep.sum(1)
    width = int(count.max())
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]  # kept positions first
    valid = torch.arange(width, device=seg.device)[None] < count[:, None]
    return order, valid


def kv_split_hidden(decoder, ids, seg, ib: bool = True, sink: bool = True):
    if not ib or not (seg == Y).any():
        from lbr_ray.model.attention.dense import dense_hidden

        return dense_hidden(decoder, ids, seg, ib, sink)
    if bool(((seg == SINK).sum(1) > 1).any()):
        raise ValueError("kv_split cannot run packed rows (several units in one row); use attn_backend dense or "
                         "flex, or ib_gl.pack: false")
    prefix = (seg != PAD) & (seg != Y)  # [B, T]
    plen = prefix.sum(1)  # [B] = 1 + n + k
    t1 = int(plen.max())
    cache_arg = _cache_kwarg(decoder)
    captured = _CaptureKV()
    with _checkpointed_layers_keep_cache(decoder):
        out1 = decoder(input_ids=ids[:, :t1], attention_mask=prefix[:, :t1].long(), use_cache=False,
                       **{cache_arg: captured})
        if len(captured.kv) == 0:
            raise RuntimeError("kv_split: the model's layers dropped the key/value cache (gradient checkpointing in "
                               "this transformers version); use attn_backend dense or flex")
        kept, valid = _kept_index(seg[:, :t1], sink)  # [B, K]
        prefix_kv = {}
        for layer, (k, v) in captured.kv.items():
            idx = kept[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])  # [B, heads, K, d]
            prefix_kv[layer] = (k.gather(2, idx), v.gather(2, idx))

        is_y = seg == Y
        ylen = is_y.sum(1)
        t2 = int(ylen.max())
        y_order = torch.sort((~is_y).to(torch.int8), dim=1, stable=True).indices[:, :t2]  # y positions, left-aligned
        y_valid = torch.arange(t2, device=seg.device)[None] < ylen[:, None]  # [B, T2]
        ids2 = ids.gather(1, y_order)
        pos2 = plen[:, None] + torch.arange(t2, device=seg.device)[None]
        causal = torch.ones(t2, t2, dtype=torch.bool, device=seg.device).tril()
        # [B, T2, K + T2]: every y row sees the kept sink/bottleneck keys and earlier targets (pad rows too)
        allow = torch.cat([valid[:, None, :].expand(-1, t2, -1), causal[None] & y_valid[:, None, :]], dim=2)
        dtype = decoder.get_input_embeddings().weight.dtype
        mask = torch.zeros(allow.shape, dtype=dtype, device=seg.device).masked_fill(~allow, torch.finfo(dtype).min)
        out2 = decoder(input_ids=ids2, attention_mask=mask[:, None], position_ids=pos2, use_cache=False,
                       **{cache_arg: _PrefixKV(prefix_kv)})

    hidden = torch.zeros(*ids.shape, out1.last_hidden_state.shape[-1], dtype=out1.last_hidden_state.dtype,
                         device=ids.device)
    hidden[:, :t1] = out1.last_hidden_state * prefix[:, :t1, None]
    scatter = y_order[:, :, None].expand(-1, -1, hidden.shape[-1])
    return hidden.scatter_add(1, scatter, out2.last_hidden_state * y_valid[:, :, None])


class _CaptureKV(DynamicCache):
    """Pass 1: records each layer's keys/values once and never appends, so a gradient-checkpointing replay of a
    layer (in backward) computes exactly what the first run did."""

    def __init__(self):
        super().__init__()
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.kv.setdefault(layer_idx, (key_states, value_states))
        return key_states, value_states


class _PrefixKV(DynamicCache):
    """Pass 2: read-only kept sink/bottleneck keys/values; each layer's targets attend to [kept; their own]."""

    def __init__(self, kv: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.kv = kv

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.kv[layer_idx]
        return torch.cat([k, key_states], dim=2), torch.cat([v, value_states], dim=2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv[layer_idx][0].shape[2]


@contextlib.contextmanager
def _checkpointed_layers_keep_cache(decoder):
    """transformers drops the cache of gradient-checkpointed layers in training (a replay would append twice);
    neither cache above appends, so the layers may keep it. Needs non-reentrant checkpointing (the transformers
    default and what BottleneckLM.build enables): reentrant checkpointing runs the forward without autograd, so the
    captured keys/values would carry no gradient."""
    layers = [m for m in decoder.modules() if hasattr(m, "_can_checkpoint_with_cache")]
    old = [m.__dict__.get("_can_checkpoint_with_cache") for m in layers]
    for m in layers:
        m._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for m, value in zip(layers, old):
            if value is None:
                del m._can_checkpoint_with_cache
            else:
                m._can_checkpoint_with_cache = value


def _cache_kwarg(decoder) -> str:
    """transformers >= 5.x names the cache argument `cache`; older releases `past_key_values`."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
