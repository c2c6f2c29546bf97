"""s3:// and gs:// paths through pyarrow against moto's S3 server and gcp-storage-emulator on 127.0.0.1 (no Ray):
data shards, model folders, uploads, --data semantics on a bucket prefix, the embedding cache."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lbr_ray import storage

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=["s3", "gs"])
def bucket(request):
    if request.param == "s3":
        import boto3

        request.getfixturevalue("s3_server")
        boto3.client("s3").create_bucket(Bucket="lbr-unit")
    else:
        request.getfixturevalue("gcs_server")("lbr-unit")
    storage.upload_dir(ROOT / "data/demo/medical", f"{request.param}://lbr-unit/data/medical")
    return f"{request.param}://lbr-unit"


def test_remote_data_reads_like_local_files(bucket):
    from cli.train import data_overrides
    from lbr_ray.data.readers import read_all, resolve_paths

    assert resolve_paths(f"{bucket}/data/medical", "pairs") == [f"{bucket}/data/medical/pairs.jsonl.gz"]
    local = list(read_all(str(ROOT / "data/demo/medical/pairs.jsonl.gz"), "pairs"))
    remote = list(read_all(f"{bucket}/data/medical", "pairs"))
    assert [r["query"] for r in remote] == [r["query"] for r in local] and remote[9]["_line"] == 10
    assert data_overrides(f"{bucket}/data/medical", []) == [
        f'data.pairs=["{bucket}/data/medical"]', f'data.corpus=["{bucket}/data/medical"]']


def test_bad_remote_record_names_the_uri_and_line(bucket):
    from lbr_ray.data.readers import read_all
    from lbr_ray.errors import DataError

    fs, p = storage.filesystem(f"{bucket}/bad/pairs.jsonl")
    with fs.open_output_stream(p) as fh:
        fh.write(b'{"query": "q", "positive": "p"}\n{"query": "q2"}\n')
    with pytest.raises(DataError, match=rf"{bucket}/bad/pairs.jsonl:2: bad pairs record: missing field"):
        list(read_all(f"{bucket}/bad/pairs.jsonl", "pairs"))
    with pytest.raises(DataError, match="does not exist"):
        list(read_all(f"{bucket}/nothing/pairs.jsonl", "pairs"))


def test_remote_model_folder_is_found_and_downloaded(bucket, tmp_path):
    from lbr_ray.train.checkpoint import hf_dir, local_hf_dir

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "lbr_ray.json").write_text(json.dumps({"format": "lbr-ray"}))
    storage.upload_dir(tmp_path, f"{bucket}/run/ib_gl")
    assert hf_dir(f"{bucket}/run/ib_gl") == f"{bucket}/run/ib_gl/model"
    local = local_hf_dir(f"{bucket}/run")
    assert json.loads((local / "lbr_ray.json").read_text())["format"] == "lbr-ray"
    assert storage.list_dirs(f"{bucket}/run") == ["ib_gl"] and storage.list_dirs(f"{bucket}/none") == []


class _CountingEncoder:
    fingerprint = "count-v1"

    def __init__(self):
        self.calls = 0

    def encode(self, texts, batch_size=32):
        import numpy as np

        self.calls += len(texts)
        return np.array([[len(t), 1.0 + i % 3] for i, t in enumerate(texts)], dtype=np.float32)


def test_remote_embedding_cache_is_shared_and_never_half_read(bucket, tmp_path, monkeypatch):
    """A remote cache entry is uploaded manifest last; another machine (an empty staging folder) reads it instead of
    encoding; an entry whose manifest is missing on the storage is encoded again, not read."""
    import numpy as np

    from lbr_ray.eval.encode import MANIFEST, encode_cached, object_ref

    texts, cache = ["a", "bb", "ccc", "dddd", "eeeee"], f"{bucket}/cache"
    run = dict(role="passage", num_workers=0, shard_rows=2, log=lambda *_: None)
    monkeypatch.setenv("LBR_STAGING", str(tmp_path / "machine-1"))
    first_enc = _CountingEncoder()
    first = encode_cached(object_ref(first_enc), texts, cache, **run)
    remote = storage.join(cache, first.folder.name)
    names = sorted(Path(f).name for f in storage.list_files(remote))
    assert names == sorted([MANIFEST] + [f"part-00000{i}{ext}" for i in range(3) for ext in (".npy", ".rows.npy")])
    monkeypatch.setenv("LBR_STAGING", str(tmp_path / "machine-2"))
    second_enc = _CountingEncoder()
    second = encode_cached(object_ref(second_enc), texts, cache, **run)
    assert first_enc.calls == 5 and second_enc.calls == 0 and np.array_equal(second.load(), first.load())
    assert second.folder.is_relative_to(tmp_path / "machine-2")
    fs, p = storage.filesystem(storage.join(remote, MANIFEST))
    fs.delete_file(p)  # as if the upload had stopped before its last file
    monkeypatch.setenv("LBR_STAGING", str(tmp_path / "machine-3"))
    third_enc = _CountingEncoder()
    assert np.array_equal(encode_cached(object_ref(third_enc), texts, cache, **run).load(), first.load())
    assert third_enc.calls == 5 and MANIFEST in {Path(f).name for f in storage.list_files(remote)}
