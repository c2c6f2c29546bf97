"""`lbr eval` end to end on real Ray (the shared local Ray): MiniLM through the Ray Data actor pool and sharded
FAISS actors, the embedding cache (a second run encodes nothing), Ray's 2-shard search == in-process 1-shard
search, an ANN index with its recall against exact search, and BM25."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

pytestmark = pytest.mark.integration
DEMO = str(Path(__file__).resolve().parents[2] / "data" / "demo")
SMALL = ["--data-root", DEMO, "--domains", "medical", "--max-queries", "20", "--max-corpus", "150",
         "--batch-size", "32", "--max-length", "128"]


def _eval(tmp_path, name, *args):
    res = CliRunner().invoke(app, ["eval", *SMALL, "--cache-dir", str(tmp_path / "cache"),
                                   "--output", str(tmp_path / name), *args])
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    return json.loads((tmp_path / name / "report.json").read_text())["domains"]["medical"]


def test_lbr_eval_minilm_and_bm25_on_demo(ray_local, tmp_path):
    first = _eval(tmp_path, "minilm", "--baseline", "minilm", "--num-workers", "2")
    assert first["encoded_passages"] == 150 and first["encoded_queries"] == 20
    assert first["rows"][0]["group"] == "all" and first["rows"][0]["recall@10"] > 0.5  # MiniLM is a real model

    ann = _eval(tmp_path, "hnsw", "--baseline", "minilm", "--num-workers", "2", "--index", "HNSW32")
    assert ann["encoded_passages"] == 0 and ann["encoded_queries"] == 0  # all from the cache
    assert 0.5 < ann["ann_recall@10"] <= 1.0

    local = _eval(tmp_path, "local", "--baseline", "minilm", "--num-workers", "0")  # no Ray, one shard
    assert local["encoded_passages"] == 0 and local["rows"] == first["rows"]  # 2 shards merged == 1 shard

    bm25 = _eval(tmp_path, "bm25", "--baseline", "bm25")
    assert 0 < bm25["rows"][0]["ndcg@10"] <= 1 and (tmp_path / "bm25" / "report.png").stat().st_size > 1000
