"""Local paths and remote URIs (s3://, gs://) behind one small API, through pyarrow filesystems (no Ray).

    fs, path = filesystem("s3://bucket/runs/demo")     # pyarrow.fs.S3FileSystem, "bucket/runs/demo"
    with open_binary("s3://bucket/data/pairs.jsonl.gz") as fh: ...

S3 endpoint and credentials come from the usual AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION, AWS_ENDPOINT_URL for an S3-compatible server such as MinIO) or from `run.storage_endpoint` in the
config (exported as AWS_ENDPOINT_URL by `configure`). GCS uses the Google application-default credentials, or,
with STORAGE_EMULATOR_HOST set (the variable of Google's own clients and gcsfs), an emulator without credentials.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import posixpath
from pathlib import Path

from lbr_ray.errors import ConfigError

REMOTE = ("s3://", "gs://", "gcs://")
TIMEOUT_S = 10.0  # connect/request timeout: an unreachable endpoint fails in seconds, not after minutes of retries


def sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a local file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_root() -> Path:
    """lbr-ray's local cache folder: $LBR_CACHE, else $XDG_CACHE_HOME/lbr-ray, else ~/.cache/lbr-ray."""
    base = os.environ.get("LBR_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "lbr-ray")
    return Path(base).expanduser()


def is_remote(path: str | os.PathLike | None) -> bool:
    return str(path or "").startswith(REMOTE)


def configure(endpoint: str = "") -> None:
    """Make `run.storage_endpoint` the S3 endpoint of this process and of Ray workers started from it."""
    if endpoint:
        os.environ["AWS_ENDPOINT_URL"] = endpoint


def _s3(endpoint: str | None):
    from pyarrow import fs

    kwargs: dict = {"connect_timeout": TIMEOUT_S, "request_timeout": TIMEOUT_S,
                    "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=2)}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        kwargs["region"] = region
    return fs.S3FileSystem(**kwargs)


def _gcs(emulator: str | None):
    from datetime import timedelta

    from pyarrow import fs

    limit = timedelta(seconds=TIMEOUT_S)
    if not emulator:
        return fs.GcsFileSystem(retry_time_limit=limit)
    scheme, _, host = emulator.partition("://")
    return fs.GcsFileSystem(anonymous=True, endpoint_override=host or scheme, scheme=scheme if host else "http",
                            retry_time_limit=limit)


def filesystem(path: str | os.PathLike):
    """(pyarrow FileSystem, path inside it) for a local path or an s3:// / gs:// URI."""
    from pyarrow import fs

    path = str(path)
    if path.startswith("s3://"):
        return _s3(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")), path[5:].rstrip("/")
    if path.startswith(("gs://", "gcs://")):
        return _gcs(os.environ.get("STORAGE_EMULATOR_HOST")), path.split("://", 1)[1].rstrip("/")
    return fs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_remote(base) else str(Path(base, *parts))


def uri(fs_path: str, like: str) -> str:
    """The URI of `fs_path` (a path inside the filesystem of `like`)."""
    return like.split("://", 1)[0] + "://" + fs_path if is_remote(like) else fs_path


@contextlib.contextmanager
def open_binary(path: str):
    """A readable binary stream of a local file or a remote object; `.gz` files are decompressed."""
    if is_remote(path):
        fs, p = filesystem(path)
        stream = io.BufferedReader(_RawStream(fs.open_input_stream(p, compression=None)), 1 << 20)
    else:
        stream = open(path, "rb")
    try:
        yield gzip.GzipFile(fileobj=stream) if path.endswith(".gz") else stream
    finally:
        stream.close()


class _RawStream(io.RawIOBase):
    """A pyarrow input stream as a raw io stream (so io.BufferedReader gives it readline(limit))."""

    def __init__(self, native):
        self.native = native

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.native.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.native.close()
        super().close()


def file_info(path: str):
    """pyarrow FileInfo of `path`; a remote store that cannot be reached is a one-line ConfigError."""
    fs, p = filesystem(path)
    try:
        return fs.get_file_info(p)
    except OSError as e:
        where = "STORAGE_EMULATOR_HOST" if not str(path).startswith("s3://") else \
            "AWS_ENDPOINT_URL / run.storage_endpoint"
        raise ConfigError(f"{path}: cannot reach the storage ({_first_line(e)}); check {where} and the "
                          "credentials") from None


def list_files(path: str) -> list[str]:
    """Every file under a folder (recursively), as URIs for remote folders, sorted."""
    from pyarrow import fs as pafs

    fs, p = filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True))
    return sorted(uri(i.path, path) for i in infos if i.type == pafs.FileType.File)


def list_dirs(path: str) -> list[str]:
    """Names of the folders directly in `path` (none if it does not exist); unreachable storage: ConfigError."""
    from pyarrow import fs as pafs

    if file_info(path).type != pafs.FileType.Directory:
        return []
    fs, p = filesystem(path)
    # from a recursive listing: object stores have no folders, only prefixes, and pyarrow's GCS filesystem lists
    # none of them non-recursively (seen against gcp-storage-emulator)
    found = [(i.path[len(p):].lstrip("/"), i.type) for i in fs.get_file_info(pafs.FileSelector(p, recursive=True))]
    return sorted({rel.split("/")[0] for rel, kind in found if "/" in rel or kind == pafs.FileType.Directory})


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def upload_dir(local: str | Path, dest: str, last: str | None = None) -> None:
    """Copy a local folder's files to a remote folder (overwriting files of the same name). `last`, a file directly
    in the folder, is copied after every other file: a reader that trusts only folders holding it (a manifest)
    never takes a half-uploaded folder for a whole one."""
    from pyarrow import fs as pafs

    fs, p = filesystem(dest)
    local_fs = pafs.LocalFileSystem()
    if last is None:
        pafs.copy_files(str(local), p, source_filesystem=local_fs, destination_filesystem=fs)
        return
    files = sorted(f for f in Path(local).rglob("*") if f.is_file())
    for f in sorted(files, key=lambda f: f == Path(local) / last):
        pafs.copy_files(str(f), f"{p}/{f.relative_to(local).as_posix()}", source_filesystem=local_fs,
                        destination_filesystem=fs)


def upload_file(src: str | Path, dest: str) -> None:
    """Copy one local file to a remote path (overwriting it)."""
    fs, path = filesystem(dest)
    with fs.open_output_stream(path) as fh:
        fh.write(Path(src).read_bytes())


def download_file(src: str, dest: str | Path) -> None:
    """Copy one remote file to a local path; nothing is written when it does not exist."""
    from pyarrow import fs as pafs

    fs, path = filesystem(src)
    if fs.get_file_info(path).type == pafs.FileType.File:
        with fs.open_input_stream(path) as fh:
            Path(dest).write_bytes(fh.read())


def download_dir(src: str, local: str | Path) -> Path:
    """Copy a remote folder to a local folder; returns the local folder."""
    from pyarrow import fs as pafs

    fs, p = filesystem(src)
    Path(local).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(p, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return Path(local)


def staging_dir(uri: str) -> Path:
    """The local folder that mirrors a remote output (metrics, TensorBoard, final model are uploaded from it)."""
    import hashlib
    import tempfile

    key = hashlib.sha1(uri.encode()).hexdigest()[:12]
    return Path(os.environ.get("LBR_STAGING", Path(tempfile.gettempdir()) / "lbr-staging")) / key


_COPIES: dict[str, str] = {}


def local_copy(path: str) -> str:
    """A local folder for `path`: itself, or a fresh download of a remote model folder (--init, eval --model),
    made once per process."""
    import tempfile

    if not is_remote(path):
        return path
    if path not in _COPIES:
        info = file_info(path)
        from pyarrow import fs as pafs

        if info.type == pafs.FileType.NotFound:
            raise ConfigError(f"{path} does not exist")
        _COPIES[path] = str(download_dir(path, tempfile.mkdtemp(prefix="lbr-model-")))
    return _COPIES[path]
