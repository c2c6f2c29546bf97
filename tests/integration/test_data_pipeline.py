"""Ray Data pipeline: stage-1 rows mix all files from the first batch on, in the same order every execution, and
contain no dev/test positive; small local data, shuffled and tokenized in the driver, gives the same rows as Ray
Data's path."""
from __future__ import annotations

import gzip
import json
from collections import Counter

from lbr_ray.config import load_config, to_dict
from lbr_ray.data import ray_data
from lbr_ray.data.split import split_of, text_key


def _write(path, rows):
    with gzip.open(path, "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)


def test_stage_1_mixes_files_in_proportion_and_holds_out_eval_positives(ray_local, tmp_path, monkeypatch):
    """Issue 13.7: files were read one block each, in order, so a short stage saw mostly its first files."""
    sizes = {"pairs-a.jsonl.gz": 300, "pairs-b.jsonl.gz": 200, "pairs-c.jsonl.gz": 100}
    test_q = next(f"test query {n}" for n in range(1000) if split_of(f"test query {n}") == "test")
    for name, n in sizes.items():
        rows = [{"query": f"{name} question {i}", "positive": f"{name} answer {i}"} for i in range(n)]
        if name.endswith("c.jsonl.gz"):
            rows += [{"query": test_q, "positive": "a held-out answer"}]
        _write(tmp_path / name, rows)
    leak_q = next(f"leak {n}" for n in range(1000) if split_of(f"leak {n}") == "train")
    _write(tmp_path / "pairs-d.jsonl.gz", [{"query": leak_q, "positive": "a held-out answer"}])
    cfg = load_config("configs/demo.yaml", [f"data.pairs=[{tmp_path}]", "data.corpus=[]", "ib_gl.target=pair"])
    summary = ray_data.summarize(cfg, in_process=False)  # the Ray Data pass (large or remote data)
    assert summary == ray_data.summarize(cfg)  # small local data: read in the driver, the same summary
    assert text_key("a held-out answer") in summary.heldout_keys
    train = Counter(r["_file"].split("/")[-1] for r in ray_data.pairs(cfg, "train").iter_rows())
    streams = {}
    for in_process in (True, False):  # small local data: read and shuffled in the driver; else Ray Data's shuffle
        source = ray_data.stage1_source(cfg, summary.heldout_keys, in_process=in_process)
        first = source.take(120)
        assert first == source.take(120)  # the same stream in every execution: resume skips consumed batches exactly
        seen = Counter(r["_file"].split("/")[-1] for r in first)
        for name in sizes:  # share of the first 120 rows within 0.12 of the file's share of the training rows
            assert abs(seen[name] / 120 - train[name] / sum(train.values())) <= 0.12, (in_process, seen, train)
        streams[in_process] = everything = list(source.iter_rows())
        assert not {text_key(r["positive"]) for r in everything} & summary.heldout_keys
        assert len(everything) == sum(train.values()) - 1  # only the leaking training pair is held out
    assert "a held-out answer" in {r["positive"] for r in ray_data.pairs(cfg, "train").iter_rows()}
    assert sorted(map(_key, streams[True])) == sorted(map(_key, streams[False]))  # the same rows either way
    assert ray_data.stage1_source(cfg, summary.heldout_keys).take(5) == streams[True][:5]  # small: in the driver
    texts = load_config("configs/demo.yaml", [f"data.pairs=[{tmp_path}]", "ib_gl.target=self"])  # + demo corpus
    got = {p: sorted(r["text"] for r in ray_data.stage1_source(texts, summary.heldout_keys, in_process=p).iter_rows())
           for p in (True, False)}
    assert got[True] == got[False] and len(got[True]) > 2 * (sum(train.values()) - 1)
    stage2 = {p: Counter(int(k) for b in ray_data.stage2_dataset(cfg, cfg.model.name, in_process=p).iter_batches()
                         for k in b["q_key"]) for p in (True, False)}
    assert stage2[True] == stage2[False] and sum(stage2[True].values()) == sum(train.values())
    # small stages are tokenized in the driver: the same rows as the tokenizer actor makes of the same stream
    rows = ray_data.stage1_rows(texts, summary.heldout_keys)
    assert len(rows) <= ray_data.TOKENIZE_HERE_ROWS
    built = {}
    for where, limit in (("driver", ray_data.TOKENIZE_HERE_ROWS), ("actor", 0)):
        monkeypatch.setattr(ray_data, "TOKENIZE_HERE_ROWS", limit)
        ds = ray_data.tokenized(rows, ray_data.TokenizeStage1, (to_dict(texts),))
        built[where] = sorted((tuple(r["ib_ids"]), tuple(r["ib_seg"])) for r in ds.iter_rows())
    assert built["driver"] == built["actor"] and len(built["driver"]) == len(rows)


def _key(row: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in row.items()))
