"""Storage that every node reaches: a shared folder, or an object store (s3://, gs://, any fsspec URL).

Everything that reads or writes a run's files does it on local disk: DeepSpeed writes each rank's shards as files,
packed rows are read memory-mapped, transformers loads weights from a folder. With a folder as
RAY_FINETUNE_STORAGE that folder is the storage and nothing here does anything. With a URL, each node keeps a
mirror on its own disk: the URL `s3://bucket/prefix/x` is the file `<mirror>/s3/bucket/prefix/x`, where <mirror>
is RAY_FINETUNE_MIRROR (set per node, e.g. to a local NVMe drive; default `$RAY_FINETUNE_HOME/mirror`). The object
store is the truth and the mirror a cache of it:

- a writer completes its files in the mirror, then `push`es them; what marks a piece complete (a checkpoint's
  trainer state, a packed entry's stats) goes up last, so a reader never takes a half-uploaded piece for a whole;
- a reader `pull`s what it needs before it opens it (a no-op when the mirror holds it already: what is pushed is
  never changed afterwards, only replaced whole or removed);
- `exists`, `read_text` and `children` ask the object store, so that a node learns what another node wrote.

Whether a node reaches the same storage as the head is checked, not assumed: the head writes a random `identity`
into the storage once, and every node a run's trainers are placed on must read the same one back and write beside
it (`unreached`). A worker that does not mount the shared folder (or mounts it read-only), or whose credentials or
endpoint lead to another object store, is named before the run trains instead of failing later on a file that is
not there, or at its first checkpoint.

Within a process code works with local paths; what travels between actors and into events is a location (the URL,
or the path of a shared folder): `location_of` turns a mirror path into its URL, `local` a location into the path
on this node.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

from ray_finetune.errors import one_line

MIRROR_ENV = "RAY_FINETUNE_MIRROR"
IDENTITY_FILE = ".ray_finetune-storage"


def home() -> Path:
    """RAY_FINETUNE_HOME, the same on every node (the scheduler passes it to every actor it starts)."""
    return Path(os.environ.get("RAY_FINETUNE_HOME", "~/.ray_finetune")).expanduser().resolve()


def mirror_root() -> Path:
    """This node's mirror of object storage. Not passed from the head to the actors (unlike the settings): each node
    reads its own."""
    configured = os.environ.get(MIRROR_ENV, "").strip()
    return Path(configured).expanduser().resolve() if configured else home() / "mirror"


def is_url(location: str) -> bool:
    scheme, separator, _ = str(location).partition("://")
    return bool(separator) and scheme != "file"


def local(location: str | Path) -> Path:
    """The local path of a location: a path as it is (`file://` stripped), a URL as its mirror path."""
    text = str(location)
    if text.startswith("file://"):
        return Path(text[len("file://"):]).expanduser().resolve()
    if not is_url(text):
        return Path(text).expanduser().resolve()
    scheme, _, rest = text.partition("://")
    return mirror_root() / scheme / rest.strip("/")


def location_of(path: str | Path) -> str:
    """What a local path stands for: the URL of a mirror path, else the path itself."""
    url = _url(Path(path))
    return url if url is not None else str(path)


def is_mirrored(path: str | Path) -> bool:
    return _url(Path(path)) is not None


def _url(path: Path) -> str | None:
    try:
        relative = path.resolve().relative_to(mirror_root())
    except ValueError:
        return None
    if len(relative.parts) < 2:
        return None
    return f"{relative.parts[0]}://{'/'.join(relative.parts[1:])}"


def _filesystem(url: str) -> tuple[Any, str]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()   # another node may have written or removed files since this process last listed
    return fs, path


def exists(path: str | Path) -> bool:
    """Whether the file or folder exists: in the object store for a mirror path, on disk otherwise."""
    url = _url(Path(path))
    if url is None:
        return Path(path).exists()
    fs, remote = _filesystem(url)
    return bool(fs.exists(remote))


def read_text(path: str | Path) -> str:
    """A small file's text, from the object store for a mirror path (the mirror's copy of a file that changes, such
    as a pointer file, may be another node's old one)."""
    url = _url(Path(path))
    if url is None:
        return Path(path).read_text()
    fs, remote = _filesystem(url)
    try:
        return fs.cat_file(remote).decode()
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} does not exist") from None


def children(path: str | Path) -> list[str]:
    """The names of the files and folders directly inside a folder (none when it does not exist)."""
    url = _url(Path(path))
    if url is None:
        return sorted(child.name for child in Path(path).iterdir()) if Path(path).is_dir() else []
    fs, remote = _filesystem(url)
    try:
        listed = fs.ls(remote, detail=False)
    except FileNotFoundError:
        return []
    return sorted({entry.rstrip("/").rsplit("/", 1)[-1] for entry in listed} - {""})


def modified(path: str | Path) -> float:
    """When a file, or the newest file under a folder (or the folder itself), was last written, in seconds since the
    epoch. Raises FileNotFoundError when there is none."""
    local_path = Path(path)
    url = _url(local_path)
    if url is None:
        return max(f.stat().st_mtime for f in [local_path, *(local_path.rglob("*") if local_path.is_dir() else ())])
    fs, remote = _filesystem(url)
    if not fs.isdir(remote):
        return fs.modified(remote).timestamp()
    times = [info["LastModified"] for info in fs.find(remote, detail=True).values() if "LastModified" in info]
    if not times:
        raise FileNotFoundError(url)
    return max(times).timestamp()


def size(path: str | Path) -> int:
    """The bytes of a file, or of every file under a folder."""
    url = _url(Path(path))
    if url is None:
        return size_here(path)
    fs, remote = _filesystem(url)
    return int(fs.du(remote, total=True))


def size_here(path: str | Path) -> int:
    """The bytes of a file, or of every file under a folder, on this node's disk (for a mirror path: its copy)."""
    local_path = Path(path)
    files = [local_path] if local_path.is_file() else [f for f in local_path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files)


def push(path: str | Path, to: str | Path | None = None, last: tuple[str, ...] = (),
         before_last: Callable[[], None] | None = None) -> None:
    """Upload a mirror file or folder (every file under it) to the object store: to the URL of `to` when given (a
    folder written under a staging name), else to its own. Files named in `last` go up after all the others (and
    after `before_last()` returns, when given): what marks the piece complete. Nothing to do for storage that is a
    folder."""
    source = Path(path)
    url = _url(Path(to) if to is not None else source)
    if url is None:
        return
    fs, remote = _filesystem(url)
    if source.is_file():
        fs.put_file(str(source), remote)
        return
    files = sorted(f for f in source.rglob("*") if f.is_file())
    for is_last in (False, True):
        if is_last and before_last is not None:
            before_last()
        batch = [f for f in files if (f.name in last) == is_last]
        if batch:   # a batch's files go up at once (fsspec runs them concurrently on async stores such as s3fs)
            fs.put([str(f) for f in batch], [f"{remote}/{f.relative_to(source).as_posix()}" for f in batch])


def pull(path: str | Path) -> Path:
    """Make a mirror file or folder present on this node, downloaded whole from the object store unless the mirror
    has it; returns the path. A folder arrives under a temporary name renamed into place, so a folder in the
    mirror is always complete (unless pull_some made it). Ranks of one node pulling the same thing wait for the
    first instead of each downloading it. Raises FileNotFoundError when the object store does not have it either."""
    target = Path(path)
    url = _url(target)
    if target.exists() or url is None:
        if not target.exists():
            raise FileNotFoundError(f"{target} does not exist")
        return target
    with _node_lock(target):
        if target.exists():   # another rank of this node pulled it meanwhile
            return target
        fs, remote = _filesystem(url)
        if not fs.exists(remote):
            raise FileNotFoundError(f"{url} does not exist")
        staging = target.parent / f".pull-{uuid.uuid4().hex}-{target.name}"
        try:
            if fs.isfile(remote):
                fs.get_file(remote, str(staging))
            else:
                _download(fs, remote, _files_under(fs, remote), staging)
            staging.rename(target)
        finally:
            if staging.is_dir():
                shutil.rmtree(staging, ignore_errors=True)
            elif staging.exists():
                staging.unlink()
    return target


def pull_some(path: str | Path, wanted: Callable[[str], bool]) -> Path:
    """Make present on this node the files of a mirror folder that `wanted` accepts (it is given each file's path
    relative to the folder), downloaded together unless the mirror has them, each renamed into place whole; returns
    the folder. For a reader that needs part of a folder only: the folder is then partial on this node, and pull()
    would take it for complete, so drop it (drop_local) once read. Raises FileNotFoundError when the object store
    has no such folder."""
    target = Path(path)
    url = _url(target)
    if url is None:
        return pull(target)
    with _node_lock(target):
        fs, remote = _filesystem(url)
        files = _files_under(fs, remote)
        if not files:
            raise FileNotFoundError(f"{url} does not exist")
        missing = [file for file in files if wanted(file) and not (target / file).exists()]
        staging = target.parent / f".pull-{uuid.uuid4().hex}-{target.name}"
        try:
            _download(fs, remote, missing, staging)
            for file in missing:
                (target / file).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / file, target / file)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _node_lock(target: Path) -> Any:
    """The lock the ranks of this node take to pull `target` (a file lock in the mirror)."""
    import hashlib

    from filelock import FileLock

    # Lock files stay (removing one another process may be waiting on would let a third in): kept apart, not among
    # the files they guard.
    locks = mirror_root() / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(locks / f"{hashlib.sha256(str(target).encode()).hexdigest()[:32]}.lock"))


def _files_under(fs: Any, remote: str) -> list[str]:
    """The files in the object store's folder `remote`, by their paths relative to it."""
    prefix = fs._strip_protocol(remote).rstrip("/") + "/"
    return [file[len(prefix):] for file in fs.find(remote)]


def _download(fs: Any, remote: str, files: list[str], staging: Path) -> None:
    """Download `files` (paths relative to the object store's folder `remote`) into the same paths under `staging`,
    at once (as push puts them)."""
    for file in files:
        (staging / file).parent.mkdir(parents=True, exist_ok=True)
    if files:
        folder = fs._strip_protocol(remote).rstrip("/")
        fs.get([f"{folder}/{file}" for file in files], [str(staging / file) for file in files])


def fetch(location: str) -> Path:
    """The local path of a location, pulled first when it is in object storage."""
    return pull(local(location))


def remove(path: str | Path, first: tuple[str, ...] = ()) -> None:
    """Remove a file or folder from the mirror and from the object store; the files of the folder named in `first`
    go before the rest (the file whose presence makes the folder complete: a removal cut short then leaves a folder
    that reads as incomplete, never one that reads as complete with files missing). Raises OSError when the
    storage refuses."""
    target = Path(path)
    for name in first:
        remove(target / name)
    url = _url(target)
    if target.is_dir():
        shutil.rmtree(target, ignore_errors=url is not None)   # a mirror copy: the object store's is what counts
    else:
        target.unlink(missing_ok=True)
    if url is not None:
        fs, remote = _filesystem(url)
        if fs.exists(remote):
            fs.rm(remote, recursive=True)


def drop_local(path: str | Path) -> None:
    """Remove a mirror folder's local copy only (its files are in the object store); a folder that is the storage
    itself is left alone."""
    if is_mirrored(path):
        shutil.rmtree(path, ignore_errors=True)


def identity(root: Path) -> str:
    """The identity of the storage at `root` (this node's path of RAY_FINETUNE_STORAGE): the random id written into
    it by the first head that used it. Raises ConfigError when this node cannot read it or write it."""
    from ray_finetune.errors import ConfigError

    file = Path(root) / IDENTITY_FILE
    try:
        try:
            return read_text(file).strip()
        except FileNotFoundError:
            pass
        file.parent.mkdir(parents=True, exist_ok=True)
        written = file.with_name(f"{file.name}.{uuid.uuid4().hex}")
        written.write_text(uuid.uuid4().hex + "\n")
        if is_mirrored(file):
            push(written, to=file)
            written.unlink()
        else:
            written.rename(file)   # whole or not at all: a node never reads half an id
        return read_text(file).strip()   # read back: of two heads writing at once, the id that stayed
    except Exception as error:  # noqa: BLE001 - whatever the store raises (no route, no credentials), it is this
        raise ConfigError(f"RAY_FINETUNE_STORAGE={location_of(root)} cannot be reached from the head node: "
                          f"{one_line(error)}") from None


def unreached(location: str | Path, expected: str) -> str | None:
    """Why this node does not reach the storage at `location` (RAY_FINETUNE_STORAGE as the head has it) whose
    identity is `expected`, or cannot write into it; None when it reaches it and writes."""
    root = local(location)
    file = root / IDENTITY_FILE
    try:
        found = read_text(file).strip()
    except FileNotFoundError:
        where = "this node's own disk" if not is_mirrored(root) else "the object store this node's credentials reach"
        return f"{location_of(file)} is not there (on {where})"
    except Exception as error:  # noqa: BLE001 - no route, no credentials, a hung mount: the operator needs it all
        return f"reading {location_of(file)} failed: {one_line(error)}"
    if found != expected:
        return f"{location_of(file)} names another storage ({found[:8]}…, not the head's {expected[:8]}…)"
    # Trainers write checkpoints there: a read-only mount (or credentials that may only read) would otherwise
    # fail the run at its first checkpoint, maybe an epoch later.
    probe = file.with_name(f"{file.name}.probe-{uuid.uuid4().hex}")
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        push(probe)
        remove(probe)
    except Exception as error:  # noqa: BLE001 - as above
        return f"writing into {location_of(root)} failed: {one_line(error)}"
    finally:
        probe.unlink(missing_ok=True)   # a mirror's copy of a probe whose upload failed
    return None


def reach_advice(root: Path) -> str:
    """What makes every node reach the storage at `root`."""
    if is_mirrored(root):
        return ("Every node needs credentials and an endpoint that read and write the same object store (AWS_* "
                "variables or the cloud's instance role, set on each node)")
    advice = ("Every node must mount the same shared folder, writable, at the same path, or use an object-store URL "
              "(s3://...)")
    if Path(root) == home() / "storage":
        advice = ("RAY_FINETUNE_STORAGE is its default, a folder under RAY_FINETUNE_HOME on each node's own disk: "
                  "set it to a folder every node mounts at the same path, or to an object-store URL (s3://...)")
    return advice

