"""The data summary of small local data is the preflight's one read (no Ray Data pass after Ray starts): split
sizes, held-out positives, corpus size and skipped records; large or remote data is left to Ray Data."""
from __future__ import annotations

import gzip
import json

import pytest

from lbr_ray.config import load_config
from lbr_ray.data import summary as data_summary
from lbr_ray.data.split import split_of, text_key
from lbr_ray.errors import DataError
from lbr_ray.recipes.preflight import check_data


def _write(path, lines):
    with gzip.open(path, "wt") as fh:
        fh.writelines(line + "\n" for line in lines)


def _data(tmp_path):
    queries = [f"question {i}" for i in range(60)]
    pairs = [json.dumps({"query": q, "positive": f"answer to {q}"}) for q in queries]
    pairs.insert(3, '{"query": 5, "positive": "x"}')  # bad: line 4
    pairs.insert(10, "not json")  # bad: line 11
    _write(tmp_path / "pairs.jsonl.gz", pairs)
    _write(tmp_path / "corpus.jsonl.gz", [json.dumps({"id": i, "text": f"passage {i}"}) for i in range(7)] + ['{"id": 1}'])
    return queries


def test_summary_is_read_once_in_the_preflight(tmp_path, monkeypatch):
    queries = _data(tmp_path)
    cfg = load_config("configs/demo.yaml", [f"data.pairs=[{tmp_path}/pairs.jsonl.gz]",
                                            f"data.corpus=[{tmp_path}/corpus.jsonl.gz]", "data.on_bad_record=skip"])
    summary = check_data(cfg)
    splits = [split_of(q, cfg.data.split) for q in queries]
    assert dict(summary.pairs_by_split) == {s: splits.count(s) for s in set(splits)}
    assert summary.heldout_keys == {text_key(f"answer to {q}") for q, s in zip(queries, splits) if s != "train"}
    assert summary.corpus == 7 and summary.bad == 3
    assert summary.bad_by_file == {str(tmp_path / "pairs.jsonl.gz"): 2, str(tmp_path / "corpus.jsonl.gz"): 1}
    assert summary.bad_examples[0].startswith(f"{tmp_path}/pairs.jsonl.gz:4: ")
    monkeypatch.setattr(data_summary, "IN_PROCESS_BYTES", 0)  # larger data: Ray Data's pass summarises it
    assert check_data(cfg) is None


def test_summary_stops_at_the_first_bad_record(tmp_path):
    _data(tmp_path)
    cfg = load_config("configs/demo.yaml", [f"data.pairs=[{tmp_path}/pairs.jsonl.gz]", "data.corpus=[]"])
    with pytest.raises(DataError, match="pairs.jsonl.gz:4: "):
        check_data(cfg)
