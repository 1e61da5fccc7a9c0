"""One training run per workdir: WORKDIR/run.lock names the run holding it (host, pid, start time).

The lock file is written in full under a temporary name and hard-linked into place, so it appears
atomically and complete: two runs racing for it cannot both win, and a reader never sees it half-written.
A lock left by a process that is gone (same host, pid not running) is taken over with a warning; one from
another host cannot be checked and is reported for the user to remove.
"""

import json
import os
import socket
import time

from absl import logging

from smfsr_jax.core import errors
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


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise WorkdirLocked(f"{path}: unreadable run lock ({e}); delete it if no run is using the workdir") from None


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')})"


def acquire(workdir: str) -> str:
    """Take WORKDIR/run.lock for this process; raises WorkdirLocked naming the holder. Returns the lock path."""
    path = workdir_lib.lock_path(workdir)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    staging = f"{path}.{me['pid']}"
    with open(staging, "w") as f:
        json.dump(me, f)
    try:
        while True:
            try:
                os.link(staging, path)
                return path
            except FileExistsError:
                pass
            holder = _read(path)
            if holder is None:  # released in the meantime
                continue
            if holder.get("host") != me["host"] or _alive(int(holder.get("pid", -1))):
                raise WorkdirLocked(f"workdir {workdir} is in use by {_describe(holder)}: {path}. Wait for that "
                                    "run to end, or delete the lock file if it is gone.")
            # Move the stale lock aside first: of several runs taking it over, one rename succeeds.
            aside = f"{path}.stale.{me['pid']}"
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue
            moved = _read(aside)
            if moved != holder:  # another run took it over between our read and our rename: give it back
                os.rename(aside, path)
                continue
            os.remove(aside)
            logging.warning("took over the run lock of %s, which is no longer running (%s)", _describe(holder), path)
    finally:
        os.remove(staging)


def release(path: str):
    """Remove the lock if this process holds it."""
    holder = _read(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        os.remove(path)
