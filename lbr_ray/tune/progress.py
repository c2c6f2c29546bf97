"""The quiet console of `lbr tune` and `lbr study`: one line per trial as it starts and ends, printed by the driver
(the trials' own output and Ray's go to the log files, as for `lbr train`)."""
from __future__ import annotations

import time
from typing import Callable

from ray import tune


class TrialLines(tune.Callback):
    """`[lbr] study: cell 3 of 12 (gl-cl seed 1) done in 352 s: test_medical_recall@10 0.2850 ...`"""

    def __init__(self, command: str, total: int, describe: Callable[[dict], str]):
        self.command, self.total, self.describe = command, total, describe
        self.started: dict[str, float] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started[trial.trial_id] = time.time()
        print(f"[lbr] {self.command}: {self.describe(trial.config)} started ({len(self.started)} this session, "
              f"{self.total} in all)", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        metrics = "  ".join(f"{k} {v:.4f}" for k, v in sorted(result.items())
                            if k.startswith(("test_", "dev_")) and isinstance(v, (int, float)))
        print(f"[lbr] {self.command}: {self.describe(trial.config)} done in {self._elapsed(trial)}: "
              f"{metrics or 'no metrics'}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[lbr] {self.command}: {self.describe(trial.config)} failed after {self._elapsed(trial)}; the error: "
              f"{trial.error_file or trial.path}", flush=True)

    def _elapsed(self, trial) -> str:
        return f"{time.time() - self.started.get(trial.trial_id, time.time()):.0f} s"


__all__ = ["TrialLines"]
