"""The quiet console: messages Ray pushes to a driver go to the run's log, not to stdout."""
from __future__ import annotations

import logging

import ray._private.worker as ray_worker

from lbr_ray.train import console


def test_ray_pushed_messages_go_to_the_log_not_stdout(monkeypatch, capsys):
    # The listener thread of a driver prints pushed messages through this module-level name (a Ray upgrade that
    # renames it would bring the coloured "(raylet) ..." lines back to the console).
    assert "print_to_stdstream" in ray_worker.listen_error_messages.__code__.co_names
    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)  # restored afterwards
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("ray").addHandler(handler)
    try:
        console.pushed_messages_to_log()
        ray_worker.print_to_stdstream({"lines": ["WARNING: 6 PYTHON worker processes have been started"],
                                       "pid": "raylet", "is_err": False}, ignore_prefix=False)
    finally:
        logging.getLogger("ray").removeHandler(handler)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert [r.getMessage() for r in records] == ["(raylet) WARNING: 6 PYTHON worker processes have been started"]
