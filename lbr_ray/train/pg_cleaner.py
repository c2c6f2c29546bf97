"""Ray Train's placement-group cleaner, made to work on an embedded Ray (and on a machine running several Rays).

Ray Train 2.60 starts a detached PlacementGroupCleaner actor per run that removes the run's placement group if the
controller dies. It asks whether the controller is alive through the State API (`ray.util.state.get_actor` with no
address), which (1) does not use the cluster the actor belongs to but auto-detects "the" local cluster (RAY_ADDRESS,
/tmp/ray/ray_current_cluster written by `ray start`, else a scan for GCS processes: "Found multiple active Ray
instances" as soon as two Rays run on the machine) and (2) needs the dashboard's HTTP server, which lbr's embedded
Ray does not start. So every query failed, once per second for the whole run ("Failed to query Ray Train Controller
actor state" 150 times in `make demo`), and the cleaner could never do its job. Here the cleaner asks the GCS of
its own cluster directly (`ray._private.state.actors`, a few ms), which needs neither.
"""
from __future__ import annotations

from ray.train.torch import TorchTrainer

try:
    from ray.train.v2._internal.callbacks import placement_group_callback as _callback_module
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.execution.controller import placement_group_cleaner as _cleaner_module
    from ray.train.v2._internal.execution.controller.placement_group_cleaner import PlacementGroupCleaner
except ImportError:  # another Ray release: keep its own cleaner
    PlacementGroupCleanerCallback = PlacementGroupCleaner = None


def gcs_actor_alive(actor_id: str, timeout: float | None = None) -> bool:
    """Whether the actor is alive, from the GCS of the cluster this process is connected to."""
    from ray._private.state import actors

    info = actors(actor_id=actor_id)
    return bool(info) and info.get("State") != "DEAD"


if PlacementGroupCleaner is not None:
    class GcsPlacementGroupCleaner(PlacementGroupCleaner):
        """The cleaner with a GCS liveness check (patched into its own detached actor process only)."""

        def start_monitoring(self):
            _cleaner_module.is_actor_alive = gcs_actor_alive
            return super().start_monitoring()

    class GcsPlacementGroupCleanerCallback(PlacementGroupCleanerCallback):
        """Launches GcsPlacementGroupCleaner instead of Ray's cleaner (runs in the Train controller process)."""

        def after_controller_start(self, train_run_context):
            _callback_module.PlacementGroupCleaner = GcsPlacementGroupCleaner
            super().after_controller_start(train_run_context)


class LbrTorchTrainer(TorchTrainer):
    """TorchTrainer whose placement-group cleaner checks the controller through the GCS (see the module doc)."""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if PlacementGroupCleaner is None:
            return callbacks
        return [GcsPlacementGroupCleanerCallback() if type(c) is PlacementGroupCleanerCallback else c
                for c in callbacks]
