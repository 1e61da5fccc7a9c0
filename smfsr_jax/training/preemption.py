"""Preemption: SIGTERM, which spot and preemptible VMs, SLURM and Kubernetes send seconds before they kill a
run, stops training at a step every process agrees on, once a checkpoint of that step is written.

One process: a SIGTERM handler sets a flag that the loop reads after each step. Several processes
(jax.distributed): JAX's preemption service catches SIGTERM on any process and tells every process the same
step (one past the largest step any process had reached). A Python handler would replace JAX's, so none is
installed until that step is reached; until then JAX's service absorbs further SIGTERMs.

Once the stop is decided, a second SIGTERM interrupts at once (KeyboardInterrupt, as SIGINT does at any
time): the newest finished checkpoint is never touched, since an interrupted save leaves only a temporary
directory (locally) or a step without its commit file (in a bucket), which readers skip.
"""

import signal

import jax
from absl import logging
from jax.experimental import multihost_utils


class Preemption:
    """`reached(step)` after every step: True at the step where all processes stop."""

    def __init__(self):
        self.distributed = jax.distributed.is_initialized()
        self.stopping = False
        self._previous = None
        if not self.distributed:
            self._install()

    def _install(self):
        if self._previous is None:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        if self.stopping:
            raise KeyboardInterrupt("a second SIGTERM: stopping at once")
        self.stopping = True
        logging.warning("SIGTERM: finishing this step and saving a checkpoint; a second SIGTERM or Ctrl-C stops at "
                        "once")

    def reached(self, step: int) -> bool:
        if self.distributed:
            if not self.stopping and multihost_utils.reached_preemption_sync_point(step):
                self.stopping = True
                self._install()
            return self.stopping
        return self.stopping

    def close(self):
        """Put back the handler that was there before."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
