"""Three interchangeable ways to run the IB mask; all return final hidden states [B, T, H].

dense    : 4-D additive mask through HF eager/SDPA (the reference, O(T^2) memory)
flex     : FlexAttention BlockMask (skips fully blocked tiles); needs attn_implementation="flex_attention"
kv_split : `[sink x b]` causally, keep only sink + bottleneck KV, then `[y]` over that cache (any causal kernel)
"""
from __future__ import annotations

from lbr_ray.model.attention.dense import dense_hidden
from lbr_ray.model.attention.flex import flex_hidden
from lbr_ray.model.attention.kv_split import kv_split_hidden

BACKENDS = {"dense": dense_hidden, "flex": flex_hidden, "kv_split": kv_split_hidden}
ATTN_IMPLEMENTATION = {"dense": "sdpa", "flex": "flex_attention", "kv_split": "sdpa"}


def get_backend(name: str):
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name]


__all__ = ["get_backend", "BACKENDS", "ATTN_IMPLEMENTATION", "dense_hidden", "flex_hidden", "kv_split_hidden"]
