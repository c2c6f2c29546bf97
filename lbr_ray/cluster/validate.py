"""Check cluster files before anything is launched: Ray launcher YAMLs against the JSON schema Ray ships
(`ray/autoscaler/ray-schema.json`), KubeRay RayCluster/RayJob manifests for the fields the operator needs.

Every problem is reported at once in one `ConfigError`, each naming its key path, e.g.
`available_node_types.gpu_1x.min_workers: 'two' is not of type 'integer'`. No Ray import: the schema is read
from Ray's installed files, so `lbr cluster validate` answers in well under a second.
"""
from __future__ import annotations

import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from lbr_ray.errors import ConfigError

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def load_yaml_docs(path: str | Path) -> list[Any]:
    """All YAML documents of `path` (a launcher file has one; a KubeRay file may have several)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"file not found: {p}")
    try:
        docs = [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not docs:
        raise ConfigError(f"{p}: the file is empty")
    return docs


def validate_file(path: str | Path) -> str:
    """Validate a cluster file; return what it is ("Ray cluster launcher (aws)", "KubeRay RayJob", ...)."""
    docs = load_yaml_docs(path)
    if any(isinstance(d, dict) and ("apiVersion" in d or "kind" in d) for d in docs):
        kinds = [check_kuberay(d, i if len(docs) > 1 else None, str(path)) for i, d in enumerate(docs)]
        return "KubeRay " + " + ".join(k for k in kinds if k)
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise ConfigError("a Ray cluster launcher file is one YAML mapping", str(path))
    check_launcher(docs[0], str(path))
    return f"Ray cluster launcher ({docs[0]['provider']['type']})"


def load_launcher(path: str | Path) -> dict:
    """Read and validate a launcher YAML; return it as a dict."""
    docs = load_yaml_docs(path)
    if len(docs) != 1 or not isinstance(docs[0], dict) or "apiVersion" in docs[0]:
        raise ConfigError("expected a Ray cluster launcher YAML (for KubeRay manifests use kubectl apply -f)",
                          str(path))
    check_launcher(docs[0], str(path))
    return docs[0]


def is_local_head(cfg: dict) -> bool:
    """True for a launcher file that means "a head on this machine" (provider local, head_ip loopback)."""
    prov = cfg.get("provider") or {}
    return prov.get("type") == "local" and str(prov.get("head_ip", "")) in LOOPBACK and not prov.get("worker_ips")


# ---------------------------------------------------------------- Ray cluster launcher
@lru_cache(maxsize=1)
def ray_schema() -> dict:
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("Ray is not installed: pip install 'ray[default]'")
    return json.loads((Path(list(spec.submodule_search_locations)[0]) / "autoscaler" / "ray-schema.json").read_text())


def check_launcher(cfg: dict, source: str | None = None) -> None:
    import jsonschema  # a Ray dependency

    validator = jsonschema.Draft7Validator(ray_schema())
    problems = [_describe(e) for e in sorted(validator.iter_errors(cfg), key=lambda e: list(map(str, e.path)))]
    problems += _launcher_semantics(cfg)
    if problems:
        raise ConfigError(problems, source)


def _launcher_semantics(cfg: dict) -> list[str]:
    """The checks Ray's `validate_config` makes after the schema (head type known, worker counts)."""
    types_ = cfg.get("available_node_types")
    if not isinstance(types_, dict):
        return []
    problems = []
    head = cfg.get("head_node_type")
    if head is None:
        problems.append("head_node_type: required when available_node_types is set")
    elif head not in types_:
        problems.append(f"head_node_type: {head!r} is not one of available_node_types ({', '.join(types_)})")
    total_min = 0
    for name, t in types_.items():
        if not isinstance(t, dict):
            continue
        lo, hi = t.get("min_workers", 0), t.get("max_workers")
        if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            problems.append(f"{_path(['available_node_types', name, 'min_workers'])}: {lo} > max_workers {hi}")
        total_min += lo if isinstance(lo, int) else 0
    if isinstance(cfg.get("max_workers"), int) and total_min > cfg["max_workers"]:
        problems.append(f"max_workers: {cfg['max_workers']} is smaller than the sum of min_workers ({total_min})")
    return problems


def _describe(err) -> str:
    """One jsonschema error as `key.path: what is wrong`, naming the offending key itself where possible."""
    path = list(err.absolute_path)
    if err.validator == "required":
        m = re.match(r"'(.+)' is a required property", err.message)
        return f"{_path(path + [m.group(1) if m else '?'])}: required key is missing"
    if err.validator == "additionalProperties":
        extra = re.findall(r"'([^']+)'", err.message.split("(", 1)[-1])
        return "; ".join(f"{_path(path + [k])}: unknown key (not in Ray's cluster schema)" for k in extra or ["?"])
    return f"{_path(path) or '<top level>'}: {err.message}"


def _path(parts: list) -> str:
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out


# ---------------------------------------------------------------- KubeRay manifests
def check_kuberay(doc: Any, index: int | None, source: str) -> str | None:
    """Check one manifest; return its kind, or None for a non-Ray document (e.g. a ConfigMap) that is skipped."""
    src = f"{source} (document {index + 1})" if index is not None else source
    if not isinstance(doc, dict):
        raise ConfigError("each document must be a mapping", src)
    api, kind = doc.get("apiVersion"), doc.get("kind")
    if index is not None and isinstance(api, str) and not api.startswith("ray.io/"):
        return None
    problems: list[str] = []
    if not isinstance(api, str) or not api.startswith("ray.io/"):
        problems.append(f"apiVersion: expected ray.io/v1, got {api!r}")
    name = (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None
    if not isinstance(name, str) or not name:
        problems.append("metadata.name: required key is missing")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        problems.append("spec: required mapping is missing")
    elif kind == "RayCluster":
        problems += _ray_cluster_spec(spec, "spec")
    elif kind == "RayJob":
        problems += _ray_job_spec(spec)
    else:
        problems.append(f"kind: expected RayCluster or RayJob, got {kind!r}")
    if problems:
        raise ConfigError(problems, src)
    return kind


def _ray_job_spec(spec: dict) -> list[str]:
    problems = []
    if not isinstance(spec.get("entrypoint"), str) or not spec["entrypoint"].strip():
        problems.append("spec.entrypoint: required key is missing (the command the job runs)")
    has_spec, has_sel = "rayClusterSpec" in spec, "clusterSelector" in spec
    if has_spec == has_sel:
        problems.append("spec.rayClusterSpec: give exactly one of rayClusterSpec (new cluster) or clusterSelector")
    elif has_spec:
        rcs = spec["rayClusterSpec"]
        problems += _ray_cluster_spec(rcs, "spec.rayClusterSpec") if isinstance(rcs, dict) else [
            "spec.rayClusterSpec: must be a mapping"]
    elif not isinstance(spec["clusterSelector"], dict) or not spec["clusterSelector"]:
        problems.append("spec.clusterSelector: must be a non-empty mapping of labels")
    return problems


def _ray_cluster_spec(spec: dict, at: str) -> list[str]:
    problems = _group(spec.get("headGroupSpec"), f"{at}.headGroupSpec")
    groups = spec.get("workerGroupSpecs")
    if not isinstance(groups, list):
        return problems + [f"{at}.workerGroupSpecs: required list is missing"]
    for i, g in enumerate(groups):
        where = f"{at}.workerGroupSpecs[{i}]"
        problems += _group(g, where)
        if isinstance(g, dict):
            if not isinstance(g.get("groupName"), str) or not g["groupName"]:
                problems.append(f"{where}.groupName: required key is missing")
            counts = {k: g.get(k) for k in ("replicas", "minReplicas", "maxReplicas") if k in g}
            problems += [f"{where}.{k}: must be an integer >= 0, got {v!r}" for k, v in counts.items()
                         if not isinstance(v, int) or v < 0]
            lo, hi = counts.get("minReplicas"), counts.get("maxReplicas")
            if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
                problems.append(f"{where}.minReplicas: {lo} > maxReplicas {hi}")
    return problems


def _group(g: Any, where: str) -> list[str]:
    if not isinstance(g, dict):
        return [f"{where}: required mapping is missing"]
    problems = [] if isinstance(g.get("rayStartParams"), dict) else [f"{where}.rayStartParams: required mapping "
                                                                     "is missing (may be {})"]
    tmpl = g.get("template")
    pod = tmpl.get("spec") if isinstance(tmpl, dict) else None
    containers = pod.get("containers") if isinstance(pod, dict) else None
    if not isinstance(containers, list) or not containers:
        return problems + [f"{where}.template.spec.containers: required non-empty list is missing"]
    for j, c in enumerate(containers):
        if not isinstance(c, dict) or not isinstance(c.get("image"), str) or not c["image"]:
            problems.append(f"{where}.template.spec.containers[{j}].image: required key is missing")
    return problems
