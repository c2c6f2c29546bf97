"""Checkpoints that cannot be half-read: a manifest of every file's size and sha256, written last (no Ray).

1. Each rank lists the files it wrote (`files.rank<R>.json`: size + sha256) before Ray uploads its folder.
2. Once every rank has reported, the Train controller (`ManifestWriter` in launcher.py) checks those files on the
   storage and writes `manifest.json` into the persisted checkpoint: the last file written, so a checkpoint
   without it never finished.
3. At resume, `newest_complete` checks the latest checkpoint (manifest present, every file there with its size,
   then the hashes of the downloaded copy) and falls back to the previous complete, undamaged one, naming what is
   wrong with each one it skips.
"""
from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ContextManager

from lbr_ray.storage import sha256

MANIFEST = "manifest.json"
RANK_FILES = "files.rank{}.json"


def write_rank_files(folder: Path, rank: int) -> None:
    """List the files of this rank's checkpoint folder (relative path -> size, sha256) before it is uploaded."""
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith("files.rank")}
    (folder / RANK_FILES.format(rank)).write_text(json.dumps(files))


def _read_json(fs, path: str) -> dict:
    with fs.open_input_stream(path) as fh:
        return json.loads(fh.read())


def _sizes(fs, folder: str) -> dict[str, int]:
    from pyarrow import fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=True))
    return {posixpath.relpath(i.path, folder): i.size for i in infos if i.type == pafs.FileType.File}


def write_manifest(fs, folder: str, meta: dict | None = None) -> dict | None:
    """Merge the ranks' file lists of a persisted checkpoint, check them on the storage, write manifest.json
    last. Returns the manifest, or None (nothing written) when a listed file is missing or has another size."""
    on_storage = _sizes(fs, folder)
    files: dict[str, dict] = {}
    for name in sorted(n for n in on_storage if n.startswith("files.rank")):
        files.update(_read_json(fs, posixpath.join(folder, name)))
    if not files or any(on_storage.get(name) != f["size"] for name, f in files.items()):
        return None
    manifest = {"complete": True, "files": files, **(meta or {})}
    with fs.open_output_stream(posixpath.join(folder, MANIFEST)) as fh:
        fh.write(json.dumps(manifest, indent=1).encode())
    return manifest


def problem(fs, folder: str) -> str | None:
    """Why the checkpoint on the storage is incomplete (no manifest, a file missing or of another size), or None."""
    on_storage = _sizes(fs, folder)
    if MANIFEST not in on_storage:
        return "no manifest.json (it was never finished)"
    try:
        files = _read_json(fs, posixpath.join(folder, MANIFEST))["files"]
    except (OSError, ValueError, KeyError):
        return "unreadable manifest.json"
    for name, f in files.items():
        if name not in on_storage:
            return f"{name} is missing"
        if on_storage[name] != f["size"]:
            return f"{name} has {on_storage[name]} bytes, the manifest says {f['size']}"
    return None


def hash_problem(local: Path) -> str | None:
    """The downloaded copy's files against the manifest's sha256 (catches corruption that kept the size)."""
    try:
        files = json.loads((local / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return "unreadable manifest.json"
    for name, f in files.items():
        p = local / name
        if not p.is_file():
            return f"{name} is missing"
        if sha256(p) != f["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None


def candidates(fs, latest: str) -> list[str]:
    """`latest` first, then the older checkpoint folders next to it, newest first (Ray names them by time)."""
    from pyarrow import fs as pafs

    parent, name = posixpath.split(latest.rstrip("/"))
    infos = fs.get_file_info(pafs.FileSelector(parent))
    older = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory
                    and i.base_name.startswith("checkpoint_") and i.base_name < name), reverse=True)
    return [latest] + [posixpath.join(parent, n) for n in older]


@contextmanager
def newest_complete(fs, latest: str, local_copy: Callable[[str], ContextManager[str | Path]]
                    ) -> Iterator[tuple[str | None, Path | None, list[str]]]:
    """The newest checkpoint at or before `latest` whose files are all on the storage with their sizes and whose
    local copy matches the manifest's hashes: (folder, its local copy, one line per checkpoint skipped), or (None,
    None, lines) if there is none. `local_copy(folder)`: a context manager giving a local copy of a checkpoint folder
    (Ray's Checkpoint.as_directory), which stays while the caller's block runs."""
    skipped = []
    for folder in candidates(fs, latest):
        name = posixpath.basename(folder)
        why = problem(fs, folder)
        if why is not None:
            skipped.append(f"{name} is incomplete ({why})")
            continue
        with local_copy(folder) as local:
            why = hash_problem(Path(local))
            if why is None:
                yield folder, Path(local), skipped
                return
        skipped.append(f"{name} is damaged ({why})")
    yield None, None, skipped
