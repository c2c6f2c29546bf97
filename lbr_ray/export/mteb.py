"""An MTEB-compatible model wrapper around lbr_ray.Encoder (an exported folder also works in MTEB directly
through sentence-transformers)."""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from lbr_ray.model.encoder import Encoder


class MTEBModel:
    """`encode(sentences, **kwargs) -> np.ndarray`, as MTEB calls it; accepts a list of texts or an iterable of
    batches with a "text" field (MTEB 2 passes a DataLoader of such batches)."""

    def __init__(self, path: str, batch_size: int = 32, device: str | None = None):
        self.encoder = Encoder.from_pretrained(path, device=device)
        self.batch_size = batch_size
        self.model_card_data = {"model_name": str(path)}

    def encode(self, sentences: list[str] | Iterable[dict], batch_size: int | None = None, **kwargs) -> np.ndarray:
        texts = sentences if isinstance(sentences, (list, tuple)) and (not sentences or isinstance(sentences[0], str)) \
            else [t for batch in sentences for t in batch["text"]]
        return self.encoder.encode(list(texts), batch_size=batch_size or self.batch_size)
