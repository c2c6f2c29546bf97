"""Deterministic train/dev/test split by a hash of the query (never by position)."""
from __future__ import annotations

import hashlib

from lbr_ray.config.schema import SplitConfig

SPLITS = ("train", "dev", "test")


def bucket(query: str, modulus: int = 10) -> int:
    """int(first 8 hex digits of sha1(utf-8 query)) mod `modulus`: equal queries share a bucket."""
    return int(hashlib.sha1(query.encode("utf-8")).hexdigest()[:8], 16) % modulus


def split_of(query: str, cfg: SplitConfig = SplitConfig()) -> str:
    b = bucket(query, cfg.modulus)
    if b in cfg.test_buckets:
        return "test"
    if b in cfg.dev_buckets:
        return "dev"
    return "train"


def text_key(text: str) -> str:
    """Stable key of a text, used to de-duplicate and to keep held-out positives out of training."""
    return hashlib.sha1(" ".join(text.split()).encode("utf-8")).hexdigest()
