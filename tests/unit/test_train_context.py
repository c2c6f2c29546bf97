"""`lbr train` ends with the model's dev R@10 next to BM25's on the same dev set."""
from __future__ import annotations


def test_bm25_context_line_compares_on_the_same_dev_set():
    import numpy as np

    from lbr_ray.eval.sets import EvalSet
    from lbr_ray.recipes.pipeline import bm25_context

    docs = [f"passage about topic{i} and its word{i}" for i in range(30)]
    queries = [f"what is topic{i}?" for i in range(10)]
    dev = EvalSet("d", queries, ["qa"] * 10, ["hard"] * 10, [np.array([i]) for i in range(10)], [str(i) for i in
              range(30)], docs)
    ctx = bm25_context(0.25, dev)
    assert ctx["bm25_dev_recall@10"] == 1.0  # each query's one distinctive word is only in its passage
    assert "0.250 for this model vs 1.000 for BM25" in ctx["line"] and "does not beat" in ctx["line"]
    assert "10 dev queries and 30 passages" in ctx["line"]


def test_worker_threads_split_the_embedded_machine_among_workers(monkeypatch):
    """Issue 11: Ray gives each Train worker OMP_NUM_THREADS = floor(cpus_per_worker), so a 1-worker run on a
    2-core machine trained on 1 core; on the Ray lbr starts itself the workers now share the machine's cores."""
    import os

    from lbr_ray.config import load_config
    from lbr_ray.train.launcher import worker_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    cfg = load_config("configs/demo.yaml", ["scaling.num_workers=3"])
    assert worker_threads(cfg, embedded=True) == 2
    assert worker_threads(cfg, embedded=False) is None  # a cluster or a Tune trial: Ray's default
    assert worker_threads(load_config("configs/demo.yaml", ["scaling.threads_per_worker=5"]), embedded=False) == 5
    assert worker_threads(load_config("configs/demo.yaml", ["scaling.num_workers=16"]), embedded=True) == 1


def test_embedded_ray_is_started_with_room_for_ray_data(monkeypatch):
    """Without an address, lbr starts its own Ray with logical CPUs for the Train workers plus Ray Data's tokenizer
    actors (a merge once left this ray.init unreachable: Ray auto-started with the machine's 2 CPUs, the two Train
    workers took both and a CLI run hung before its first batch). With an address it only joins."""
    import ray

    from lbr_ray.config import load_config
    from lbr_ray.train import launcher

    calls = []
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config("configs/demo.yaml", ["scaling.num_workers=2"])
    assert launcher._init_ray(cfg, None) is True
    assert len(calls) == 1 and calls[0]["num_cpus"] >= 2 * cfg.scaling.cpus_per_worker + 2
    assert calls[0]["include_dashboard"] is False
    assert launcher._init_ray(cfg, "127.0.0.1:6379") is False and calls[1] == {
        "address": "127.0.0.1:6379", "log_to_driver": True, "logging_level": calls[1]["logging_level"]}


def test_ray_train_collects_reports_every_half_second_unless_the_user_chose(monkeypatch):
    """Issue 11: a Train worker holds one uncollected report at a time and Ray Train's controller collected them every
    2 s, so a stage logging more often trained at the pace of the polls. lbr sets the interval in the driver, where
    Ray Train reads what it passes on to its controller; a value the user set is kept."""
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    from lbr_ray.train.launcher import collect_reports_often

    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "")  # records the original state, restored after
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    collect_reports_often()
    assert get_env_vars_to_propagate()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")
    collect_reports_often()
    assert get_env_vars_to_propagate()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"
