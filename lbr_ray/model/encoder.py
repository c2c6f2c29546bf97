"""Encoder: a trained lbr-ray model as a text embedder (no Ray). Training, evaluation and export all embed
through BottleneckLM.embed on SequenceBuilder.embed_rows, so the three cannot drift apart.

    enc = Encoder.from_pretrained("runs/demo/gr_cl/model")
    emb = enc.encode(["what is insulin?"], batch_size=32)   # np.float32 [N, D], L2-normalised
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from lbr_ray.config.schema import BottleneckConfig, SplitConfig
from lbr_ray.errors import CheckpointError
from lbr_ray.layout import SequenceBuilder, pad_rows
from lbr_ray.model.bottleneck import DTYPES, BottleneckLM

CARD = "lbr_ray.json"


def bottleneck_from_card(card: dict) -> BottleneckConfig:
    return BottleneckConfig(ratio=card["ratio"], k=card["k"], k_min=card["k_min"], k_max=card["k_max"],
                            sink=card["sink"], pooling=card["pooling"])


def split_from_card(card: dict) -> tuple[SplitConfig, str]:
    """The train/dev/test split the model was trained with, and where that came from. Cards written before the
    split was recorded belong to runs that used the default buckets on the exact query."""
    if "split" not in card:
        return SplitConfig(key="exact"), "the default split on the exact query (the model card predates split records)"
    raw = card["split"]
    split = SplitConfig(key=raw["key"], modulus=raw["modulus"], test_buckets=tuple(raw["test_buckets"]),
                        dev_buckets=tuple(raw["dev_buckets"]))
    return split, "the model's training split (data.split in its lbr_ray.json)"


class Encoder:
    def __init__(self, model: BottleneckLM, tokenizer, bottleneck: BottleneckConfig, max_input_tokens: int,
                 fingerprint: str = ""):
        self.model, self.tokenizer, self.bottleneck = model, tokenizer, bottleneck
        self.builder = SequenceBuilder(tokenizer, bottleneck, max_input_tokens, max_input_tokens)
        self.fingerprint = fingerprint

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | None = None, dtype: str | None = None) -> "Encoder":
        """Load an lbr-ray model folder (HF weights + tokenizer + lbr_ray.json), e.g. <run>/gr_cl/model."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lbr_ray.train.checkpoint import local_hf_dir

        folder = local_hf_dir(path)
        card = json.loads((folder / CARD).read_text())
        if card.get("format") != "lbr-ray":
            raise CheckpointError(f"{folder / CARD} is not an lbr-ray model card")
        tok = AutoTokenizer.from_pretrained(folder)
        lm = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype] if dtype else "auto")
        lm.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
        model = BottleneckLM(lm, card["bottleneck_ids"], "dense", card["sink"])
        return cls(model, tok, bottleneck_from_card(card), card["max_input_tokens"], _fingerprint(folder))

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 32, show_progress: bool = False) -> np.ndarray:
        """L2-normalised embeddings [N, D] (float32), in the order of `texts`."""
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        rows = self.builder.embed_rows(list(texts))
        order = np.argsort([-len(r[0]) for r in rows], kind="stable")  # similar lengths together: less padding
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        for start in range(0, len(rows), batch_size):
            idx = order[start: start + batch_size]
            ids, seg = pad_rows([rows[i][0] for i in idx], [rows[i][1] for i in idx], self.tokenizer.pad_token_id)
            emb = self.model.embed(ids.to(device), seg.to(device), self.bottleneck.pooling)
            out[idx] = emb.float().cpu().numpy()
        self.model.train(was_training)
        return out

    @property
    def dim(self) -> int:
        weight = self.model.decoder.get_input_embeddings().weight
        return int(getattr(weight, "ds_shape", weight.shape)[1])  # ZeRO-3 leaves an empty partition; ds_shape is whole


def encode_shared(encoder: Encoder, texts: list[str], batch_size: int, rank: int, world: int) -> np.ndarray:
    """Every rank encodes every `world`-th text and all-gathers the rest. Shares are padded to equal length, so
    every rank runs as many forward passes (ZeRO-3 gathers the weights inside them, all ranks together)."""
    if world == 1:
        return encoder.encode(texts, batch_size)
    import torch.distributed as dist

    per = -(-len(texts) // world)
    mine = texts[rank::world]
    mine = mine + [texts[-1]] * (per - len(mine))  # padding lands past len(texts) below
    device = next(encoder.model.parameters()).device
    local = torch.from_numpy(encoder.encode(mine, batch_size)).to(device)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    return torch.stack(parts, 1).reshape(per * world, -1)[: len(texts)].cpu().numpy()  # row j*world+r: rank r


def _fingerprint(folder: Path) -> str:
    """Content hash of the weights and the card: the embedding cache key of an unchanged model stays the same."""
    h = hashlib.sha1()
    for f in sorted(folder.glob("*.safetensors")) + [folder / CARD]:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()
