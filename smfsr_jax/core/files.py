"""Every file the project reads or writes, local or in a bucket, goes through here.

A path is a local path or a bucket URL (gs://, and the other schemes etils.epath reaches through fsspec:
s3://, az://). An object store differs from a local disk in ways that matter for a training run, and each
has one function here:

- no rename: `write_bytes` renames a complete local file into place; a bucket upload is already
  all-or-nothing, so an object is uploaded in place. Either way a reader sees the whole file or none.
- no flock or O_EXCL: `create_exclusive` uses a generation precondition on GCS (create only if absent), and
  `delete_if_unchanged` removes a file only if nobody replaced it since `read_versioned` read it.
- no append: `append_bytes` composes the object with a new part on GCS (no re-upload of what is there).
- no directory rename: `move` renames locally; in a bucket each object is copied by the service (no byte
  passes through this host) and then deleted.

Libraries that reach buckets on their own are pointed at the same place by `configure_storage`, which runs
when smfsr_jax is imported: etils.epath (and so TFDS and orbax's file listing) goes through fsspec/gcsfs
instead of TensorFlow's GCS file system, and a local emulator named by STORAGE_EMULATOR_HOST also serves
TensorStore (orbax's arrays) and ArrayRecord's reader (the TFDS records).
"""

import contextlib
import hashlib
import logging
import os
import sys
import tempfile
import uuid
from typing import Iterable

from etils import epath

from smfsr_jax.core import errors

SCRATCH_ENV = "SMFSR_JAX_SCRATCH"
log = logging.getLogger(__name__)


def configure_storage(environ=os.environ):
    """Route every library's bucket access through the same client and, with STORAGE_EMULATOR_HOST set, to the
    emulator. Values already in the environment win."""
    # TensorFlow's GCS file system has no endpoint setting and is not needed: epath's fsspec backend is.
    environ.setdefault("EPATH_USE_TF", "false")
    import fsspec.config
    # Several processes write one bucket: a cached listing would hide another process's objects.
    fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)
    emulator = environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        url = emulator if "://" in emulator else f"http://{emulator}"
        environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)  # orbax's array reads and writes
        environ.setdefault("CLOUD_STORAGE_EMULATOR_ENDPOINT", url)  # ArrayRecord's GCS reader
        environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # TensorStore: no credential search
        # gcsfs would otherwise ask Google's storage-control service for the bucket type (60 s to time out).
        environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def is_remote(path) -> bool:
    """True for a bucket URL (scheme://...), False for a local path."""
    return "://" in os.fspath(path)


def absolute(path) -> str:
    """`path` as an absolute local path (~ expanded), or the bucket URL unchanged."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def path(value) -> epath.Path:
    """An epath.Path for a local path (made absolute) or a bucket URL."""
    return epath.Path(absolute(value))


def join(base, *parts) -> str:
    return os.fspath(path(base).joinpath(*parts))


def exists(value) -> bool:
    return path(value).exists()


def is_dir(value) -> bool:
    return path(value).is_dir()


def is_file(value) -> bool:
    p = path(value)
    return p.exists() and not p.is_dir()


def listdir(value) -> list[str]:
    """Names in a directory (or under a bucket prefix), sorted."""
    return sorted(child.name for child in path(value).iterdir())


def entries(value) -> tuple[list[str], list[str]]:
    """(names of the files, names of the folders) directly in a directory or under a bucket prefix, sorted; one
    listing request in a bucket, whatever lies deeper."""
    root = absolute(value).rstrip("/")
    if not is_remote(root):
        with os.scandir(root) as listing:
            found = [(entry.name, entry.is_dir()) for entry in listing]
    else:
        found = [(info["name"].rstrip("/").rsplit("/", 1)[-1], info["type"] == "directory")
                 for info in _filesystem(root).ls(_key(root), detail=True)]
    return sorted(n for n, d in found if not d), sorted(n for n, d in found if d)


def walk_files(value) -> list[str]:
    """Every file under a directory, as full paths (bucket URLs in a bucket), sorted."""
    root = absolute(value)
    if not is_remote(root):
        return sorted(os.path.join(directory, name) for directory, _, names in os.walk(root) for name in names)
    scheme = root.split("://", 1)[0]
    fs = _filesystem(root)
    return sorted(f"{scheme}://{key}" for key in fs.find(_key(root)))


def size(value) -> int:
    return path(value).stat().length


def makedirs(value):
    """Create a local directory and its parents; a bucket has no directories to create."""
    if not is_remote(value):
        os.makedirs(absolute(value), exist_ok=True)


def read_bytes(value) -> bytes:
    return path(value).read_bytes()


def read_text(value) -> str:
    return path(value).read_text()


def read_range(value, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file (fewer at its end): one ranged request for a bucket object, so that a
    reader takes a part of a large file without downloading the rest."""
    if is_remote(value):
        return _filesystem(value).cat_file(_key(value), start, end)
    with open(absolute(value), "rb") as f:
        f.seek(start)
        return f.read(end - start)


def write_bytes(value, data: bytes):
    """Write a whole file: readers see the old content or the new one, never a part (module docstring)."""
    if is_remote(value):
        path(value).write_bytes(data)
        return
    target = absolute(value)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.partial-", dir=os.path.dirname(target))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(partial, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
        raise


def write_text(value, text: str):
    write_bytes(value, text.encode())


def append_bytes(value, data: bytes):
    """Add `data` at the end of a file (created when absent). On GCS the object is composed with a new part."""
    if not is_remote(value):
        target = absolute(value)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "ab") as f:
            f.write(data)
        return
    fs = _filesystem(value)
    target = _key(value)
    if not fs.exists(target):
        try:
            fs.pipe_file(target, data, mode="create")
            return
        except FileExistsError:  # created since: append to it
            pass
    if not hasattr(fs, "merge"):  # no compose on this store: rewrite the object
        fs.pipe_file(target, fs.cat_file(target) + data)
        return
    part = f"{target}.append-{uuid.uuid4().hex}"
    fs.pipe_file(part, data)
    try:
        fs.merge(target, [target, part])
    finally:
        fs.rm_file(part)


def create_exclusive(value, data: bytes) -> bool:
    """Create the file with `data` only if it does not exist; True when this call created it. The file appears
    complete (a local one is written aside and hard-linked into place)."""
    if is_remote(value):
        try:
            _filesystem(value).pipe_file(_key(value), data, mode="create")
            return True
        except FileExistsError:
            return False
    target = absolute(value)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.new-", dir=os.path.dirname(target))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.link(staging, target)
        return True
    except FileExistsError:
        return False
    finally:
        os.remove(staging)


def read_versioned(value) -> tuple[bytes, str] | None:
    """(content, version) of a file, or None when it does not exist; the version changes whenever the file is
    replaced (GCS: the object's generation; local: inode and modification time)."""
    if is_remote(value):
        fs = _filesystem(value)
        try:
            info = fs.info(_key(value), refresh=True) if _is_gcs(fs) else fs.info(_key(value))
            data = fs.cat_file(_key(value))
        except FileNotFoundError:
            return None
        return data, str(info.get("generation") or info.get("ETag") or info.get("mtime"))
    target = absolute(value)
    try:
        with open(target, "rb") as f:
            stat = os.fstat(f.fileno())
            return f.read(), f"{stat.st_ino}:{stat.st_mtime_ns}"
    except FileNotFoundError:
        return None


def delete_if_unchanged(value, version: str) -> bool:
    """Delete the file only if it still has `version` (read_versioned); False when it changed or is gone."""
    if is_remote(value):
        fs = _filesystem(value)
        if not _is_gcs(fs):
            raise errors.UserError(f"{value}: conditional delete needs a gs:// bucket")
        bucket, _, key = _key(value).partition("/")
        try:
            fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=version)
            fs.invalidate_cache(_key(value))
            return True
        except (FileExistsError, FileNotFoundError):  # 412: replaced since read; 404: gone
            return False
    target = absolute(value)
    # Move it aside first: of several callers, one rename wins; a file replaced meanwhile is put back.
    aside = f"{target}.delete-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(target, aside)
    except FileNotFoundError:
        return False
    stat = os.stat(aside)
    if f"{stat.st_ino}:{stat.st_mtime_ns}" != version:
        os.rename(aside, target)
        return False
    os.remove(aside)
    return True


def remove(value):
    path(value).unlink()


def remove_tree(value):
    p = path(value)
    if p.exists():
        p.rmtree()


def move(source, destination):
    """Rename a file or directory. In a bucket each object is moved by the service (GCS's object move, a
    metadata change; elsewhere a server-side copy and a delete): nothing is downloaded, and an interrupted move
    leaves every object at its source or at its destination."""
    if not is_remote(source):
        os.rename(absolute(source), absolute(destination))
        return
    fs = _filesystem(source)
    src, dst = _key(source), _key(destination)
    if not fs.isdir(src):
        fs.mv(src, dst)
        return
    for name in fs.find(src):
        fs.mv(name, dst + name[len(src):])


def _listing(value) -> dict[str, tuple[int, str]]:
    """{relative name: (size, version)} of every file under a directory, or {"": ...} for a file; one listing
    request in a bucket. The version changes when a file is replaced (GCS: generation; local: mtime)."""
    root = absolute(value).rstrip("/")
    if not is_remote(root):
        if not os.path.isdir(root):
            stat = os.stat(root)
            return {"": (stat.st_size, str(stat.st_mtime_ns))}
        found = {}
        for directory, _, names in os.walk(root):
            for name in names:
                stat = os.stat(os.path.join(directory, name))
                found[os.path.relpath(os.path.join(directory, name), root)] = (stat.st_size, str(stat.st_mtime_ns))
        return found
    key = _key(root)
    return {name[len(key) + 1:]: (int(info["size"]), str(info.get("generation") or info.get("mtime") or ""))
            for name, info in _filesystem(root).find(key, detail=True).items()}


def sizes(value) -> dict[str, int]:
    """{relative name: size} of every file under a directory (one listing request in a bucket)."""
    return {name: found[0] for name, found in _listing(value).items()}


def copy_file(source, destination, progress=None):
    """Copy one file between any two places, streamed (a file larger than memory is fine): the destination
    appears complete or not at all (a local one is written aside and renamed). `progress`: a tqdm bar."""
    import fsspec.callbacks

    class _Bar(fsspec.callbacks.Callback):
        def relative_update(self, inc=1):
            if progress is not None:
                progress.update(inc)

    source, destination = absolute(source), absolute(destination)
    if is_remote(source) and is_remote(destination) and _filesystem(source) is _filesystem(destination):
        _filesystem(source).copy(_key(source), _key(destination))  # by the service, nothing downloaded
        if progress is not None:
            progress.update(size(source))
        return
    if is_remote(destination):
        if is_remote(source):  # another store: through local scratch
            with tempfile.TemporaryDirectory(dir=scratch_dir()) as scratch:
                copy_file(source, os.path.join(scratch, "file"), progress)
                _filesystem(destination).put_file(os.path.join(scratch, "file"), _key(destination))
            return
        _filesystem(destination).put_file(source, _key(destination), callback=_Bar())
        return
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{os.path.basename(destination)}.partial-",
                                   dir=os.path.dirname(destination))
    os.close(fd)
    try:
        if is_remote(source):
            _filesystem(source).get_file(_key(source), partial, callback=_Bar())
        else:
            with open(source, "rb") as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
                    if progress is not None:
                        progress.update(len(chunk))
        os.replace(partial, destination)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
        raise


def copy_tree(source, destination, *, last: Iterable[str] = (), what: str = ""):
    """Copy a directory, local or remote in either place, streamed, with a progress bar on stderr. Files named in
    `last` (relative paths) are copied after all others, so that a reader who waits for them sees a complete
    copy."""
    source, destination = absolute(source).rstrip("/"), absolute(destination).rstrip("/")
    listing = sizes(source)
    last = [name for name in last if name in listing]
    ordered = sorted(name for name in listing if name not in last) + last
    with _progress(sum(listing.values()), what or f"copying {source} to {destination}") as bar:
        for name in ordered:
            copy_file(join(source, name), join(destination, name), bar)


def scratch_dir(*parts: str) -> str:
    """A local directory for staged copies: $SMFSR_JAX_SCRATCH, else the system's temporary directory (each
    host its own: nothing here is shared between processes of a run)."""
    root = os.environ.get(SCRATCH_ENV) or os.path.join(tempfile.gettempdir(), f"smfsr_jax_scratch_{os.getuid()}")
    directory = os.path.join(root, *parts)
    os.makedirs(directory, exist_ok=True)
    return directory


def stage(value, *, what: str = "") -> str:
    """A local copy of a bucket directory or file, for a library that reads only local files; a local `value` is
    returned as it is. The copy lives under `scratch_dir("staged")`, is made once per version of the files
    (names, sizes and generations: a replaced file is staged again), is logged and shows a progress bar."""
    if not is_remote(value):
        return absolute(value)
    source = absolute(value).rstrip("/")
    listing = _listing(source)
    key = hashlib.sha256(repr((source, sorted(listing.items()))).encode()).hexdigest()[:16]
    local = os.path.join(scratch_dir("staged", key), os.path.basename(source))
    done = local + ".complete"
    if os.path.exists(done):
        return local
    total = sum(size for size, _ in listing.values())
    log.info("staging %s (%d files, %.1f MiB) to local scratch %s: %s reads local files only", source,
             len(listing), total / 2**20, local, what or "the library")
    if "" in listing:  # a single file
        with _progress(total, f"staging {source}") as bar:
            copy_file(source, local, bar)
    else:
        copy_tree(source, local, what=f"staging {source}")
    with open(done, "w"):
        pass
    return local


def check_writable(directory):
    """Create `directory` and write and delete a file in it, so that a run whose outputs cannot be saved stops
    before any work; raises a UserError naming the path and the reason."""
    directory = absolute(directory)
    if is_remote(directory):
        probe = join(directory, f".write-check-{uuid.uuid4().hex}")
        try:
            write_bytes(probe, b"")
            remove(probe)
        except FileNotFoundError as e:  # an upload finds no parent only when the bucket itself is missing
            raise errors.UserError(f"cannot write in the output location {directory}: the bucket "
                                   f"{_key(directory).split('/')[0]} does not exist") from e
        except Exception as e:  # noqa: BLE001 (fsspec backends raise their own types)
            reason = " ".join(str(e).split())  # one line: gcsfs puts a 403's reason on a line of its own
            raise errors.UserError(f"cannot write in the output location {directory}: {reason}") from e
        return
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise errors.UserError(f"the output directory {directory} exists and is not a directory")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        failed = f" ({e.filename})" if e.filename and e.filename != directory else ""
        raise errors.UserError(f"cannot create the output directory {directory}{failed}: {e.strerror or e}") from e
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
    except OSError as e:
        raise errors.UserError(f"cannot write in the output directory {directory}: {e.strerror or e}") from e


def _filesystem(value):
    import fsspec
    protocol = os.fspath(value).split("://", 1)[0]
    return fsspec.filesystem(protocol)


def _is_gcs(fs) -> bool:
    return "gs" in getattr(fs, "protocol", ()) or "gcs" in getattr(fs, "protocol", ())


def _key(value) -> str:
    """bucket/key of a bucket URL, as fsspec file systems take it."""
    return os.fspath(value).split("://", 1)[1]


def _progress(total: int, what: str):
    """A progress bar in bytes on stderr (off when stderr is not a terminal)."""
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, desc=what, file=sys.stderr, disable=None, leave=False)
