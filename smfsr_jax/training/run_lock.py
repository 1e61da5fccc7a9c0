"""One training run per workdir: WORKDIR/run.lock names the run holding it (host, pid, start time).

The lock is created only if absent (core/files.create_exclusive: a hard link locally, a generation
precondition in a bucket, which has no flock), so of two runs racing for it exactly one wins, and it appears
complete. A lock left by a process that is gone (same host, pid not running) is taken over with a warning: it
is deleted only if nobody replaced it since it was read (files.delete_if_unchanged), then created again, so
of several runs taking it over one wins. A lock from another host cannot be checked and is reported for the
user to remove.
"""

import json
import os
import socket
import time

from absl import logging

from smfsr_jax.core import errors, files
from smfsr_jax.core import workdir as workdir_lib


class WorkdirLocked(errors.UserError):
    """Another run holds the workdir."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _parse(path: str, content: bytes) -> dict:
    try:
        return json.loads(content)
    except ValueError as e:
        raise WorkdirLocked(f"{path}: unreadable run lock ({e}); delete it if no run is using the workdir") from None


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')})"


def acquire(workdir: str) -> str:
    """Take WORKDIR/run.lock for this process; raises WorkdirLocked naming the holder. Returns the lock path."""
    path = workdir_lib.lock_path(workdir)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    while True:
        if files.create_exclusive(path, json.dumps(me).encode()):
            return path
        current = files.read_versioned(path)
        if current is None:  # released in the meantime
            continue
        content, version = current
        holder = _parse(path, content)
        if holder.get("host") != me["host"] or _alive(int(holder.get("pid", -1))):
            raise WorkdirLocked(f"workdir {workdir} is in use by {_describe(holder)}: {path}. Wait for that "
                                "run to end, or delete the lock file if it is gone.")
        if files.delete_if_unchanged(path, version):
            logging.warning("took over the run lock of %s, which is no longer running (%s)", _describe(holder), path)


def release(path: str):
    """Remove the lock if this process holds it."""
    current = files.read_versioned(path)
    if current is None:
        return
    content, version = current
    holder = _parse(path, content)
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        files.delete_if_unchanged(path, version)
