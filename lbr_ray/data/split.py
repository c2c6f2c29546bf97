"""Deterministic train/dev/test split by a hash of the query (never by position)."""
from __future__ import annotations

import hashlib

from lbr_ray.config.schema import SplitConfig

SPLITS = ("train", "dev", "test")


def split_key(query: str, key: str = "normalized") -> str:
    """What the split hashes: the query case-folded with runs of whitespace collapsed to one space (`normalized`,
    so "What is X ?" and "what is  x ?" share a split), or the query as it is (`exact`)."""
    return " ".join(query.casefold().split()) if key == "normalized" else query


def bucket(query: str, modulus: int = 10, key: str = "normalized") -> int:
    """int(first 8 hex digits of sha1(utf-8 split_key(query))) mod `modulus`: equal keys share a bucket."""
    return int(hashlib.sha1(split_key(query, key).encode("utf-8")).hexdigest()[:8], 16) % modulus


def split_of(query: str, cfg: SplitConfig = SplitConfig()) -> str:
    b = bucket(query, cfg.modulus, cfg.key)
    if b in cfg.test_buckets:
        return "test"
    if b in cfg.dev_buckets:
        return "dev"
    return "train"


def text_key(text: str) -> str:
    """Stable key of a text, used to de-duplicate and to keep held-out positives out of training."""
    return hashlib.sha1(" ".join(text.split()).encode("utf-8")).hexdigest()


def pair_split(query: str, positive: str, cfg: SplitConfig = SplitConfig()) -> tuple[str, str]:
    """A pair's split and, for a dev/test pair, its positive's text_key (which training must not see; else "")."""
    split = split_of(query, cfg)
    return split, text_key(positive) if split in ("dev", "test") else ""
