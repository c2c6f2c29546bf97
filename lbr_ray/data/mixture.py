"""The LM stage's data (Ray Data): a weighted mixture of domain folders -> documents -> packed causal-LM rows.

Each source contributes the texts stage 1 would take from it (its training pairs' queries and positives and its
corpus passages, none of them a dev/test positive of its pairs). With `lm.weights`, source i makes up
w_i / sum(w) of an epoch of sum(sizes) documents: every document is repeated floor(f_i) times, plus once more for
a share frac(f_i) of documents picked by a seeded hash of the text (f_i = copies per document). The mixture is
shuffled (seeded) and tokenized into `[sink][chunk]` units that are packed into rows of `lm.seq_len` tokens.
"""
from __future__ import annotations

import hashlib

import ray

from lbr_ray.config import LbrConfig, replace, to_dict
from lbr_ray.data import ray_data
from lbr_ray.data.readers import resolve_paths
from lbr_ray.errors import DataError


def mixture_factors(sizes: list[int], weights: tuple[float, ...]) -> list[float]:
    """Copies per document of each source so that source i is weights[i] / sum(weights) of sum(sizes) documents."""
    if not weights:
        return [1.0] * len(sizes)
    total, norm = sum(sizes), sum(weights)
    return [total * w / norm / n for n, w in zip(sizes, weights)]


def copies(text: str, factor: float, seed: int) -> int:
    whole = int(factor)
    u = int(hashlib.sha1(f"{seed}:{text}".encode()).hexdigest()[:13], 16) / 16 ** 13
    return whole + int(u < factor - whole)


def source_files(source: str) -> tuple[list[str], list[str]]:
    """(pairs files, corpus files) of one source (a folder's pairs* / corpus* files, or the files named); a source
    with neither is an error."""
    files = set()
    for kind in ("pairs", "corpus"):
        try:
            files.update(resolve_paths(source, kind))
        except DataError:
            pass
    corpus = sorted(f for f in files if f.rsplit("/", 1)[-1].startswith("corpus"))
    pairs = sorted(files - set(corpus))
    if not files:
        raise DataError(source, None, "lm.sources: no pairs* or corpus* text files (.jsonl, .jsonl.gz, .parquet)")
    return pairs, corpus


def documents(cfg: LbrConfig, source: str) -> ray.data.Dataset:
    """One source's texts (column `text`), held-out positives removed."""
    pairs, corpus = source_files(source)
    sub = replace(cfg, data={"pairs": tuple(pairs), "corpus": tuple(corpus)}, ib_gl={"use_corpus": True})
    if pairs:
        return ray_data.stage1_texts(sub, ray_data.summarize(sub).heldout_keys)
    records = ray_data.read_records(corpus, "corpus", cfg.data.on_bad_record, cfg.data.max_record_bytes)
    return records.filter(lambda r: ray_data.keeps_corpus_row(r, set())).select_columns(["text"])


def mixture(cfg: LbrConfig) -> tuple[ray.data.Dataset, dict]:
    """The weighted, shuffled document mixture and a summary {source: {"documents", "factor"}}."""
    parts, summary = [], {}
    docs = [documents(cfg, s) for s in cfg.lm.sources]
    sizes = [d.count() for d in docs]
    for source, n in zip(cfg.lm.sources, sizes):
        if n == 0:
            raise DataError(source, None, "lm.sources: every text of this source is held out or empty")
    for source, ds, n, f in zip(cfg.lm.sources, docs, sizes, mixture_factors(sizes, cfg.lm.weights)):
        seed = cfg.run.seed
        parts.append(ds if f == 1.0 else ds.flat_map(lambda r, f=f: [r] * copies(r["text"], f, seed)))
        summary[source] = {"documents": n, "factor": round(f, 4)}
    return ray_data.mixed(parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0], cfg), summary


class PackDocuments:
    """Class UDF: texts -> `[sink][chunk]` units of at most seq_len tokens -> rows packed to seq_len (`ib_*`)."""

    def __init__(self, cfg_dict: dict, tokenizer_path: str):
        from lbr_ray.config import config_from_dict
        from lbr_ray.layout import SequenceBuilder
        from lbr_ray.model.bottleneck import load_tokenizer

        cfg = config_from_dict(cfg_dict)
        self.seq_len = cfg.lm.seq_len
        tok = load_tokenizer(tokenizer_path, cfg.bottleneck.k_max)
        self.builder = SequenceBuilder(tok, cfg.bottleneck, cfg.data.max_input_tokens, cfg.data.max_target_tokens)

    def __call__(self, batch: dict) -> dict:
        from lbr_ray.layout import pack

        units = self.builder.lm_document_rows([str(t) for t in batch["text"]], self.seq_len)
        return ray_data.columns("ib", pack(units, self.seq_len))


def lm_dataset(cfg: LbrConfig, tokenizer_path: str, docs: ray.data.Dataset) -> ray.data.Dataset:
    return ray_data.in_actor(docs, PackDocuments, (to_dict(cfg), tokenizer_path))
