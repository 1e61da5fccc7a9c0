r"""Train one SMFSR stage: teacher flow matching, ISC student, or GAN refinement.

  python train.py --config configs/teacher_fm.py:tiny --workdir runs/tiny_teacher --config.data.data_dir=runs/tfds
  python train.py --config configs/student_isc.py:sd35m --workdir runs/student --config.init.teacher=... ...

The config module's docstring holds its launch command and expected result. Any field can be
overridden with --config.a.b=value. Re-running with the same --workdir resumes from its latest
checkpoint (train state, data-iterator state and step-folded rng: the resumed run equals an
uninterrupted one). Several processes (multi-host): pass --num_processes/--process_id/
--coordinator_address, or --distributed on a cluster where jax.distributed auto-detects them.

WORKDIR holds config.json, checkpoints/<step>/, TensorBoard events, metrics.jsonl and, at the end,
bundle/ (the model for `python -m smfsr_jax.sr` and for the next stage).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from smfsr_jax.training import loop  # noqa: E402


def main(argv):
    del argv
    if flags.FLAGS.num_processes > 1:
        jax.distributed.initialize(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes,
                                   flags.FLAGS.process_id)
    elif flags.FLAGS.distributed:
        jax.distributed.initialize()
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    loop.train(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Stage config (configs/<stage>.py:<variant>).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory (created; resumed when it holds checkpoints).")
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with cluster auto-detection.")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for several local processes.")
    flags.DEFINE_integer("num_processes", 1, "Number of processes.")
    flags.DEFINE_integer("process_id", 0, "This process's index.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
