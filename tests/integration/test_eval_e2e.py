"""`lbr eval` end to end on real Ray (shared local Ray): MiniLM through the actor pool and sharded FAISS actors,
the embedding cache (a second run encodes nothing), Ray search == in-process search, an ANN index, and BM25."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

pytestmark = pytest.mark.integration
DEMO = str(Path(__file__).resolve().parents[2] / "data" / "demo")
SMALL = ["--data-root", DEMO, "--domains", "medical,code", "--max-queries", "20", "--max-corpus", "150",
         "--batch-size", "32", "--max-length", "128"]


def _eval(tmp_path, name, *args):
    res = CliRunner().invoke(app, ["eval", *SMALL, "--cache-dir", str(tmp_path / "cache"),
                                   "--output", str(tmp_path / name), *args])
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    return json.loads((tmp_path / name / "report.json").read_text())


def test_lbr_eval_minilm_and_bm25_on_demo(ray_local, tmp_path):
    first = _eval(tmp_path, "minilm", "--baseline", "minilm", "--num-workers", "2")
    med = first["domains"]["medical"]
    assert med["encoded_passages"] == 150 and med["encoded_queries"] == 20
    assert med["rows"][0]["group"] == "all" and med["rows"][0]["recall@10"] > 0.5  # MiniLM is a real model

    again = _eval(tmp_path, "again", "--baseline", "minilm", "--num-workers", "2")
    assert all(d["encoded_passages"] == 0 and d["encoded_queries"] == 0 for d in again["domains"].values())
    local = _eval(tmp_path, "local", "--baseline", "minilm", "--num-workers", "0")  # no Ray, one shard
    for report in (again, local):
        for domain in ("medical", "code"):
            assert report["domains"][domain]["rows"] == first["domains"][domain]["rows"]  # 2 shards == 1 shard

    ann = _eval(tmp_path, "hnsw", "--baseline", "minilm", "--num-workers", "2", "--index", "HNSW32")
    assert 0.5 < ann["domains"]["medical"]["ann_recall@10"] <= 1.0
    assert ann["domains"]["code"]["encoded_passages"] == 0

    bm25 = _eval(tmp_path, "bm25", "--baseline", "bm25")
    assert bm25["method"] == "bm25" and 0 < bm25["domains"]["medical"]["rows"][0]["ndcg@10"] <= 1
    assert (tmp_path / "bm25" / "report.png").stat().st_size > 1000
