"""Readers, validation (file and line named), skip counting, path resolution, split, token layouts."""
from __future__ import annotations

import gzip
import json

import pytest

from lbr_ray.config.schema import BottleneckConfig, SplitConfig
from lbr_ray.data.readers import BadRecords, read_all, resolve_paths
from lbr_ray.data.split import bucket, split_of
from lbr_ray.errors import DataError
from lbr_ray.layout import B, SINK, X, Y, SequenceBuilder, num_bottleneck


def write_pairs(path, n=30, broken: dict[int, str] | None = None, gz=False):
    lines = [json.dumps({"query": f"question {i}", "positive": f"answer {i}", "type": "qa"}) for i in range(n)]
    for line_no, text in (broken or {}).items():
        lines[line_no - 1] = text
    data = "\n".join(lines) + "\n"
    if gz:
        with gzip.open(path, "wt") as fh:
            fh.write(data)
    else:
        path.write_text(data)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_broken_json_names_file_and_line(tmp_path, gz):
    path = write_pairs(tmp_path / ("pairs.jsonl.gz" if gz else "pairs.jsonl"), broken={17: '{"query": "oops'}, gz=gz)
    with pytest.raises(DataError) as info:
        list(read_all(str(path), "pairs"))
    assert info.value.line == 17 and info.value.path == str(path)
    assert f"{path}:17" in str(info.value)


@pytest.mark.parametrize("record, reason", [
    ({"positive": "a"}, "missing field 'query'"),
    ({"query": "  ", "positive": "a"}, "field 'query' is empty"),
    ({"query": 3, "positive": "a"}, "must be a string"),
    ({"query": "q", "positive": "a", "negatives": "n"}, "negatives"),
    ([1, 2], "JSON object"),
])
def test_bad_fields_are_named(tmp_path, record, reason):
    path = write_pairs(tmp_path / "pairs.jsonl", broken={5: json.dumps(record)})
    with pytest.raises(DataError, match=reason) as info:
        list(read_all(str(path), "pairs"))
    assert info.value.line == 5


def test_skip_mode_counts_every_bad_record(tmp_path):
    path = write_pairs(tmp_path / "pairs.jsonl", broken={3: "nope", 9: json.dumps({"query": "q"})})
    bad = BadRecords()
    rows = list(read_all(str(path), "pairs", on_bad="skip", bad=bad))
    assert len(rows) == 28 and bad.total == 2 and bad.counts[str(path)] == 2
    assert rows[2]["_line"] == 4  # line numbers stay the file's own


def test_corpus_ids_and_blank_lines(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"id": 1, "text": "a"}\n\n{"id": "x", "text": "b", "title": "t"}\n{"id": "", "text": "c"}\n')
    with pytest.raises(DataError, match="'id'") as info:
        list(read_all(str(path), "corpus"))
    assert info.value.line == 4


def test_resolve_paths_dirs_globs_and_kinds(tmp_path):
    write_pairs(tmp_path / "pairs_a.jsonl")
    write_pairs(tmp_path / "pairs_b.jsonl.gz", gz=True)
    (tmp_path / "corpus.jsonl").write_text('{"id": 1, "text": "a"}\n')
    assert [p.split("/")[-1] for p in resolve_paths(str(tmp_path), "pairs")] == ["pairs_a.jsonl", "pairs_b.jsonl.gz"]
    assert len(resolve_paths(str(tmp_path / "pairs_*"), "pairs")) == 2
    assert len(resolve_paths(str(tmp_path), "corpus")) == 1
    with pytest.raises(DataError, match="does not exist"):
        resolve_paths(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="no pairs files"):
        resolve_paths(str(tmp_path / "*.parquet"))


def test_parquet_rows_are_numbered(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"query": ["a", "b", ""], "positive": ["x", "y", "z"]}), tmp_path / "p.parquet")
    with pytest.raises(DataError) as info:
        list(read_all(str(tmp_path / "p.parquet"), "pairs"))
    assert info.value.line == 3


def test_split_is_a_hash_of_the_query():
    cfg = SplitConfig()
    queries = [f"query number {i}" for i in range(2000)]
    splits = [split_of(q, cfg) for q in queries]
    assert splits == [split_of(q, cfg) for q in queries]  # deterministic
    share = {s: splits.count(s) / len(splits) for s in ("train", "dev", "test")}
    assert 0.07 < share["test"] < 0.13 and 0.07 < share["dev"] < 0.13
    # README: sha1 of the UTF-8 normalised query (case-folded, whitespace collapsed), first 8 hex digits, mod 10;
    # key=exact is METHOD.md's formula on the query as it is
    import hashlib

    q = "What are the symptoms of  SHORT syndrome ?"
    norm = "what are the symptoms of short syndrome ?"
    assert bucket(q) == int(hashlib.sha1(norm.encode()).hexdigest()[:8], 16) % 10
    assert bucket(q, key="exact") == int(hashlib.sha1(q.encode()).hexdigest()[:8], 16) % 10


def test_case_and_whitespace_twins_share_a_split():
    """Issue 13: "What is (are) Langerhans Cell Histiocytosis ?" was train and its lower-case twin test."""
    q = "What is (are) Langerhans Cell Histiocytosis ?"
    twins = [q, "What is (are) Langerhans cell histiocytosis ?", " what is (are)\tlangerhans cell  histiocytosis ? "]
    assert {split_of(t) for t in twins} == {split_of(q)}
    assert len({split_of(t, SplitConfig(key="exact")) for t in twins[:2]}) == 2  # the old key split them


def test_k_follows_ratio_or_fixed():
    cfg = BottleneckConfig(ratio=100, k_min=1, k_max=16)
    assert [num_bottleneck(n, cfg) for n in (1, 100, 101, 5000)] == [1, 1, 2, 16]
    assert num_bottleneck(999, BottleneckConfig(k=5)) == 5


def test_layouts(model_dirs):
    from lbr_ray.model.bottleneck import load_tokenizer

    tok = load_tokenizer(str(model_dirs["llama"]), 4)
    sb = SequenceBuilder(tok, BottleneckConfig(ratio=4, k_max=4), 12, 8)
    ids, seg = sb.stage1_rows(["one two three four five six seven eight nine ten"], "self", ib=True)[0]
    n_x, n_b, n_y = seg.count(X), seg.count(B), seg.count(Y)
    assert seg[0] == SINK and ids[0] == tok.bos_token_id
    assert seg == [SINK] + [X] * n_x + [B] * n_b + [Y] * n_y
    assert n_b == min(4, -(-n_x // 4)) and n_y == min(8, n_x)
    assert ids[1 + n_x: 1 + n_x + n_b] == sb.b_ids[:n_b]
    assert ids[1 + n_x + n_b:] == ids[1: 1 + n_y]  # target = input (self)
    ids2, seg2 = sb.stage1_rows(["one two three four five six seven eight nine ten"], "self", ib=False)[0]
    assert set(seg2) == {SINK, X}  # gl-cl: plain LM rows, no bottleneck
    e_ids, e_seg = sb.embed_rows(["one two"])[0]
    assert e_seg[-1] == B and Y not in e_seg


def test_hf_datasets_save_to_disk_folder(tmp_path):
    """`--data DIR` where DIR is a `datasets` save_to_disk folder (Dataset or DatasetDict): its Arrow files, rows
    checked like any record (row number as line)."""
    import datasets

    rows = {"query": [f"question {i}" for i in range(12)], "positive": [f"answer {i}" for i in range(12)]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    files = resolve_paths(str(tmp_path / "ds"), "pairs")
    assert files and all(f.endswith(".arrow") for f in files)
    got = list(read_all(str(tmp_path / "ds"), "pairs"))
    assert [r["query"] for r in got] == rows["query"] and got[3]["_line"] == 4
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                               "test": datasets.Dataset.from_dict({"query": ["q"], "positive": [7]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"\.arrow:1: bad pairs record: field 'positive' must be a string"):
        list(read_all(str(tmp_path / "dd"), "pairs"))
