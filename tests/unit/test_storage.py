"""s3:// paths through pyarrow against moto's S3 server on 127.0.0.1 (no Ray): data shards, model folders,
uploads, --data semantics on a bucket prefix."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lbr_ray import storage

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bucket(s3_server):
    import boto3

    boto3.client("s3").create_bucket(Bucket="lbr-unit")
    storage.upload_dir(ROOT / "data/demo/medical", "s3://lbr-unit/data/medical")
    return "s3://lbr-unit"


def test_data_on_s3_reads_like_local_files(bucket):
    from cli.train import data_overrides
    from lbr_ray.data.readers import read_all, resolve_paths

    assert resolve_paths(f"{bucket}/data/medical", "pairs") == [f"{bucket}/data/medical/pairs.jsonl.gz"]
    local = list(read_all(str(ROOT / "data/demo/medical/pairs.jsonl.gz"), "pairs"))
    remote = list(read_all(f"{bucket}/data/medical", "pairs"))
    assert [r["query"] for r in remote] == [r["query"] for r in local] and remote[9]["_line"] == 10
    assert data_overrides(f"{bucket}/data/medical", []) == [
        f'data.pairs=["{bucket}/data/medical"]', f'data.corpus=["{bucket}/data/medical"]']


def test_bad_record_on_s3_names_the_uri_and_line(bucket):
    from lbr_ray.data.readers import read_all
    from lbr_ray.errors import DataError

    fs, p = storage.filesystem(f"{bucket}/bad/pairs.jsonl")
    with fs.open_output_stream(p) as fh:
        fh.write(b'{"query": "q", "positive": "p"}\n{"query": "q2"}\n')
    with pytest.raises(DataError, match=r"s3://lbr-unit/bad/pairs.jsonl:2: bad pairs record: missing field"):
        list(read_all(f"{bucket}/bad/pairs.jsonl", "pairs"))
    with pytest.raises(DataError, match="does not exist"):
        list(read_all(f"{bucket}/nothing/pairs.jsonl", "pairs"))


def test_model_folder_on_s3_is_found_and_downloaded(bucket, tmp_path):
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
