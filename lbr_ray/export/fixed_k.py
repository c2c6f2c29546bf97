"""Choosing the fixed k of a sentence-transformers export for a model whose k follows R, by measurement.

A model trained with R-based k embeds a text of n tokens with k(n) = clamp(ceil(n / R), k_min, k_max) bottleneck
tokens. A static tokenizer template cannot vary k with the length, so the export pins one k for every text, which
changes the model's input, and how much that costs depends on the model (one demo run: R@10 0.215 with k=1 but
0.061 with k=4 = k_max). So export measures it: dev R@10 with the run's own per-text k (lbr_ray.Encoder, what the
run reports) against dev R@10 with each admissible fixed k, on the run's own dev set (its config's pairs, split,
caps and seed: lbr_ray.eval.sets.dev_eval_set), picks the best fixed k (or checks the one asked for), reports the
loss and refuses a loss above a threshold unless forced.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lbr_ray.errors import LbrError


def torch_no_grad(fn):
    """torch.no_grad() without importing torch when this module is imported (the CLI imports it for a default)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)
    return wrapper

DEFAULT_MAX_LOSS = 0.01  # absolute dev R@10 an export may lose against the run's per-text k without --force


def admissible_ks(card: dict) -> list[int]:
    """The k values the model's own rule gives over every input length 1..max_input_tokens."""
    from lbr_ray.layout import num_bottleneck
    from lbr_ray.model.encoder import bottleneck_from_card

    cfg = bottleneck_from_card(card)
    return sorted({num_bottleneck(n, cfg) for n in range(1, card["max_input_tokens"] + 1)})


@dataclass
class KMeasurement:
    per_text: float  # dev R@10 with the run's per-text k
    fixed: dict[int, float]  # k -> dev R@10 with every text given k bottleneck tokens
    chosen: int
    dev_queries: int
    dev_passages: int
    config: str  # the run config whose dev set was used
    logged: float | None = None  # the run's own final dev R@10 from its metrics.jsonl, when found
    notes: list[str] = field(default_factory=list)

    @property
    def loss(self) -> float:
        return self.per_text - self.fixed[self.chosen]

    def lines(self) -> list[str]:
        out = [f"dev set: {self.dev_queries} queries, {self.dev_passages} passages (from {self.config})",
               f"  per-text k (the run's model): dev R@10 {self.per_text:.4f}"
               + (f" (the run logged {self.logged:.4f})" if self.logged is not None else "")]
        for k, value in sorted(self.fixed.items()):
            mark = "  <- chosen" if k == self.chosen else ""
            out.append(f"  fixed k={k}: dev R@10 {value:.4f} ({value - self.per_text:+.4f}){mark}")
        return out

    def to_dict(self) -> dict:
        return {"dev_recall@10_per_text_k": self.per_text,
                "dev_recall@10_fixed_k": {str(k): v for k, v in self.fixed.items()}, "k": self.chosen,
                "dev_recall@10_loss": self.loss, "dev_queries": self.dev_queries,
                "dev_passages": self.dev_passages, "config": self.config, "run_logged_dev_recall@10": self.logged}


def find_run_config(src: Path) -> Path | None:
    """The config.yaml a run saved next to this model: <stage>/config.yaml for <stage>/model or
    <stage>/checkpoint_*/hf, or the checkpoint's own."""
    for cand in (src / "config.yaml", src.parent / "config.yaml", src.parent.parent / "config.yaml"):
        if cand.is_file():
            return cand
    return None


def logged_dev_recall(config_path: Path) -> float | None:
    """The last dev R@10 of the stage whose config this is (its metrics.jsonl), if the run left one."""
    import json

    path = config_path.parent / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    devs = [r["dev_recall@10"] for r in rows if "dev_recall@10" in r]
    return devs[-1] if devs else None


@torch_no_grad
def embeddings_by_k(encoder, texts: list[str], batch_size: int = 64):
    """(per-text-k embeddings [N, D], fixed-k embeddings [k_max, N, D]) from ONE forward pass per batch.

    Embedding reads `[sink][x][b_1..b_k]` with the plain causal mask and pools the last bottleneck state, so the
    state at b_j of a row with all k_max bottleneck tokens appended is exactly the embedding with k = j (causal
    attention: b_j never sees b_{j+1..}). One pass gives every fixed k and the per-text k(n) at once."""
    import dataclasses as dc

    import numpy as np
    import torch

    from lbr_ray.layout import pad_rows
    from lbr_ray.layout import SequenceBuilder, num_bottleneck

    b = encoder.bottleneck
    k_max = len(encoder.model.bottleneck_ids)
    builder = SequenceBuilder(encoder.tokenizer, dc.replace(b, k=k_max), encoder.builder.max_input,
                              encoder.builder.max_input)
    rows = builder.embed_rows(list(texts))
    device = next(encoder.model.parameters()).device
    was_training = encoder.model.training
    encoder.model.eval()
    fixed = np.zeros((k_max, len(rows), encoder.dim), dtype=np.float32)
    per_text = np.zeros((len(rows), encoder.dim), dtype=np.float32)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        ids, seg = pad_rows([r[0] for r in chunk], [r[1] for r in chunk], encoder.tokenizer.pad_token_id)
        hidden = encoder.model.hidden(ids.to(device), seg.to(device), ib=False)  # [B, T, H]
        n = torch.tensor([len(r[0]) - 1 - k_max for r in chunk], device=device)  # input tokens per row
        pos = 1 + n[:, None] + torch.arange(k_max, device=device)[None, :]  # [B, k_max]: b_1..b_k_max
        states = hidden[torch.arange(len(chunk), device=device)[:, None], pos]  # [B, k_max, H]
        states = torch.nn.functional.normalize(states.float(), dim=-1).cpu().numpy()
        fixed[:, start: start + len(chunk)] = states.transpose(1, 0, 2)
        own = [num_bottleneck(int(m), b) - 1 for m in n.tolist()]
        per_text[start: start + len(chunk)] = states[np.arange(len(chunk)), own]
    encoder.model.train(was_training)
    return per_text, fixed


def measure(src: Path, card: dict, k: int | None = None, config: Path | None = None,
            batch_size: int = 64, log=print) -> KMeasurement:
    """Dev R@10 of the per-text k and of every fixed k in 1..k_max on the run's dev set; `chosen` = `k`, or the
    best fixed k (the smaller one on ties)."""
    from lbr_ray.config import load_config
    from lbr_ray.eval.metrics import dev_metrics, retrieve_exact
    from lbr_ray.eval.sets import dev_eval_set
    from lbr_ray.model.encoder import Encoder

    config = config or find_run_config(src)
    if config is None:
        raise LbrError(f"cannot measure what a fixed k costs: no run config.yaml next to {src}; pass --config (the "
                       "config the run trained with)")
    if card["pooling"] != "last":
        raise LbrError("measuring a fixed k needs pooling=last")
    dev = dev_eval_set(load_config(config))
    encoder = Encoder.from_pretrained(src)
    log(f"measuring dev R@10 of the run's per-text k and of fixed k = 1..{card['k_max']} (one encoding pass)")
    q_own, q_fixed = embeddings_by_k(encoder, dev.queries, batch_size)
    d_own, d_fixed = embeddings_by_k(encoder, dev.doc_texts, batch_size)

    def recall(q, d) -> float:
        return dev_metrics(retrieve_exact(q, d, k=10)[1], dev.qrels, ks=(10,))["recall@10"]

    per_text = recall(q_own, d_own)
    fixed = {j + 1: recall(q_fixed[j], d_fixed[j]) for j in range(card["k_max"])}
    chosen = k if k is not None else max(sorted(fixed), key=lambda j: (fixed[j], -j))
    return KMeasurement(per_text, fixed, chosen, len(dev.queries), len(dev.doc_texts), str(config),
                        logged_dev_recall(config))


def check_loss(m: KMeasurement, max_loss: float, force: bool) -> None:
    """Refuse an export that loses more than `max_loss` dev R@10 unless `force`."""
    if m.loss > max_loss and not force:
        raise LbrError(f"exporting with fixed k={m.chosen} loses {m.loss:.4f} dev R@10 (per-text k {m.per_text:.4f} "
                       f"-> {m.fixed[m.chosen]:.4f}), more than --max-loss {max_loss}; embed with lbr_ray.Encoder "
                       "(exact per-text k), raise --max-loss, or pass --force to export anyway")


__all__ = ["KMeasurement", "admissible_ks", "measure", "check_loss", "find_run_config", "DEFAULT_MAX_LOSS"]
