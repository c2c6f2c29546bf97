"""A quiet console for `lbr train` (no Ray): lbr's progress, metrics, own warnings and errors; everything else to
the run's log files (`--verbose` brings Ray's and the libraries' output back to the console).

Where things go in a quiet run (RUN = run.output, STAGE = ib_gl | gr_cl):
- RUN/STAGE/console.log      lbr's messages from the Train workers (rank 0's progress, metrics and warnings, any rank's
                             errors); the driver prints its new lines while the stage runs
- RUN/STAGE/logs/rank<N>.log everything else a Train worker prints (DeepSpeed, transformers, Ray Train, torch)
- RUN/logs/driver.log        Ray's driver-side log records (warnings included)
- RUN/logs/ray               link to the embedded Ray's session logs (controller, Ray Data, raylet, GCS)
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

CONSOLE_LOG = "console.log"
log = logging.getLogger("lbr_ray")


def worker_console(stage_dir: Path, rank: int, quiet: bool) -> None:
    """In a Train worker: lbr's log records go to STAGE/console.log (rank 0 from INFO, other ranks' errors);
    when quiet, the process's stdout/stderr (file descriptors 1 and 2) go to STAGE/logs/rank<N>.log."""
    handler = logging.FileHandler(stage_dir / CONSOLE_LOG)
    handler.setLevel(logging.INFO if rank == 0 else logging.ERROR)  # rank 0 warns for all (metrics are global)
    handler.setFormatter(logging.Formatter("[lbr] %(message)s" if rank == 0 else f"[lbr] rank {rank}: %(message)s"))
    for old in [h for h in log.handlers if getattr(h, "_lbr_console", False)]:
        log.removeHandler(old)
    handler._lbr_console = True
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = not quiet  # quiet: not also through Ray Train's root console handler
    if quiet:
        logs = stage_dir / "logs"
        logs.mkdir(exist_ok=True)
        redirect_output(logs / f"rank{rank}.log")


def redirect_output(path: Path) -> None:
    """Point this process's stdout and stderr (Python and C level, e.g. DeepSpeed's prints) at `path`."""
    sys.stdout.flush(), sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1), os.dup2(fd, 2)
    os.close(fd)


def quiet_driver(output: Path) -> Path:
    """Driver side: Ray's log records to RUN/logs/driver.log, only errors on the console. Returns the log folder."""
    logs = output / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(logs / "driver.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logger = logging.getLogger(name)
        for h in logger.handlers:  # Ray Data logs a failed task's traceback at ERROR; lbr reports the error itself
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setLevel(logging.ERROR if name == "ray" else logging.CRITICAL)
        if name == "ray" or not logger.propagate:
            logger.addHandler(handler)
    ray_logger = logging.getLogger("ray")
    if not any(type(h) is logging.StreamHandler for h in ray_logger.handlers):
        console = logging.StreamHandler()
        console.setLevel(logging.ERROR)
        ray_logger.addHandler(console)
    ray_logger.setLevel(logging.INFO)
    ray_logger.propagate = False
    logging.captureWarnings(True)  # Python warnings (e.g. Ray Data's UserWarnings) to the file too
    warn_logger = logging.getLogger("py.warnings")
    warn_logger.addHandler(handler)
    warn_logger.propagate = False
    pushed_messages_to_log()
    return logs


def pushed_messages_to_log() -> None:
    """The messages Ray's raylets push to a driver ("(raylet) WARNING: N PYTHON worker processes have been
    started ...", a killed worker) are printed to stdout in colour whatever `log_to_driver` says: Ray's listener
    thread calls `ray._private.worker.print_to_stdstream` for them (the only caller left when log_to_driver is off).
    Send them to the "ray" logger, i.e. RUN/logs/driver.log; a failure that matters reaches lbr as an exception."""
    import ray._private.worker as ray_worker

    def to_log(data: dict, ignore_prefix: bool = False) -> None:
        for line in data.get("lines", []):
            logging.getLogger("ray").warning("(%s) %s", data.get("pid", "ray"), line)

    ray_worker.print_to_stdstream = to_log


def link_ray_logs(logs: Path) -> Path | None:
    """RUN/logs/ray -> the embedded Ray session's log folder (kept by Ray after shutdown)."""
    try:
        import ray

        session = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    except Exception:  # noqa: BLE001 - not an embedded Ray (connected to a cluster): nothing local to link
        return None
    link = logs / "ray"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(session, target_is_directory=True)
    return session


class Follow:
    """Print the new complete lines of a growing file (the stage's console.log) while a stage runs."""

    def __init__(self, path: Path, interval: float = 0.5, out=None):
        self.path, self.interval, self.out = Path(path), interval, out or sys.stdout
        self.pos, self.buf = 0, b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lbr-console", daemon=True)

    def __enter__(self) -> "Follow":
        if self.path.exists():
            self.pos = self.path.stat().st_size  # a resumed stage: show only what this run adds
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()
        if self.buf:
            self._emit(self.buf + b"\n")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.pos)
                data = fh.read()
        except FileNotFoundError:
            return
        self.pos += len(data)
        self.buf += data
        if b"\n" in self.buf:
            done, self.buf = self.buf.rsplit(b"\n", 1)
            self._emit(done + b"\n")

    def _emit(self, data: bytes) -> None:
        self.out.write(data.decode("utf-8", "replace"))
        self.out.flush()

