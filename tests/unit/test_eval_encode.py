"""Encoders, the embedding cache and the evaluator, in-process (num_workers=0: no Ray)."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from lbr_ray.errors import LbrError
from lbr_ray.eval.baselines import BM25Retriever, base_ref, minilm_path, minilm_ref
from lbr_ray.eval.encode import EncoderError, encode_cached, load_encoder, model_kind, object_ref
from lbr_ray.eval.evaluator import EvalOptions, RetrievalEvaluator

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "data" / "demo")
TINY = str(ROOT / "lbr_ray" / "assets" / "tiny-llama")


class HashEncoder:
    """Bag of hashed words: deterministic, fast, and it counts the texts it embeds."""

    def __init__(self, dim=64, query_dim=None, fingerprint="hash-v1"):
        self.dim, self.query_dim, self.fingerprint, self.calls = dim, query_dim, fingerprint, 0

    def _embed(self, texts, dim):
        self.calls += len(texts)
        out = np.zeros((len(texts), dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, int(hashlib.md5(w.encode()).hexdigest()[:8], 16) % dim] += 1.0
        return out + 1e-3

    def encode(self, texts, batch_size=32):
        return self._embed(texts, self.dim)

    def encode_queries(self, texts, batch_size=32):
        return self._embed(texts, self.query_dim or self.dim)


def _opts(tmp_path, **kw):
    base = dict(domains=("medical", "biology"), data_root=DEMO, num_workers=0, max_queries=30, max_corpus=150,
                cache_dir=str(tmp_path / "cache"))
    return EvalOptions(**{**base, **kw})


def test_second_evaluation_encodes_nothing(tmp_path):
    enc = HashEncoder()
    ev = RetrievalEvaluator(_opts(tmp_path), log=lambda *_: None)
    first = ev.evaluate(object_ref(enc), "hash")
    n = enc.calls
    assert n == sum(r["corpus_size"] + r["n_queries"] for r in first["domains"].values())
    assert first["domains"]["medical"]["encoded_passages"] == 150
    second = RetrievalEvaluator(_opts(tmp_path), log=lambda *_: None).evaluate(object_ref(enc), "hash")
    assert enc.calls == n  # everything came from the cache
    assert all(r["encoded_passages"] == 0 and r["encoded_queries"] == 0 for r in second["domains"].values())
    assert second["domains"]["medical"]["rows"] == first["domains"]["medical"]["rows"]
    RetrievalEvaluator(_opts(tmp_path), log=lambda *_: None).evaluate(object_ref(HashEncoder(fingerprint="v2")))
    assert len(list((tmp_path / "cache").glob("passage-*"))) == 4  # a new model fingerprint: new cache entries


def test_cache_folder_layout(tmp_path):
    texts = ["one text", "two texts here", "three"]
    got = encode_cached(object_ref(HashEncoder(dim=8)), texts, tmp_path, role="passage", num_workers=0,
                        shard_rows=2, log=lambda *_: None)
    manifest = json.loads((got.folder / "manifest.json").read_text())
    assert manifest["n"] == 3 and manifest["dim"] == 8 and len(manifest["parts"]) == 2
    emb = got.load()
    assert emb.shape == (3, 8) and np.allclose(np.linalg.norm(emb, axis=1), 1.0)
    assert np.allclose(emb, encode_cached(object_ref(HashEncoder(dim=8)), texts, tmp_path, num_workers=0,
                                          log=lambda *_: None).load())


def test_embedding_size_mismatch(tmp_path):
    ev = RetrievalEvaluator(_opts(tmp_path, domains=("medical",)), log=lambda *_: None)
    with pytest.raises(LbrError, match="embedding size mismatch"):
        ev.evaluate(object_ref(HashEncoder(dim=64, query_dim=32)))


def test_bad_encoder_output(tmp_path):
    class Broken(HashEncoder):
        def encode(self, texts, batch_size=32):
            return np.zeros((len(texts) + 1, 4))

    with pytest.raises(EncoderError, match="returned shape"):
        encode_cached(object_ref(Broken()), ["a", "b"], tmp_path, num_workers=0, log=lambda *_: None)
    with pytest.raises(EncoderError, match="fingerprint"):
        object_ref(object())


def test_model_kind_detection(tmp_path):
    assert model_kind(minilm_path()) == "st"
    (tmp_path / "lbr").mkdir()
    (tmp_path / "lbr" / "lbr_ray.json").write_text("{}")
    assert model_kind(tmp_path / "lbr") == "lbr"
    (tmp_path / "other").mkdir()
    with pytest.raises(EncoderError, match="not an lbr-ray or sentence-transformers model"):
        load_encoder(tmp_path / "other")
    with pytest.raises(EncoderError, match="does not exist"):
        load_encoder(tmp_path / "missing")


def test_minilm_encodes_offline():
    enc = minilm_ref().load()
    emb = enc.encode(["aspirin reduces fever", "acetylsalicylic acid lowers temperature", "a sorting routine"], 8)
    assert emb.shape == (3, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]
    assert minilm_ref().fingerprint == minilm_ref().fingerprint != minilm_ref(max_length=64).fingerprint


def test_base_model_last_token_pooling_is_seeded():
    ref = base_ref(TINY, from_scratch=True, seed=0)
    a, b = ref.load().encode(["hello world", "a longer text with more tokens"], 2), ref.load().encode(
        ["hello world", "a longer text with more tokens"], 1)
    assert a.shape == (2, 128) and np.allclose(a, b, atol=1e-5)  # same weights in every worker; padding-free
    assert not np.allclose(a, base_ref(TINY, from_scratch=True, seed=1).load().encode(
        ["hello world", "a longer text with more tokens"], 2))
    with pytest.raises(LbrError, match="config.json"):
        base_ref(DEMO)


def test_bm25_through_the_evaluator(tmp_path):
    res = RetrievalEvaluator(_opts(tmp_path, domains=("chemistry",)), log=lambda *_: None).evaluate(BM25Retriever())
    rows = {r["group"]: r for r in res["domains"]["chemistry"]["rows"]}
    assert {"all", "hard", "easy"} <= set(rows) and any(g.startswith("type:") for g in rows)
    assert rows["all"]["n_queries"] == 30 and rows["all"]["corpus_size"] == 150
    assert 0.0 <= rows["all"]["recall@10"] <= rows["all"]["recall@100"] <= 1.0
    assert rows["easy"]["recall@10"] > rows["hard"]["recall@10"]  # lexical overlap by construction


def test_lbr_model_folder_loads_through_the_trained_encoder_class(tmp_path, monkeypatch):
    import sys
    import types

    class FakeLbrEncoder(HashEncoder):
        @classmethod
        def from_pretrained(cls, path, device=None):
            enc = cls()
            del enc.fingerprint  # the loader supplies one from the folder's files
            enc.path = path
            return enc

    monkeypatch.setitem(sys.modules, "lbr_ray.model.encoder", types.SimpleNamespace(Encoder=FakeLbrEncoder))
    (tmp_path / "gr_cl" / "model").mkdir(parents=True)
    (tmp_path / "gr_cl" / "model" / "lbr_ray.json").write_text('{"k": 4}')
    ref = load_encoder(tmp_path)  # a run folder: its stage-2 model
    enc = ref.load()
    assert ref.kind == "lbr" and enc.path == str(tmp_path / "gr_cl" / "model") and enc.fingerprint == ref.fingerprint
    res = RetrievalEvaluator(_opts(tmp_path / "run", domains=("medical",)), log=lambda *_: None).evaluate(ref)
    assert res["domains"]["medical"]["rows"][0]["n_queries"] == 30


def test_cache_key_sees_whitespace_changes():
    """Issue 13: data that changed only in whitespace reused the old embeddings (tokenizers do see whitespace)."""
    from lbr_ray.eval.encode import cache_key

    assert cache_key("m", ["a b", "c"], "doc") == cache_key("m", ["a b", "c"], "doc")
    assert cache_key("m", ["a b", "c"], "doc") != cache_key("m", ["a  b", "c"], "doc")
    assert cache_key("m", ["a b"], "doc") != cache_key("m", ["a b"], "query")
