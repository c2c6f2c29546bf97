"""Token layouts of LBR (no Ray): `[sink][x][b_1..b_k][y]` for IB-GL, `[sink][x][b_1..b_k]` for embedding.

Every row is a pair of int lists (ids, seg) with the segment ids of lbr_ray.model.masks; padding happens in
collate.py. k = clamp(ceil(n_input_tokens / R), k_min, k_max), or the fixed k of the config.
"""
from __future__ import annotations

import math

from lbr_ray.config.schema import BottleneckConfig
from lbr_ray.model.masks import B, SINK, X, Y

BOTTLENECK_TOKEN = "<|lbr_b{}|>"


def bottleneck_tokens(k_max: int) -> list[str]:
    return [BOTTLENECK_TOKEN.format(i) for i in range(1, k_max + 1)]


def add_bottleneck_tokens(tokenizer, k_max: int) -> list[int]:
    """Add the k_max bottleneck tokens (idempotent: a saved lbr-ray tokenizer keeps its ids); return their ids."""
    tokens = bottleneck_tokens(k_max)
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(tokens)


def sink_token_id(tokenizer) -> int:
    """Position-0 token every row starts with: BOS, else EOS (e.g. Qwen2 has no BOS), else PAD."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if tid is not None:
            return tid
    raise ValueError("the tokenizer has no BOS, EOS or PAD token to use as the sink token")


def num_bottleneck(n_input_tokens: int, cfg: BottleneckConfig) -> int:
    if cfg.k is not None:
        return cfg.k
    return max(cfg.k_min, min(cfg.k_max, math.ceil(n_input_tokens / cfg.ratio)))


class SequenceBuilder:
    """Turns texts into LBR rows for one tokenizer and bottleneck config."""

    def __init__(self, tokenizer, bottleneck: BottleneckConfig, max_input_tokens: int, max_target_tokens: int):
        self.tokenizer = tokenizer
        self.cfg = bottleneck
        self.max_input, self.max_target = max_input_tokens, max_target_tokens
        self.b_ids = add_bottleneck_tokens(tokenizer, bottleneck.k_max)
        self.sink = sink_token_id(tokenizer)

    def encode(self, texts: list[str], limit: int) -> list[list[int]]:
        enc = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=limit)
        return enc["input_ids"]

    def _prefix(self, x: list[int]) -> tuple[list[int], list[int]]:
        k = num_bottleneck(len(x), self.cfg)
        return [self.sink, *x, *self.b_ids[:k]], [SINK] + [X] * len(x) + [B] * k

    def embed_row(self, x: list[int]) -> tuple[list[int], list[int]]:
        """`[sink][x][b]`: read with the plain causal mask; the embedding is the last (or mean) b state."""
        return self._prefix(x)

    def ib_row(self, x: list[int], y: list[int]) -> tuple[list[int], list[int]]:
        ids, seg = self._prefix(x)
        return ids + y, seg + [Y] * len(y)

    def lm_row(self, x: list[int]) -> tuple[list[int], list[int]]:
        """`[sink][x]` for plain causal LM training (gl-cl ablation: no bottleneck, no target)."""
        return [self.sink, *x], [SINK] + [X] * len(x)

    def stage1_rows(self, texts: list[str], target: str, ib: bool) -> list[tuple[list[int], list[int]]]:
        """IB-GL rows for `self` or `continuation` targets (pairs use pair_rows)."""
        if not ib:
            return [self.lm_row(x) for x in self.encode(texts, self.max_input)]
        if target == "self":
            toks = self.encode(texts, max(self.max_input, self.max_target))
            return [self.ib_row(t[: self.max_input], t[: self.max_target]) for t in toks]
        toks = self.encode(texts, self.max_input + self.max_target)
        rows = []
        for t in toks:  # continuation: x = first half (<= max_input), y = the rest (<= max_target)
            cut = min(self.max_input, max(1, len(t) // 2))
            rows.append(self.ib_row(t[:cut], t[cut: cut + self.max_target] or t[-1:]))
        return rows

    def pair_rows(self, queries: list[str], positives: list[str], ib: bool = True):
        qs, ps = self.encode(queries, self.max_input), self.encode(positives, self.max_target)
        if not ib:  # plain LM over "query positive"
            return [self.lm_row((q + p)[: self.max_input + self.max_target]) for q, p in zip(qs, ps)]
        return [self.ib_row(q, p) for q, p in zip(qs, ps)]

    def embed_rows(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        return [self.embed_row(x) for x in self.encode(texts, self.max_input)]
