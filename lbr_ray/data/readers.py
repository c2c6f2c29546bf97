"""Read pairs/corpus records from files, directories or globs of shards, with file:line errors (no Ray).

Formats: `.jsonl`, `.jsonl.gz`, `.json` (JSON lines), `.parquet` and the Arrow files of a Hugging Face
`save_to_disk` folder (line = 1-based row number); local paths or s3:// / gs:// URIs.
Bad records raise DataError(path, line) or, with on_bad="skip", are counted in a BadRecords tally.
"""
from __future__ import annotations

import glob
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lbr_ray.data.schema import CHECKS
from lbr_ray.errors import DataError
from lbr_ray.storage import file_info, is_remote, list_files, open_binary

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
    """Expand files, directories (all supported shards inside, sorted), globs, s3:// / gs:// URIs and Hugging Face
    `save_to_disk` folders (their Arrow files); error if nothing matches."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    out: list[str] = []
    for spec in specs:
        found = _resolve_remote(spec, kind) if is_remote(spec) else _resolve_local(spec, kind)
        if not found:
            raise DataError(spec, None, f"no {kind} files ({', '.join(SUFFIXES)}) found")
        for f in found:
            if not f.endswith(SUFFIXES + (".arrow",)):
                raise DataError(f, None, f"unsupported file type; use one of {', '.join(SUFFIXES)}")
        out += found
    return list(dict.fromkeys(out))


def _resolve_local(spec: str, kind: str) -> list[str]:
    p = Path(os.path.expanduser(spec))
    if p.is_dir():
        hf = hf_dataset_files(p)
        if hf is not None:
            return hf
        return _pick_kind(sorted(str(f) for f in p.rglob("*") if f.is_file() and f.name.endswith(SUFFIXES)), kind)
    if any(ch in spec for ch in "*?["):
        return sorted(f for f in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(f))
    if p.is_file():
        return [str(p)]
    raise DataError(spec, None, f"{kind} path does not exist")


def _resolve_remote(spec: str, kind: str) -> list[str]:
    from pyarrow import fs as pafs

    info = file_info(spec)
    if info.type == pafs.FileType.File:
        return [spec]
    if info.type == pafs.FileType.NotFound:
        raise DataError(spec, None, f"{kind} path does not exist")
    return _pick_kind([f for f in list_files(spec) if f.endswith(SUFFIXES)], kind)


def _pick_kind(found: list[str], kind: str) -> list[str]:
    """A domain folder: its `pairs*` / `corpus*` files if it has any, else every shard inside."""
    if any(Path(f).name.startswith(("pairs", "corpus")) for f in found):
        return [f for f in found if Path(f).name.startswith(kind)]
    return found


def hf_dataset_files(folder: Path) -> list[str] | None:
    """The Arrow files of a `datasets` save_to_disk folder (a Dataset, or every split of a DatasetDict), or None."""
    if (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file():
        state = json.loads((folder / "state.json").read_text())
        return [str(folder / f["filename"]) for f in state.get("_data_files", [])]
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        return [f for split in splits for f in hf_dataset_files(folder / split) or []]
    return None


def has_records(path: str) -> bool:
    """Whether a data file holds at least one non-blank line or row (an empty file is an error, never 'no data')."""
    if path.endswith((".parquet", ".arrow")):
        return any(True for _ in _iter_table(path))
    with open_binary(path) as raw:
        for _, line in _lines(raw, MAX_RECORD_BYTES):
            if line is None or line.strip():
                return True
    return False


MAX_RECORD_BYTES = 8 << 20  # default for data.max_record_bytes: longer lines are refused (is it JSON lines?)


def iter_raw(path: str, max_bytes: int = MAX_RECORD_BYTES) -> Iterator[tuple[int, object]]:
    """Yield (line number, parsed object or DataError) for every non-blank line/row of one file.

    Lines are decoded one by one, so invalid UTF-8 and over-long lines are reported with their own line number
    (and, with on_bad_record=skip, skip only that line); a line over `max_bytes` is never held in memory whole.
    """
    if path.endswith((".parquet", ".arrow")):
        yield from _iter_table(path)
        return
    try:
        with open_binary(path) as raw:
            for i, line in _lines(raw, max_bytes):
                if line is None:
                    yield i, DataError(path, i, f"line longer than data.max_record_bytes={max_bytes} bytes "
                                                "(one JSON record per line expected)")
                    continue
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield i, DataError(path, i, f"not UTF-8 text (byte {e.start + 1} of the line: {e.reason})")
                    continue
                if not text.strip():
                    continue
                try:
                    yield i, json.loads(text)
                except json.JSONDecodeError as e:
                    yield i, DataError(path, i, f"broken JSON ({e.msg} at column {e.colno})")
    except (OSError, EOFError) as e:
        yield -1, DataError(path, None, f"cannot read file ({e})")


def _lines(raw, limit: int) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, bytes) per line; None for a line over `limit` bytes (read past in 1 MiB chunks)."""
    i = 0
    while True:
        line = raw.readline(limit + 1)
        if not line:
            return
        i += 1
        if len(line) > limit and not line.endswith(b"\n"):
            while True:
                chunk = raw.readline(1 << 20)
                if not chunk or chunk.endswith(b"\n"):
                    break
            yield i, None
            continue
        yield i, line


def _iter_table(path: str) -> Iterator[tuple[int, object]]:
    """Rows of a parquet file or of an Arrow file of a Hugging Face `save_to_disk` folder (line = 1-based row)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.endswith(".parquet"):
            with open_binary(path) as fh:
                table = pq.read_table(fh)
        else:
            with open_binary(path) as fh:
                table = pa.ipc.open_stream(fh).read_all()
    except (OSError, pa.ArrowInvalid) as e:
        yield -1, DataError(path, None, f"cannot read table ({str(e).splitlines()[0]})")
        return
    row = 0
    for batch in table.to_batches(max_chunksize=4096):
        for record in batch.to_pylist():
            row += 1
            yield row, record


def iter_records(path: str, kind: str, on_bad: str = "error", bad: BadRecords | None = None,
                 max_bytes: int = MAX_RECORD_BYTES) -> Iterator[dict]:
    """Yield checked records of one file, each with `_file` and `_line` for later error messages. A small local
    file is parsed once per process (`_parsed`): a run's driver reads its data for the summary, stage 1, the dev
    set and stage 2, and every read after the first replays the same records and errors."""
    for line, item in _parsed(path, kind, max_bytes):
        if not isinstance(item, DataError):
            yield dict(item)  # a copy: callers may add fields
            continue
        if on_bad == "error":
            raise item
        if bad is not None:
            bad.add(item)


MEMO_BYTES = 32 << 20  # on-disk bytes of local files whose parsed records this process keeps
_memo: dict[tuple, list] = {}


def _parsed(path: str, kind: str, max_bytes: int) -> Iterator[tuple[int, dict | DataError]] | list:
    """(line, record or DataError) of a file: from this process's memo (local files, keyed by size and mtime, at
    most MEMO_BYTES on disk in all, oldest dropped first), else parsed as it streams."""
    key = None
    if not is_remote(path):
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if st is not None and st.st_size <= MEMO_BYTES:
            key = (os.path.abspath(path), kind, max_bytes, st.st_size, st.st_mtime_ns)
            if key in _memo:
                return _memo[key]
    items = _parse(path, kind, max_bytes)
    if key is None:
        return items
    items = list(items)
    while _memo and sum(k[3] for k in _memo) + key[3] > MEMO_BYTES:
        _memo.pop(next(iter(_memo)))
    _memo[key] = items
    return items


def _parse(path: str, kind: str, max_bytes: int) -> Iterator[tuple[int, dict | DataError]]:
    check = CHECKS[kind]
    for line, obj in iter_raw(path, max_bytes):
        if isinstance(obj, DataError):
            yield line, obj
            continue
        try:
            record = check(obj)
        except ValueError as e:
            yield line, DataError(path, line, f"bad {kind} record: {e}")
            continue
        record["_file"], record["_line"] = path, line
        yield line, record


def read_all(specs, kind: str, on_bad: str = "error", bad: BadRecords | None = None) -> Iterator[dict]:
    for path in resolve_paths(specs, kind):
        yield from iter_records(path, kind, on_bad, bad)
