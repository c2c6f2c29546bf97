"""Every file in clusters/ passes validation (Ray's launcher schema, KubeRay required keys); broken copies fail
with the offending key path named. No Ray runtime: the schema is read from Ray's installed files."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lbr_ray.cluster.validate import is_local_head, load_launcher, validate_file
from lbr_ray.errors import ConfigError

CLUSTERS = Path(__file__).resolve().parents[2] / "clusters"
FILES = sorted(CLUSTERS.rglob("*.yaml"))


def test_clusters_folder_has_every_spec():
    names = {p.relative_to(CLUSTERS).as_posix() for p in FILES}
    assert {"local.yaml", "aws.yaml", "gcp.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(CLUSTERS).as_posix())
def test_every_cluster_file_is_valid(path):
    what = validate_file(path)
    assert what.startswith(("Ray cluster launcher", "KubeRay"))


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_files_have_cpu_head_gpu_workers_and_install_lbr(name):
    cfg = load_launcher(CLUSTERS / name)
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    gpu = [t for n, t in types.items() if t["resources"].get("GPU", 0) > 0]
    assert gpu and all("min_workers" in t and "max_workers" in t for t in gpu)
    assert any("lbr-ray[gpu]" in c for c in cfg["setup_commands"])
    assert cfg["file_mounts"]


def test_local_file_means_a_head_on_loopback():
    assert is_local_head(load_launcher(CLUSTERS / "local.yaml"))
    assert not is_local_head(load_launcher(CLUSTERS / "aws.yaml"))


def _broken(tmp_path, src: str, edit) -> Path:
    docs = list(yaml.safe_load_all((CLUSTERS / src).read_text()))
    edit(docs[0])
    out = tmp_path / Path(src).name
    out.write_text(yaml.safe_dump_all(docs))
    return out


def _problems(path) -> str:
    with pytest.raises(ConfigError) as info:
        validate_file(path)
    assert str(path) in str(info.value)
    return str(info.value)


def test_aws_wrong_type_names_the_key(tmp_path):
    bad = _broken(tmp_path, "aws.yaml", lambda d: d["available_node_types"]["gpu_1x"].update(min_workers="two"))
    assert "available_node_types.gpu_1x.min_workers: 'two' is not of type 'integer'" in _problems(bad)


def test_aws_missing_and_unknown_keys_are_named(tmp_path):
    def edit(d):
        del d["provider"]["type"]
        d["max_wokers"] = 3
        d["available_node_types"]["gpu_4x"]["node_confg"] = d["available_node_types"]["gpu_4x"].pop("node_config")

    msg = _problems(_broken(tmp_path, "aws.yaml", edit))
    assert "provider.type: required key is missing" in msg
    assert "max_wokers: unknown key" in msg
    assert "available_node_types.gpu_4x.node_config: required key is missing" in msg
    assert "available_node_types.gpu_4x.node_confg: unknown key" in msg


def test_launcher_semantics_like_ray(tmp_path):
    def edit(d):
        d["head_node_type"] = "headd"
        d["available_node_types"]["gpu_1x"].update(min_workers=5, max_workers=2)

    msg = _problems(_broken(tmp_path, "gcp.yaml", edit))
    assert "head_node_type: 'headd' is not one of available_node_types" in msg
    assert "available_node_types.gpu_1x.min_workers: 5 > max_workers 2" in msg
    assert "max_workers: 4 is smaller than the sum of min_workers (5)" in msg


def test_raycluster_missing_image_and_start_params(tmp_path):
    def edit(d):
        del d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"]
        del d["spec"]["headGroupSpec"]["rayStartParams"]
        d["spec"]["workerGroupSpecs"][0]["minReplicas"] = 9

    msg = _problems(_broken(tmp_path, "kuberay/raycluster.yaml", edit))
    assert "spec.workerGroupSpecs[0].template.spec.containers[0].image: required key is missing" in msg
    assert "spec.headGroupSpec.rayStartParams: required mapping is missing" in msg
    assert "spec.workerGroupSpecs[0].minReplicas: 9 > maxReplicas 4" in msg


def test_rayjob_needs_entrypoint_and_one_cluster_source(tmp_path):
    def edit(d):
        del d["spec"]["entrypoint"]
        d["spec"]["clusterSelector"] = {"ray.io/cluster": "lbr-ray"}
        del d["metadata"]["name"]

    msg = _problems(_broken(tmp_path, "kuberay/rayjob.yaml", edit))
    assert "spec.entrypoint: required key is missing" in msg
    assert "spec.rayClusterSpec: give exactly one of rayClusterSpec" in msg
    assert "metadata.name: required key is missing" in msg


def test_rayjob_on_existing_cluster_is_valid(tmp_path):
    def edit(d):
        d["spec"]["clusterSelector"] = {"ray.io/cluster": "lbr-ray"}
        del d["spec"]["rayClusterSpec"]

    assert validate_file(_broken(tmp_path, "kuberay/rayjob.yaml", edit)) == "KubeRay RayJob"


def test_unknown_kind_and_bad_yaml(tmp_path):
    assert "kind: expected RayCluster or RayJob" in _problems(
        _broken(tmp_path, "kuberay/raycluster.yaml", lambda d: d.update(kind="RayService")))
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster_name: x\nprovider: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        validate_file(bad)
    with pytest.raises(ConfigError, match="file not found"):
        validate_file(tmp_path / "missing.yaml")
