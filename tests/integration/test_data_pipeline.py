"""Ray Data pipeline: stage-1 rows mix all files from the first batch on, in the same order every execution, and
contain no dev/test positive."""
from __future__ import annotations

import gzip
import json
from collections import Counter

from lbr_ray.config import load_config
from lbr_ray.data import ray_data
from lbr_ray.data.split import split_of, text_key


def _write(path, rows):
    with gzip.open(path, "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)


def test_stage_1_mixes_files_in_proportion_and_holds_out_eval_positives(ray_local, tmp_path):
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
    source = ray_data.stage1_source(cfg, summary.heldout_keys)
    first = source.take(120)
    assert first == source.take(120)  # the same stream in every execution: resume skips consumed batches exactly
    train = Counter(r["_file"].split("/")[-1] for r in ray_data.pairs(cfg, "train").iter_rows())
    seen = Counter(r["_file"].split("/")[-1] for r in first)
    for name in sizes:  # share of the first 120 rows within 0.12 of the file's share of the training rows
        assert abs(seen[name] / 120 - train[name] / sum(train.values())) <= 0.12, (seen, train)
    everything = list(source.iter_rows())
    assert not {text_key(r["positive"]) for r in everything} & summary.heldout_keys
    assert "a held-out answer" in {r["positive"] for r in ray_data.pairs(cfg, "train").iter_rows()}
    assert len(everything) == sum(train.values()) - 1  # only the leaking training pair is held out
