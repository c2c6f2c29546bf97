"""Placement groups of stopped trials: record them, remove them.

A Ray Train run reserves its workers' CPUs/GPUs in a placement group created by its TrainController actor. When
Tune stops a trial early (ASHA) or the sweep is interrupted, the trial actor is killed, and with it the controller
before it can remove the group. Ray removes a group only once its creator actor *and* the job are gone. Ray
Train's detached PlacementGroupCleaner (made to work on an embedded Ray by lbr_ray/train/pg_cleaner.py) removes it
on its next poll; this module does it at once, at the sweep's own decision points, so that the next trial never
waits for the freed CPUs: every Train worker records its group in <trial>/placement_groups.txt, and the sweep
removes the recorded groups of every trial that Tune stopped, and after the sweep loop ends.
"""
from __future__ import annotations

import logging
from pathlib import Path

import ray
from ray import tune
from ray.train.v2._internal.execution.callback import WorkerCallback

log = logging.getLogger("lbr_ray")
RECORD = "placement_groups.txt"
LIVE = ("PENDING", "PREPARED", "CREATED", "RESCHEDULING")


class RecordPlacementGroup(WorkerCallback):
    """Runs in each Train worker: rank 0 appends its placement group id to `<folder>/placement_groups.txt`."""

    def __init__(self, folder: str | Path):
        self.folder = str(folder)

    def after_init_train_context(self):
        pg = ray.util.get_current_placement_group()
        if pg is not None and ray.train.get_context().get_world_rank() == 0:
            with open(Path(self.folder) / RECORD, "a") as fh:
                fh.write(pg.id.hex() + "\n")


def remove_recorded(folder: Path) -> int:
    """Remove the still-live placement groups recorded under `folder` (recursively); returns how many."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    removed = 0
    for record in Path(folder).rglob(RECORD):
        for hex_id in dict.fromkeys(record.read_text().split()):
            pg = PlacementGroup(PlacementGroupID.from_hex(hex_id))
            try:
                if placement_group_table(pg).get("state") in LIVE:
                    remove_placement_group(pg)
                    removed += 1
            except Exception as exc:  # noqa: BLE001 - best effort: never fail a sweep over cleanup
                log.warning("could not remove placement group %s: %s", hex_id, exc)
    if removed:
        print(f"[lbr] tune: released {removed} placement group(s) of stopped trials under {folder}", flush=True)
    return removed


class ReleaseStoppedTrials(tune.Callback):
    """Tune callback (driver side): when a trial ends (completed, stopped by ASHA, failed), remove the placement
    groups its Train runs left behind. A trial that finished normally has none left."""

    def __init__(self, trials_dir: str | Path):
        self.trials_dir = str(trials_dir)

    def _release(self, trial) -> None:
        folder = Path(self.trials_dir) / (getattr(trial, "custom_dirname", None) or str(trial))
        if folder.is_dir():
            remove_recorded(folder)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._release(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._release(trial)


__all__ = ["RecordPlacementGroup", "ReleaseStoppedTrials", "remove_recorded"]
