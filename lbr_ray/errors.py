"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""
from __future__ import annotations


class LbrError(Exception):
    """Base class: the message says what went wrong and what to do."""


class ConfigError(LbrError):
    """A config file, an override or a CLI option is invalid; lists every problem at once."""

    def __init__(self, problems: list[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        head = f"invalid config {source}: " if source else "invalid config: "
        super().__init__(head + "; ".join(self.problems))


class DataError(LbrError):
    """A data record is malformed; carries the file and the 1-based line (or row) number."""

    def __init__(self, path: str, line: int | None, reason: str):
        self.path, self.line, self.reason = str(path), line, reason
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # survive pickling through Ray tasks
        return (DataError, (self.path, self.line, self.reason))


class CheckpointError(LbrError):
    """A checkpoint is missing, incomplete or of the wrong kind."""


class MaskLeakError(LbrError):
    """The information-bottleneck mask lets target tokens see input tokens (run-start self-check)."""


def find_lbr_error(exc: BaseException) -> LbrError | None:
    """Find the LbrError behind an exception re-raised by Ray (task, Data or Train wrappers)."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, LbrError):  # Ray's RayTaskError(DataError) subclasses the error: prefer its clean cause
            cause = getattr(e, "cause", None)
            return cause if isinstance(cause, LbrError) else e
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        failures = getattr(e, "worker_failures", None) or {}
        stack += list(failures.values()) if isinstance(failures, dict) else list(failures)
        for attr in ("error", "_error", "training_failed_error"):
            inner = getattr(e, attr, None)
            if isinstance(inner, BaseException):
                stack.append(inner)
    return None
