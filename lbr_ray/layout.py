"""The row layout of lbr-ray, below both `data/` and `model/` (no Ray): segment ids, the sequence builder, k from R,
packing, padding.

A unit is `[sink][x_1..x_n][b_1..b_k][y_1..y_m]` (IB-GL), `[sink][x][b]` (embedding) or `[sink][x]` (plain causal
LM), described by segment ids SINK=0, X=1, B=2, Y=3 (PAD=-1 on padding). A row holds one unit, or several packed
units (`pack`): every unit starts with its sink token, so the document id of a position is the number of sinks up
to it (`documents`) and position ids restart at each sink (`positions`). The visibility rule
(lbr_ray.model.masks) lets nothing cross a document boundary, so a packed row computes exactly what its units
compute in separate rows. k = clamp(ceil(n_input_tokens / R), k_min, k_max), or the fixed k of the config.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from lbr_ray.config.schema import BottleneckConfig

SINK, X, B, Y, PAD = 0, 1, 2, 3, -1
BOTTLENECK_TOKEN = "<|lbr_b{}|>"

Row = tuple[list[int], list[int]]  # (token ids, segment ids)


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
    """Position-0 token every unit starts with: BOS, else EOS (e.g. Qwen2 has no BOS), else PAD."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if tid is not None:
            return tid
    raise ValueError("the tokenizer has no BOS, EOS or PAD token to use as the sink token")


def num_bottleneck(n_input_tokens: int, cfg: BottleneckConfig) -> int:
    if cfg.k is not None:
        return cfg.k
    return max(cfg.k_min, min(cfg.k_max, math.ceil(n_input_tokens / cfg.ratio)))


def max_unit_length(max_input_tokens: int, max_target_tokens: int, k_max: int) -> int:
    """Longest unit any builder method makes: sink + input + k_max + target."""
    return 1 + max_input_tokens + k_max + max_target_tokens


class SequenceBuilder:
    """Turns texts into LBR units for one tokenizer and bottleneck config."""

    def __init__(self, tokenizer, bottleneck: BottleneckConfig, max_input_tokens: int, max_target_tokens: int):
        self.tokenizer = tokenizer
        self.cfg = bottleneck
        self.max_input, self.max_target = max_input_tokens, max_target_tokens
        self.b_ids = add_bottleneck_tokens(tokenizer, bottleneck.k_max)
        self.sink = sink_token_id(tokenizer)

    def encode(self, texts: list[str], limit: int | None) -> list[list[int]]:
        if limit is None:
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        enc = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=limit)
        return enc["input_ids"]

    def _prefix(self, x: list[int]) -> Row:
        k = num_bottleneck(len(x), self.cfg)
        return [self.sink, *x, *self.b_ids[:k]], [SINK] + [X] * len(x) + [B] * k

    def embed_row(self, x: list[int]) -> Row:
        """`[sink][x][b]`: read with the plain causal mask; the embedding is the last (or mean) b state."""
        return self._prefix(x)

    def ib_row(self, x: list[int], y: list[int]) -> Row:
        ids, seg = self._prefix(x)
        return ids + y, seg + [Y] * len(y)

    def lm_row(self, x: list[int]) -> Row:
        """`[sink][x]` for plain causal LM training (gl-cl ablation: no bottleneck, no target)."""
        return [self.sink, *x], [SINK] + [X] * len(x)

    def lm_document_rows(self, texts: list[str], length: int) -> list[Row]:
        """Plain documents for causal-LM pre-training: each text whole, cut into `[sink][chunk]` units of at most
        `length` tokens (no truncation: the chunks of a long text follow each other). Pack them with `pack`."""
        step = length - 1
        return [self.lm_row(t[i: i + step]) for t in self.encode(texts, None) for i in range(0, max(1, len(t)), step)]

    def stage1_rows(self, texts: list[str], target: str, ib: bool) -> list[Row]:
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

    def pair_rows(self, queries: list[str], positives: list[str], ib: bool = True) -> list[Row]:
        qs, ps = self.encode(queries, self.max_input), self.encode(positives, self.max_target)
        if not ib:  # plain LM over "query positive"
            return [self.lm_row((q + p)[: self.max_input + self.max_target]) for q, p in zip(qs, ps)]
        return [self.ib_row(q, p) for q, p in zip(qs, ps)]

    def embed_rows(self, texts: list[str]) -> list[Row]:
        return [self.embed_row(x) for x in self.encode(texts, self.max_input)]


def pack(rows: Sequence[Row], length: int) -> list[Row]:
    """Pack units (each starting with its sink) into rows of at most `length` tokens, first-fit decreasing.

    Deterministic; every unit lands whole in exactly one row. A unit longer than `length` is an error (cut long
    documents first, e.g. with SequenceBuilder.lm_document_rows)."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = len(rows[i][0])
        if n > length:
            raise ValueError(f"a unit of {n} tokens does not fit a packed row of {length} tokens")
        if rows[i][1][:1] != [SINK]:
            raise ValueError("packed units must start with their sink token (it marks the document boundary)")
        j = next((j for j, f in enumerate(free) if f >= n), None)
        if j is None:
            bins.append([]), free.append(length)
            j = len(bins) - 1
        bins[j].append(i)
        free[j] -= n
    return [([t for i in b for t in rows[i][0]], [s for i in b for s in rows[i][1]]) for b in bins]


def length_groups(lengths, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The full batches of one megabatch (row indices), each of rows of similar length, in a random order: HF
    Trainer's `group_by_length`. `lengths` is [n] or [n, columns] (e.g. query and positive rows, each padded on its
    own): rows sort by the column that is longest on average, ties by the next. Sorting within a megabatch of
    several batches keeps padding low while the batches still mix lengths from step to step; rows past the last
    full batch are dropped, as drop_last does."""
    lengths = np.asarray(lengths).reshape(len(lengths), -1)
    keys = lengths[:, np.argsort(-lengths.mean(0), kind="stable")]
    order = np.lexsort(keys.T[::-1])  # lexsort's last key is the primary one
    batches = [order[s: s + batch_size] for s in range(0, len(order) // batch_size * batch_size, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def padding_fraction(lengths: Sequence[int], batch_size: int, pad_to: int | None = None) -> float:
    """Share of padding tokens when consecutive rows of these lengths form batches padded to their longest row
    (or to `pad_to`); the last incomplete batch is dropped, as training does."""
    n = len(lengths) // batch_size * batch_size
    real = padded = 0
    for s in range(0, n, batch_size):
        chunk = lengths[s: s + batch_size]
        real += sum(chunk)
        padded += (pad_to or max(chunk)) * len(chunk)
    return 1.0 - real / max(1, padded)


# ---- tensors --------------------------------------------------------------------------------------------------

def documents(seg: torch.Tensor) -> torch.Tensor:
    """Document id [B, T] of every position: the number of sink tokens up to it (padding joins the last one)."""
    return torch.cumsum(seg == SINK, dim=1)


def positions(seg: torch.Tensor) -> torch.Tensor:
    """Position ids [B, T] that restart at 0 at every sink (0..T-1 for an unpacked row)."""
    idx = torch.arange(seg.shape[1], device=seg.device).expand_as(seg)
    start = torch.where(seg == SINK, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start


def pad_rows(ids: Sequence[Sequence[int]], segs: Sequence[Sequence[int]], pad_id: int,
             length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[B] lists -> ids [B, T] and seg [B, T], right-padded (seg = PAD) to the longest row, or to `length`."""
    longest = max(len(r) for r in ids)
    length = max(longest, length or 0)
    out_ids = np.full((len(ids), length), pad_id, dtype=np.int64)
    out_seg = np.full((len(ids), length), PAD, dtype=np.int64)
    for i, (r, s) in enumerate(zip(ids, segs)):
        out_ids[i, : len(r)] = r
        out_seg[i, : len(s)] = s
    return torch.from_numpy(out_ids), torch.from_numpy(out_seg)


def collate_columns(batch: dict, prefixes: Sequence[str], pad_id: int, length: int | None = None) -> dict:
    """Ray/numpy batch with `<p>_ids` / `<p>_seg` list columns -> padded tensors for each prefix; a `<p>_key`
    column (text keys) comes along as an int64 tensor."""
    out = {}
    for p in prefixes:
        out[f"{p}_ids"], out[f"{p}_seg"] = pad_rows(list(batch[f"{p}_ids"]), list(batch[f"{p}_seg"]), pad_id, length)
        if f"{p}_key" in batch:
            out[f"{p}_key"] = torch.as_tensor(np.asarray(batch[f"{p}_key"], dtype=np.int64))
    return out
