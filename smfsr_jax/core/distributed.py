"""Several processes (multi-host): the flags train.py, evaluate.py and `python -m smfsr_jax.sr` share, the
jax.distributed start-up, each process's share of a list, and exchanging small JSON values between processes.

--num_processes N --process_id I --coordinator_address HOST:PORT start process I of N (process 0 listens on
HOST:PORT); --distributed lets jax.distributed.initialize() read them from the cluster (SLURM, TPU pods, ...).
Inference splits work by item: process p of n takes the items k with k % n == p of a list in a fixed order.
"""

import json

import jax
import numpy as np
from absl import logging

from smfsr_jax.core import errors

# (name, type, default, help): absl flags in train.py and evaluate.py, argparse options in smfsr_jax.sr.
FLAGS = (
    ("distributed", bool, False, "call jax.distributed.initialize() with cluster auto-detection"),
    ("coordinator_address", str, None, "host:port of process 0, with --num_processes > 1"),
    ("num_processes", int, 1, "number of processes"),
    ("process_id", int, 0, "this process's index, 0 .. num_processes - 1"),
)


def define_flags():
    """FLAGS as absl flags."""
    from absl import flags
    define = {bool: flags.DEFINE_bool, str: flags.DEFINE_string, int: flags.DEFINE_integer}
    for name, kind, default, help_text in FLAGS:
        define[kind](name, default, help_text)


def add_arguments(parser):
    """FLAGS as options of an argparse parser."""
    for name, kind, default, help_text in FLAGS:
        if kind is bool:
            parser.add_argument(f"--{name}", action="store_true", help=help_text)
        else:
            parser.add_argument(f"--{name}", type=kind, default=default, help=help_text)


def initialize(distributed: bool = False, coordinator_address: str | None = None, num_processes: int = 1,
               process_id: int = 0):
    """jax.distributed.initialize for the FLAGS' values (nothing for one process); call it before any JAX work.
    Raises a UserError for values that cannot start."""
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise errors.UserError(f"--process_id must be in [0, --num_processes), got {process_id} of {num_processes}")
    if num_processes > 1:
        if not coordinator_address:
            raise errors.UserError("--num_processes > 1 needs --coordinator_address HOST:PORT (process 0's)")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif distributed:
        jax.distributed.initialize()
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


def share(items: list) -> list:
    """This process's items: those at positions k with k % process_count == process_index."""
    return items[jax.process_index()::jax.process_count()]


def _allgather_bytes(data: bytes) -> list[bytes]:
    from jax.experimental import multihost_utils  # process_allgather needs equal shapes: lengths, then padded bytes
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(len(data))))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:len(data)] = np.frombuffer(data, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [rows[i, :n].tobytes() for i, n in enumerate(lengths)]


def gather(value) -> list:
    """The JSON value (dicts, lists, str, numbers) of every process, in process order; every process takes part
    and gets the same list. Floats come back exactly (JSON writes their repr)."""
    if jax.process_count() == 1:
        return [value]
    return [json.loads(part) for part in _allgather_bytes(json.dumps(value).encode())]


def from_process0(value):
    """Process 0's JSON value, in every process: one decision (a list of steps, a stop) that all processes follow."""
    return gather(value)[0]
