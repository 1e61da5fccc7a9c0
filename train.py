r"""Train one SMFSR stage: teacher flow matching, ISC student, or GAN refinement.

  python -m smfsr_jax.data.build --dataset bundled --data_dir runs/tfds   # the tiny configs' data, once
  python train.py --config configs/teacher_fm.py:tiny --workdir runs/tiny/teacher_fm --config.data.data_dir=runs/tfds
  python train.py --config configs/student_isc.py:sd35m --workdir runs/student_isc --config.init.teacher=... ...

The config module's docstring holds its launch command and expected result. Any field can be
overridden with --config.a.b=value. Re-running with the same --workdir resumes from its newest readable
checkpoint (train state, data-iterator state and step-folded rng: the resumed run equals an
uninterrupted one); an unreadable checkpoint is moved aside to checkpoints/<step>.corrupt-<time> and the
one before it is used. A resume must use the config the run started with (the differing fields are
listed), unless --allow_config_change. One run at a time per workdir (WORKDIR/run.lock names the holder).
Several processes (multi-host): pass --num_processes/--process_id/--coordinator_address, or --distributed
on a cluster where jax.distributed auto-detects them.

WORKDIR holds config.json, checkpoints/<step>/, TensorBoard events, metrics.jsonl and, at the end,
bundle/ (the model for `python -m smfsr_jax.sr` and for the next stage). WORKDIR, the data_dir and init.* may
be bucket URLs (gs://...): hosts need share no disk.

SIGTERM (a preemption) stops the run after a step all processes agree on, with a checkpoint of it, exit status 0
and one line naming the step; rerunning the same command resumes from it. A second SIGTERM, or Ctrl-C, stops at
once.

Exit status: 0 (also when stopped by SIGTERM); 2 for a problem to fix first (missing data, a busy workdir, a
changed config, unreadable checkpoints, bad weights), printed as one line; 1 when training failed (a non-finite
loss: no checkpoint holds it; a checkpoint that could not be read for the environment's sake: nothing moved).
--debug shows the traceback. orbax's INFO lines are hidden unless --verbosity is given.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import logging as py_logging  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from smfsr_jax.core import distributed, errors  # noqa: E402
from smfsr_jax.training import loop  # noqa: E402


def _not_orbax_info(record: py_logging.LogRecord) -> bool:
    # orbax logs each save and restore step at INFO: about half of a tiny run's lines.
    return record.levelno >= py_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.get_absl_handler().addFilter(_not_orbax_info)

    def run():
        distributed.initialize(flags.FLAGS.distributed, flags.FLAGS.coordinator_address, flags.FLAGS.num_processes,
                               flags.FLAGS.process_id)
        loop.train(flags.FLAGS.config, flags.FLAGS.workdir, allow_config_change=flags.FLAGS.allow_config_change)

    return errors.run_cli(run, debug=flags.FLAGS.debug)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Stage config (configs/<stage>.py:<variant>).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory (created; resumed when it holds checkpoints).")
    flags.DEFINE_bool("allow_config_change", False, "Resume even though the config differs from config.json.")
    flags.DEFINE_bool("debug", False, "Show tracebacks of the project's own errors.")
    distributed.define_flags()
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
