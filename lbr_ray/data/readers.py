"""Read pairs/corpus records from files, directories or globs of shards, with file:line errors (no Ray).

Formats: `.jsonl`, `.jsonl.gz`, `.json` (JSON lines), `.parquet` (line = 1-based row number).
Bad records raise DataError(path, line) or, with on_bad="skip", are counted in a BadRecords tally.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lbr_ray.data.schema import CHECKS
from lbr_ray.errors import DataError

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


@dataclass
class BadRecords:
    """Records skipped with on_bad='skip': how many per file, and the first few reasons."""

    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, err: DataError) -> None:
        self.counts[err.path] += 1
        if len(self.examples) < 5:
            self.examples.append(str(err))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def resolve_paths(specs: str | list[str] | tuple[str, ...], kind: str = "pairs") -> list[str]:
    """Expand files, directories (all supported shards inside, sorted) and globs; error if nothing matches."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    out: list[str] = []
    for spec in specs:
        p = Path(os.path.expanduser(spec))
        if p.is_dir():  # a domain folder: its `pairs*` / `corpus*` files if any, else every shard inside
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.name.endswith(SUFFIXES))
            if any(Path(f).name.startswith(("pairs", "corpus")) for f in found):
                found = [f for f in found if Path(f).name.startswith(kind)]
        elif any(ch in spec for ch in "*?["):
            found = sorted(f for f in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(f))
        elif p.is_file():
            found = [str(p)]
        else:
            raise DataError(spec, None, f"{kind} path does not exist")
        if not found:
            raise DataError(spec, None, f"no {kind} files ({', '.join(SUFFIXES)}) found")
        for f in found:
            if not f.endswith(SUFFIXES):
                raise DataError(f, None, f"unsupported file type; use one of {', '.join(SUFFIXES)}")
        out += found
    return list(dict.fromkeys(out))


def iter_raw(path: str) -> Iterator[tuple[int, object]]:
    """Yield (line number, parsed object or DataError) for every non-blank line/row of one file."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield i, row
        return
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as raw:
            for i, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8", errors="strict"), start=1):
                if not line.strip():
                    continue
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as e:
                    yield i, DataError(path, i, f"broken JSON ({e.msg} at column {e.colno})")
    except UnicodeDecodeError as e:
        yield -1, DataError(path, None, f"not UTF-8 text ({e.reason})")
    except (OSError, EOFError) as e:
        yield -1, DataError(path, None, f"cannot read file ({e})")


def iter_records(path: str, kind: str, on_bad: str = "error", bad: BadRecords | None = None) -> Iterator[dict]:
    """Yield checked records of one file, each with `_file` and `_line` for later error messages."""
    check = CHECKS[kind]
    for line, obj in iter_raw(path):
        if isinstance(obj, DataError):
            err = obj
        else:
            try:
                record = check(obj)
            except ValueError as e:
                err = DataError(path, line, f"bad {kind} record: {e}")
            else:
                record["_file"], record["_line"] = path, line
                yield record
                continue
        if on_bad == "error":
            raise err
        if bad is not None:
            bad.add(err)


def read_all(specs, kind: str, on_bad: str = "error", bad: BadRecords | None = None) -> Iterator[dict]:
    for path in resolve_paths(specs, kind):
        yield from iter_records(path, kind, on_bad, bad)
