"""Checkpoint manifests (no Ray but the resume test): written last from the ranks' file lists, checked at resume; a
truncated, partly deleted or damaged checkpoint is named in one line and the previous complete one is used."""
from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
from pyarrow import fs as pafs

from lbr_ray.train import manifest

LOCAL = pafs.LocalFileSystem()


def fake_checkpoint(stage: Path, name: str, step: int, ranks: int = 2) -> Path:
    """What Ray leaves after every rank uploaded its folder: DS shards per rank, rank 0's HF folder and state."""
    out = stage / name
    for rank in range(ranks):
        local = stage / f"tmp-{name}-{rank}"
        (local / "ds" / "state").mkdir(parents=True)
        (local / "ds" / "state" / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(bytes([rank]) * (1000 + step))
        if rank == 0:
            (local / "hf").mkdir()
            (local / "hf" / "model.safetensors").write_bytes(b"w" * 500)
            (local / "state.json").write_text(json.dumps({"step": step}))
        manifest.write_rank_files(local, rank)
        for f in local.rglob("*"):  # the "upload": merge into the checkpoint folder
            if f.is_file():
                dest = out / f.relative_to(local)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(f.read_bytes())
    return out


@pytest.fixture
def stage(tmp_path) -> Path:
    s = tmp_path / "ib_gl"
    for i, step in enumerate((4, 8, 12)):
        ck = fake_checkpoint(s, f"checkpoint_2026-12-01_22-0{i}-00.000000", step)
        assert manifest.write_manifest(LOCAL, str(ck), {"step": step})["files"]
    return s


def latest(stage: Path) -> str:
    return str(sorted(stage.glob("checkpoint_*"))[-1])


@contextmanager
def downloaded(folder: str):
    """A copy of the checkpoint elsewhere, as Ray's Checkpoint.as_directory makes of a remote one."""
    copy = Path(folder).parent / "downloads" / Path(folder).name
    shutil.copytree(folder, copy)
    try:
        yield str(copy)
    finally:
        shutil.rmtree(copy)


def newest_complete(latest_folder: str) -> tuple[str | None, list[str]]:
    with manifest.newest_complete(LOCAL, latest_folder, downloaded) as (chosen, local, skipped):
        assert (local is None) == (chosen is None) and (local is None or local.is_dir())
        return chosen, skipped


def test_complete_checkpoint_is_used(stage):
    chosen, skipped = newest_complete(latest(stage))
    assert chosen == latest(stage) and skipped == []
    assert manifest.hash_problem(Path(chosen)) is None
    files = json.loads((Path(chosen) / "manifest.json").read_text())["files"]
    assert {"ds/state/zero_pp_rank_0_optim_states.pt", "ds/state/zero_pp_rank_1_optim_states.pt",
            "hf/model.safetensors", "state.json"} <= set(files)


def test_truncated_file_falls_back_to_the_previous_checkpoint(stage):
    newest = Path(latest(stage))
    shard = newest / "ds" / "state" / "zero_pp_rank_1_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])
    chosen, skipped = newest_complete(str(newest))
    assert chosen == str(sorted(stage.glob("checkpoint_*"))[-2])
    assert skipped == [f"{newest.name} is incomplete (ds/state/zero_pp_rank_1_optim_states.pt has 100 bytes, "
                       "the manifest says 1012)"]


def test_deleted_file_and_missing_manifest_fall_back_twice(stage):
    ckpts = sorted(stage.glob("checkpoint_*"))
    (ckpts[-1] / "hf" / "model.safetensors").unlink()
    (ckpts[-2] / "manifest.json").unlink()
    chosen, skipped = newest_complete(str(ckpts[-1]))
    assert chosen == str(ckpts[0])
    assert "hf/model.safetensors is missing" in skipped[0] and "no manifest.json" in skipped[1]


def test_no_complete_checkpoint(stage):
    for ck in stage.glob("checkpoint_*"):
        (ck / "state.json").write_text("{}")
    chosen, skipped = newest_complete(latest(stage))
    assert chosen is None and len(skipped) == 3


def test_same_size_corruption_is_caught_by_the_hash(stage):
    state = Path(latest(stage)) / "state.json"
    state.write_text(state.read_text().replace("12", "99"))
    assert manifest.problem(LOCAL, latest(stage)) is None  # sizes agree
    assert "state.json does not match its sha256" in manifest.hash_problem(Path(latest(stage)))


def test_resume_passes_a_damaged_newest_checkpoint_of_the_same_size(stage, monkeypatch, capsys):
    """Issue 21.5: the hash was checked after the fallback loop, so a newest checkpoint corrupted without changing
    its size stopped the resume (and every automatic restart) although the one before it was complete."""
    import ray.train

    from lbr_ray.train import worker
    from lbr_ray.train.checkpoint import LoopState

    ckpts = sorted(stage.glob("checkpoint_*"))
    shard = ckpts[-1] / "ds" / "state" / "zero_pp_rank_0_optim_states.pt"
    shard.write_bytes(b"\xff" * shard.stat().st_size)  # same size, other bytes
    reports = []
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint(str(ckpts[-1])))
    monkeypatch.setattr(ray.train, "report", reports.append)
    monkeypatch.setattr(worker.ckpt, "load", lambda engine, d, rank: LoopState(
        step=json.loads((Path(d) / "state.json").read_text())["step"]))
    run = worker.WorkerRun.__new__(worker.WorkerRun)
    run.rank, run.stage = 0, "ib_gl"
    assert run.resume(engine=None).step == 8 and reports[0]["resumed_at_step"] == 8
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[lbr]")]
    assert lines == [f"[lbr] ib_gl: {ckpts[-1].name} is damaged (ds/state/zero_pp_rank_0_optim_states.pt does not "
                     f"match its sha256 in the manifest): resuming from {ckpts[-2].name}"]


def test_no_manifest_when_a_ranks_upload_is_short(tmp_path):
    ck = fake_checkpoint(tmp_path / "s", "checkpoint_x", 4)
    (ck / "ds" / "state" / "zero_pp_rank_0_optim_states.pt").unlink()
    assert manifest.write_manifest(LOCAL, str(ck)) is None and not (ck / "manifest.json").exists()


def test_max_failures_reach_train_and_tune():
    """run.max_failures -> Ray Train's FailureConfig; Tune retries trials likewise unless tune.max_failures says."""
    from lbr_ray.config import load_config
    from lbr_ray.train.launcher import max_failures
    from lbr_ray.tune.search import trial_failures

    cfg = load_config("configs/demo.yaml", ["run.max_failures=2"])
    assert max_failures(cfg) == 2 and trial_failures(cfg) == 2
    assert trial_failures(load_config("configs/demo.yaml", ["run.max_failures=2", "tune.max_failures=0"])) == 0
    with pytest.raises(Exception, match="run.max_failures must be >= -1"):
        load_config("configs/demo.yaml", ["run.max_failures=-5"])
